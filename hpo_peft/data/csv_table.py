"""`data.format: csv`: a table (CSV text or an .xlsx workbook) with one row per image: its path
(`image_column`, relative to `data.root / data.images_dir`, by default the root itself, or
absolute) and its class name (`label_column`). Rows whose class is not one of `data.categories`
are skipped and counted in one line. Optionally `group_column` (slide or patient: holdout and
k-fold keep each group on one side) and `split_column` (each row's split, `train_split` or
`test_split`, so one table can hold both splits, as MHIST's annotations.csv does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpo_peft.data.reader import TableReader
from hpo_peft.data.tables import HEADER_ROWS, check_names_given, check_unique_names, note, plain, read_any_table
from hpo_peft.core.errors import UserError


def _text(values: pd.Series) -> pd.Series:
    """Cells as the user typed them (2.0 as 2), stripped; an empty cell as ''."""
    return values.map(lambda v: "" if pd.isna(v) else str(plain(v)).strip())


def read_class_table(path: Path, image_column: str, label_column: str, categories: list[str],
                     group_column: str | None = None, split_column: str | None = None,
                     split: str | None = None) -> pd.DataFrame:
    """The rows of `split` (all rows without a `split_column`) whose class is one of `categories`,
    as `image_name`, `label`, `row` (the file's row, its header being row 1) and, with a
    `group_column`, `group`. Image names must be unique in the whole table."""
    if not path.is_file():
        raise UserError(f"{path}: table not found")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, image_column, label_column, tuple(categories),
           group_column, split_column, split)
    if key not in _CACHE:  # read once per process
        _CACHE[key] = _read(path, image_column, label_column, categories, group_column, split_column, split)
    return _CACHE[key]


_CACHE: dict[tuple, pd.DataFrame] = {}


def _read(path: Path, image_column: str, label_column: str, categories: list[str], group_column: str | None,
          split_column: str | None, split: str | None) -> pd.DataFrame:
    extra = [c for c in (group_column, split_column) if c is not None]
    table = read_any_table(path, list(dict.fromkeys([image_column, label_column, *extra])))
    names = table[image_column]
    check_unique_names(path, names, image_column)
    in_split = np.ones(len(table), dtype=bool)
    if split_column is not None:
        splits = _text(table[split_column])
        in_split = (splits == split).to_numpy()
        if not in_split.any():
            found = sorted(set(splits) - {""})
            raise UserError(f"{path}: no row has {split_column} {split!r} (data.train_split, data.test_split); "
                            f"it holds {found[:8]}")
    labels = _text(table[label_column])
    known = labels.isin(categories).to_numpy()
    used = in_split & known
    check_names_given(path, names, used, image_column)
    skipped = in_split & ~known
    if skipped.any():
        others = list(dict.fromkeys(labels[skipped]))
        shown = ", ".join(repr(v) if v else "empty" for v in others[:4]) + (", ..." if len(others) > 4 else "")
        note(f"{path}{f' ({split_column} {split})' if split_column else ''}: skipped {int(skipped.sum())} "
             f"row{'s' * (int(skipped.sum()) > 1)} whose {label_column} is not one of data.categories ({shown})")
    out = pd.DataFrame({
        "image_name": _text(names[used]).to_numpy(),
        "label": [categories.index(v) for v in labels[used]],
        "row": np.flatnonzero(used) + HEADER_ROWS,
    })
    if group_column is not None:
        check_names_given(path, table[group_column], used, group_column)
        out["group"] = _text(table[group_column][used]).to_numpy()
    return out


def detect_label_column(table: pd.DataFrame, categories: list[str], skip: str) -> str | None:
    """`label`, or else the one column whose filled cells are all class names; None if not one."""
    if "label" in table.columns and "label" != skip:
        return "label"
    fits = [c for c in table.columns if c != skip and (text := _text(table[c]))[text != ""].isin(categories).all()
            and (text != "").any()]
    return fits[0] if len(fits) == 1 else None


def read_labelled_csv(path: Path, image_column: str, categories: list[str],
                      label_column: str | None = None) -> pd.DataFrame:
    """A labelled CSV table for `predict --table`: `read_class_table`'s rules; without a
    `label_column`, `label` or the one column that holds only class names."""
    if label_column is None:
        table = read_any_table(path, [image_column])
        label_column = detect_label_column(table, categories, skip=image_column)
        if label_column is None:
            raise UserError(f"{path}: which column holds the class names {categories}? No single one of "
                            f"{list(table.columns)} does; name it with --config (data.label_column)")
    return read_class_table(path, image_column, label_column, categories)


class CsvReader(TableReader):
    def rows(self, split: str) -> pd.DataFrame:
        config = self.config
        return read_class_table(self.source(split), config.image_column, config.label_column, config.categories,
                                config.group_column, config.split_column,
                                config.train_split if split == "train" else config.test_split)
