"""Where a study's labelled images come from, in any format (`data.format`), and what a run sees.

One reader per format (`reader.py`'s interface; `sicapv2.py`, `imagefolder.py`, `csv_table.py`,
`hf.py`) turns the data into one pool per split: rows of image, label and, where
`data.group_column` is set, group. Everything downstream reads that pool through this module: the
few-shot sampler (`sampler.py`, group-aware), holdout and k-fold (validation.py, on the drawn
shots), the course protocol, evaluation's test split and `predict --table`. Every check holds for
every format, each one line naming the file and row (or folder, or split): duplicates, missing
files, unreadable images, too few images per class, an image in both splits.
"""

from __future__ import annotations

import pandas as pd

from hpo_peft.core.data_config import DataConfig
from hpo_peft.data.csv_table import CsvReader, read_class_table, read_labelled_csv
from hpo_peft.data.hf import HfReader
from hpo_peft.data.imagefolder import ImageFolderReader, list_images
from hpo_peft.data.images import (
    _IMAGE_CACHE,
    FewShotSplit,
    LabelledImages,
    Preprocessing,
    check_files_exist,
    decode_image,
    load_image,
    load_images,
    where,
)
from hpo_peft.data.reader import Reader
from hpo_peft.data.sampler import course_order, sample_by_group, sample_few_shot
from hpo_peft.data.sicapv2 import _TABLE_CACHE, SicapV2Reader, read_table
from hpo_peft.data.tables import is_csv_text
from hpo_peft.core.errors import UserError

__all__ = ["FewShotSplit", "LabelledImages", "Preprocessing", "Reader", "READERS", "check_files_exist", "check_overlap",
           "check_root", "course_order", "decode_image", "few_shot_rows", "is_csv_text", "list_images",
           "load_few_shot", "load_image", "load_images", "load_test", "read_class_table", "read_labelled_csv",
           "read_table", "reader_for", "sample_by_group", "sample_few_shot", "where", "_IMAGE_CACHE", "_TABLE_CACHE"]

READERS: dict[str, type[Reader]] = {"sicapv2": SicapV2Reader, "imagefolder": ImageFolderReader, "csv": CsvReader,
                                    "hf": HfReader}


def reader_for(config: DataConfig) -> Reader:
    return READERS[config.format](config)


def check_root(config: DataConfig) -> None:
    reader_for(config).check_root()


def check_overlap(config: DataConfig, train: pd.DataFrame, shown: int = 5) -> None:
    """No image of the training split's usable rows is also one of the test split's (the same file
    as the image directory and the name resolve it; for `hf`, the same bytes), unless
    `data.allow_overlap`. A test split that is missing or unreadable is not checked here: nothing
    trains on it, and evaluation reports it."""
    if config.allow_overlap:
        return
    reader = reader_for(config)
    try:
        test = reader.rows("test")
    except UserError:
        return
    both = reader.shared(train, test)
    if both:
        names = ", ".join(both[:shown]) + (f", ... ({len(both) - shown} more)" if len(both) > shown else "")
        raise UserError(
            f"data: {len(both)} image{'s are' if len(both) > 1 else ' is'} in both {reader.describe('train')} and "
            f"{reader.describe('test')}: {names}; remove {'them' if len(both) > 1 else 'it'} from one, or set "
            "data.allow_overlap: true"
        )


def few_shot_rows(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the training split and draw the shots; checks the images exist without decoding them."""
    reader = reader_for(config)
    reader.check_root()
    table = reader.rows("train")
    check_overlap(config, table)
    train, val = sample_few_shot(table, config.categories, config.shots, config.drawn_val_shots, config.seed,
                                 reader.source("train"), config.sampler,
                                 folds=config.folds_drawn)
    for rows in (train, val):
        reader.check_images(rows, "train")
    return train, val


def load_few_shot(config: DataConfig, prep: Preprocessing) -> FewShotSplit:
    """The few-shot training and validation sets from the training split only."""
    train_rows, val_rows = few_shot_rows(config)
    reader = reader_for(config)
    return FewShotSplit(
        train=reader.load(train_rows, "train", prep, "train images"),
        val=reader.load(val_rows, "train", prep, "validation images"),
    )


def load_test(config: DataConfig, prep: Preprocessing) -> LabelledImages:
    """The test split: read by final evaluation only, never by a study."""
    reader = reader_for(config)
    reader.check_root()
    rows = reader.rows("test")
    return reader.load(rows, "test", prep, "test images")

