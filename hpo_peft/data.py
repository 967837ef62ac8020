"""SICAPv2-format tables, the few-shot sampler and images decoded once per process.

A table row is used only if exactly one configured category column is 1; its label is that
column's position in the configured category order. Extra columns (e.g. SICAPv2's `G4C`) are
ignored. Images are decoded and resized once and kept as uint8 tensors: few-shot sets are tiny,
and re-decoding 512x512 JPEGs every epoch is what made the course loop slow.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from hpo_peft.config import DataConfig
from hpo_peft.errors import UserError


@dataclass(frozen=True)
class Preprocessing:
    """What the model's processor does to an image, stated explicitly so the cached uint8 tensors
    and the metadata saved with an adapter describe the same thing."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float pixel values, rescaled to [0, 1] then standardised."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class LabelledImages:
    names: list[str]
    labels: torch.Tensor  # int64 (N,)
    images: torch.Tensor  # uint8 (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: list[int]) -> "LabelledImages":
        return LabelledImages([self.names[i] for i in index], self.labels[index], self.images[index])

    def __add__(self, other: "LabelledImages") -> "LabelledImages":
        return LabelledImages(self.names + other.names, torch.cat([self.labels, other.labels]),
                              torch.cat([self.images, other.images]))


@dataclass(frozen=True)
class FewShotSplit:
    """What one training run sees: images to train on and, unless it trains blind, to validate on."""

    train: LabelledImages
    val: LabelledImages | None


def _not_a_workbook(path: Path) -> str | None:
    """Why the file cannot be an .xlsx workbook, judged from its first bytes; None if it may be one."""
    with path.open("rb") as file:
        head = file.read(4096)
    if not head:
        return "it is empty"
    if head.startswith(b"PK"):  # a zip archive, as every .xlsx is
        return None
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "it looks like an old Excel .xls workbook"
    if b"\0" in head:
        return "its content is not a spreadsheet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text[:15].lower().startswith(("<!doctype", "<html")):
        return "it looks like an HTML page"
    first_line = text.splitlines()[0] if text else ""
    return "it looks like CSV text" if any(sep in first_line for sep in ",;\t") else "it looks like plain text"


def _open_workbook(path: Path) -> pd.ExcelFile:
    try:
        reason = _not_a_workbook(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read the table ({err.strerror or err})") from None
    if reason is not None:
        raise UserError(f"{path}: cannot read the table: not an Excel .xlsx workbook ({reason}); save it as .xlsx")
    try:
        return pd.ExcelFile(path, engine="openpyxl")
    except Exception as err:  # zipfile and openpyxl raise many types for a damaged file
        raise UserError(f"{path}: cannot read the table: not a readable .xlsx workbook ({type(err).__name__}: {err})") from None


def _read_first_sheet(path: Path, required: list[str]) -> pd.DataFrame:
    """The first sheet (the one the package reads); if it lacks columns, says which sheet was read
    and which other sheet, if any, has them."""
    with _open_workbook(path) as book:
        try:
            sheets = book.sheet_names
            table = pd.read_excel(book, sheet_name=sheets[0])
        except Exception as err:  # a damaged sheet inside a valid zip
            raise UserError(f"{path}: cannot read the table: not a readable .xlsx workbook ({type(err).__name__}: {err})") from None
        missing = [c for c in required if c not in table.columns]
        if not missing:
            return table
        message = (f"{path}: missing column(s) {missing} in sheet {sheets[0]!r}, the first sheet (the only one read); "
                   f"found {[_plain(c) for c in table.columns]}")
        for other in sheets[1:]:
            try:
                header = pd.read_excel(book, sheet_name=other, nrows=0)
            except Exception:
                continue
            if all(c in header.columns for c in required):
                message += f"; sheet {other!r} has them: move it to be the first sheet"
                break
    raise UserError(message)


def _plain(value: object) -> object:
    """A cell value as the user typed it: numpy scalars as Python values, 2.0 as 2."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _describe_cell(value: object) -> str:
    return "an empty cell" if pd.isna(value) else repr(_plain(value))


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
    table = _read_first_sheet(path, [image_column, *categories])
    flags = table[categories]
    bad = ~flags.isin([0, 1]).to_numpy()
    if bad.any():
        row, col = np.argwhere(bad)[0]  # the first bad cell, in reading order
        more = int(bad.sum()) - 1
        raise UserError(
            f"{path}: row {row + 2}, column {categories[col]!r}: expected 0 or 1, "
            f"got {_describe_cell(flags.iloc[row, col])}" + (f" ({more} more such cell{'s' * (more > 1)})" if more else "")
        )
    flags = flags.astype(int).to_numpy()
    single = flags.sum(axis=1) == 1
    names = table[image_column]
    if names[single].isna().any():
        first = int(np.flatnonzero((names.isna() & single).to_numpy())[0])
        raise UserError(f"{path}: row {first + 2}: empty {image_column!r}")
    _check_unique_names(path, names, image_column)
    return pd.DataFrame(
        {
            "image_name": names[single].astype(str).to_numpy(),
            "label": flags[single].argmax(axis=1),
            "row": np.flatnonzero(single) + 2,  # header is spreadsheet row 1
        }
    )


def _check_unique_names(path: Path, names: pd.Series, image_column: str) -> None:
    given = names.notna().to_numpy()
    text = names.astype(str).to_numpy()
    repeated = pd.Series(text[given]).duplicated(keep=False).to_numpy()
    if not repeated.any():
        return
    rows = np.flatnonzero(given)[repeated] + 2  # header is spreadsheet row 1
    first = text[rows[0] - 2]
    same = [str(r) for r in rows if text[r - 2] == first]
    others = len({text[r - 2] for r in rows}) - 1
    raise UserError(
        f"{path}: {image_column} {first!r} appears in rows {', '.join(same[:-1])} and {same[-1]}; image names must "
        f"be unique in a table (all rows count, used or skipped): keep one row per image"
        + (f" ({others} more name{'s' * (others > 1)} repeated)" if others else "")
    )


def course_order(table: pd.DataFrame, seed: int) -> list[int]:
    """The course notebook's order of `table`'s rows (positions): its rows in table order shuffled
    by Python's `random` seeded with `seed` (a private `random.Random(seed)`: the same sequence as
    `random.seed(seed); random.shuffle(...)`, without touching the global state)."""
    positions = list(range(len(table)))
    random.Random(seed).shuffle(positions)
    return positions


def sample_few_shot(
    table: pd.DataFrame, categories: list[str], shots: int, val_shots: int, seed: int, source: Path,
    sampler: str = "package",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """K training and K_val validation rows per class, disjoint, deterministic for a seed (K_val may be 0).
    `package`: a permutation of each class's rows from numpy's generator. `course`: the course's
    order (`course_order`): the K shots are the notebook's, the K_val the next ones of each class."""
    rng = np.random.default_rng(seed)
    shuffled = course_order(table, seed) if sampler == "course" else None
    labels = table["label"].to_numpy()
    train_parts, val_parts = [], []
    for label, category in enumerate(categories):
        rows = table[table["label"] == label]
        needed = shots + val_shots
        if len(rows) < needed:
            wanted = f"shots + val_shots = {shots} + {val_shots} = {needed}" if val_shots else f"shots = {shots}"
            raise UserError(f"{source}: class {category!r} has {len(rows)} usable rows, but {wanted} are needed")
        if shuffled is None:
            order = rng.permutation(len(rows))
            rows_in_order = rows.iloc[order]
        else:
            rows_in_order = table.iloc[[p for p in shuffled if labels[p] == label]]
        train_parts.append(rows_in_order.iloc[:shots])
        val_parts.append(rows_in_order.iloc[shots:needed])
    return pd.concat(train_parts, ignore_index=True), pd.concat(val_parts, ignore_index=True)


_IMAGE_CACHE: dict[tuple[str, int, int, int], torch.Tensor] = {}


def load_image(path: Path, prep: Preprocessing, source: str = "") -> torch.Tensor:
    """Decode and resize one image to uint8 (3, H, W), once per process."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: image not found{source}") from None
    key = (str(path), stat.st_mtime_ns, prep.height, prep.width)
    if key not in _IMAGE_CACHE:
        try:
            _IMAGE_CACHE[key] = decode_image(path, prep)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{path}: cannot decode image{source} ({err})") from None
    return _IMAGE_CACHE[key]


def decode_image(source, prep: Preprocessing) -> torch.Tensor:
    """A file path or file object (e.g. `io.BytesIO` of sent bytes) decoded and resized to uint8
    (3, H, W): the one decoding every image goes through, for training, evaluation and prediction.
    Raises PIL's `UnidentifiedImageError` or `OSError` for what cannot be decoded."""
    with Image.open(source) as image:
        image = image.convert("RGB").resize((prep.width, prep.height), prep.resample)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_images(rows: pd.DataFrame, image_dir: Path, prep: Preprocessing, table: Path, desc: str) -> LabelledImages:
    names = list(rows["image_name"])
    images = []
    # a bar in a terminal, none in logs (as the study's epoch bars); the context manager clears it
    # before an error message is printed
    with tqdm(total=len(names), desc=desc, leave=False, disable=len(names) < 64 or not sys.stderr.isatty()) as bar:
        for name, row in zip(names, rows["row"]):
            images.append(load_image(image_dir / name, prep, f" (row {row} of {table})"))
            bar.update()
    return LabelledImages(
        names=names,
        labels=torch.tensor(rows["label"].to_numpy(), dtype=torch.long),
        images=torch.stack(images) if images else torch.empty(0, 3, prep.height, prep.width, dtype=torch.uint8),
    )


def check_root(config: DataConfig) -> None:
    if not config.root.is_dir():
        raise UserError(f"{config.root}: dataset root not found (data.root)")
    if not (config.root / config.images_dir).is_dir():
        raise UserError(f"{config.root / config.images_dir}: image folder not found (data.images_dir)")


def check_files_exist(rows: pd.DataFrame, image_dir: Path, table: Path) -> None:
    for name, row in zip(rows["image_name"], rows["row"]):
        if not (image_dir / name).is_file():
            raise UserError(f"{image_dir / name}: image not found (row {row} of {table})")


def check_overlap(config: DataConfig, train: pd.DataFrame, shown: int = 5) -> None:
    """No image of the training table's used rows is also a used row of the test table (the same
    file, as `images_dir / image_name` resolves it), unless `data.allow_overlap`. A test table that
    is missing or unreadable is not checked here: nothing trains on it, and evaluation reports it."""
    if config.allow_overlap:
        return
    test_path = config.root / config.test_table
    try:
        test = read_table(test_path, config.image_column, config.categories)
    except UserError:
        return
    image_dir = str(config.root / config.images_dir)

    def resolve(name: str) -> str:
        return os.path.normpath(os.path.join(image_dir, name))

    in_test = {resolve(name) for name in test["image_name"]}
    both = [name for name in train["image_name"] if resolve(name) in in_test]
    if both:
        names = ", ".join(both[:shown]) + (f", ... ({len(both) - shown} more)" if len(both) > shown else "")
        raise UserError(
            f"data: {len(both)} image{'s are' if len(both) > 1 else ' is'} in both the training table "
            f"{config.root / config.train_table} and the test table {test_path}: {names}; remove "
            f"{'them' if len(both) > 1 else 'it'} from one, or set data.allow_overlap: true"
        )


def few_shot_rows(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the training table and draw the shots; checks the images exist without decoding them."""
    check_root(config)
    path = config.root / config.train_table
    table = read_table(path, config.image_column, config.categories)
    check_overlap(config, table)
    train, val = sample_few_shot(table, config.categories, config.shots, config.drawn_val_shots, config.seed, path,
                                 config.sampler)
    for rows in (train, val):
        check_files_exist(rows, config.root / config.images_dir, path)
    return train, val


def load_few_shot(config: DataConfig, prep: Preprocessing) -> FewShotSplit:
    """The few-shot training and validation sets from the training table only."""
    train_rows, val_rows = few_shot_rows(config)
    path = config.root / config.train_table
    image_dir = config.root / config.images_dir
    return FewShotSplit(
        train=load_images(train_rows, image_dir, prep, path, "train images"),
        val=load_images(val_rows, image_dir, prep, path, "validation images"),
    )


def load_test(config: DataConfig, prep: Preprocessing) -> LabelledImages:
    """The test split: read by final evaluation only, never by a study."""
    check_root(config)
    path = config.root / config.test_table
    rows = read_table(path, config.image_column, config.categories)
    return load_images(rows, config.root / config.images_dir, prep, path, "test images")
