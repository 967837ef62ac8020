"""`data.format: sicapv2` (the default): SICAPv2's layout, two .xlsx tables with an image name
column and one 0/1 column per class, the images in one folder (`data.images_dir`).

A table row is used only if exactly one configured category column is 1; its label is that
column's position in the configured category order. Extra columns (e.g. SICAPv2's `G4C`) are
ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpo_peft.data.reader import TableReader
from hpo_peft.data.tables import HEADER_ROWS, check_unique_names, describe_cell, read_first_sheet
from hpo_peft.core.errors import UserError


def read_table(path: Path, image_column: str, categories: list[str]) -> pd.DataFrame:
    """Rows with exactly one label, as columns `image_name`, `label`, `row` (the spreadsheet row).

    Image names must be unique among all rows, used or skipped: a name listed twice could put
    one image in both the training and the validation shots, or under two labels."""
    if not path.is_file():
        raise UserError(f"{path}: partition table not found")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, image_column, tuple(categories))
    if key not in _TABLE_CACHE:  # read once per process (checks, workspace, sampler all ask)
        _TABLE_CACHE[key] = _read_table(path, image_column, categories)
    return _TABLE_CACHE[key]


_TABLE_CACHE: dict[tuple, pd.DataFrame] = {}


def _read_table(path: Path, image_column: str, categories: list[str]) -> pd.DataFrame:
    return flag_rows(path, read_first_sheet(path, [image_column, *categories]), image_column, categories)


def flag_rows(path: Path, table: pd.DataFrame, image_column: str, categories: list[str]) -> pd.DataFrame:
    """`read_table`'s rules on a table already read."""
    flags = table[categories]
    bad = ~flags.isin([0, 1]).to_numpy()
    if bad.any():
        row, col = np.argwhere(bad)[0]  # the first bad cell, in reading order
        more = int(bad.sum()) - 1
        raise UserError(
            f"{path}: row {row + HEADER_ROWS}, column {categories[col]!r}: expected 0 or 1, "
            f"got {describe_cell(flags.iloc[row, col])}" + (f" ({more} more such cell{'s' * (more > 1)})" if more else "")
        )
    flags = flags.astype(int).to_numpy()
    single = flags.sum(axis=1) == 1
    names = table[image_column]
    if names[single].isna().any():
        first = int(np.flatnonzero((names.isna() & single).to_numpy())[0])
        raise UserError(f"{path}: row {first + HEADER_ROWS}: empty {image_column!r}")
    check_unique_names(path, names, image_column)
    return pd.DataFrame(
        {
            "image_name": names[single].astype(str).to_numpy(),
            "label": flags[single].argmax(axis=1),
            "row": np.flatnonzero(single) + HEADER_ROWS,
        }
    )


class SicapV2Reader(TableReader):
    def rows(self, split: str) -> pd.DataFrame:
        return read_table(self.source(split), self.config.image_column, self.config.categories)
