"""The one interface every data format implements (`data.format`, one file each in this package).

A reader turns its format into the pool that everything downstream uses, whatever the format:
per split (`train`, `test`) a DataFrame of rows `image_name` (unique in the split: the path under
`image_dir()` for images in files), `label` (the class's position in `data.categories`), `row`
(where an error points: the table row, the dataset index, or None for an image in a folder) and,
where `data.group_column` is set, `group` (the slide or patient). The sampler, holdout, k-fold,
the course protocol and `predict --table` only see that pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hpo_peft.core.data_config import DataConfig
from hpo_peft.data.images import LabelledImages, Preprocessing, check_files_exist, load_images
from hpo_peft.core.errors import UserError


class Reader:
    kind = "table"  # what a split is, in messages: the training `table`, `folder` or `split`
    in_files = True  # each image a file, `image_dir() / image_name` (what the course protocol reads)

    def __init__(self, config: DataConfig):
        self.config = config

    # what each format says ---------------------------------------------------------------------
    def check_root(self) -> None:
        """The dataset is where data.root says, before any split is read."""
        if not self.config.root.is_dir():
            raise UserError(f"{self.config.root}: dataset root not found (data.root)")

    def source(self, split: str) -> Path:
        """What errors name for the split: its table, folder or dataset split."""
        raise NotImplementedError

    def rows(self, split: str) -> pd.DataFrame:
        """The split's usable rows (see the module's docstring), read once per process."""
        raise NotImplementedError

    def image_dir(self) -> Path:
        """Images in files: `image_dir() / image_name` is the file (an absolute name is itself)."""
        return self.config.root

    # what follows from it ----------------------------------------------------------------------
    def check_images(self, rows: pd.DataFrame, split: str) -> None:
        """Every image of `rows` is there, without decoding it."""
        check_files_exist(rows, self.image_dir(), self.source(split))

    def load(self, rows: pd.DataFrame, split: str, prep: Preprocessing, desc: str) -> LabelledImages:
        """The rows' images decoded (once per process) and resized for the model."""
        return load_images(rows, self.image_dir(), prep, self.source(split), desc)

    def shared(self, train: pd.DataFrame, test: pd.DataFrame) -> list[str]:
        """Names of `train`'s rows that are also an image of `test`: the same file, as
        `image_dir()` and the name resolve it."""
        image_dir = str(self.image_dir())

        def resolve(name: str) -> str:
            return os.path.normpath(os.path.join(image_dir, name))

        in_test = {resolve(name) for name in test["image_name"]}
        return [name for name in train["image_name"] if resolve(name) in in_test]

    def describe(self, split: str) -> str:
        """`the training table PATH`, `the test folder PATH`, ...: how a message names a split."""
        return f"the {'training' if split == 'train' else 'test'} {self.kind} {self.source(split)}"


class TableReader(Reader):
    """Formats whose splits are tables (`train_table`, `test_table`) naming files in `images_dir`."""

    def check_root(self) -> None:
        super().check_root()
        if not self.image_dir().is_dir():
            raise UserError(f"{self.image_dir()}: image folder not found (data.images_dir)")

    def source(self, split: str) -> Path:
        return self.config.root / (self.config.train_table if split == "train" else self.config.test_table)

    def image_dir(self) -> Path:
        return self.config.root / self.config.images_dir
