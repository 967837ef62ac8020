"""`data.format: imagefolder`: `data.root` holds a training and a test folder (`train_dir`,
`test_dir`; default `train` and `test`), each with one folder per class (any name, spaces
included; its images in it or in its subfolders). `data.categories` defaults to the training
folder's class folders, sorted (config.py); given, its order is the label order and a missing
class folder is an error naming it. Images are found by extension (config.IMAGE_SUFFIXES, any
case); hidden files and folders, other files and folders of no listed class are skipped and
counted in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hpo_peft.core.data_config import IMAGE_SUFFIXES
from hpo_peft.data.reader import Reader
from hpo_peft.data.tables import note
from hpo_peft.core.errors import UserError


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def list_images(folder: Path, categories: list[str], root: Path, key: str) -> pd.DataFrame:
    """Each class folder's images, in class order then path order, named by their path from `root`;
    `key` is the config key that names `folder` (for errors)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found (data.{key})")
    hidden, loose, others = 0, 0, []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            hidden += 1
        elif not entry.is_dir():
            loose += 1
        elif entry.name not in categories:
            others.append(entry.name)
    names, labels, not_images = [], [], []
    for label, category in enumerate(categories):
        class_dir = folder / category
        if not class_dir.is_dir():
            raise UserError(f"{class_dir}: class folder not found (data.categories names {category!r}; "
                            f"the class folders of data.{key} must be named as the classes)")
        for current, dirs, files in os.walk(class_dir):
            hidden += sum(d.startswith(".") for d in dirs)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                path = Path(current) / file
                if file.startswith("."):
                    hidden += 1
                elif path.suffix.lower() not in IMAGE_SUFFIXES:
                    not_images.append(path.relative_to(folder).as_posix())
                else:
                    names.append(path.relative_to(root).as_posix())
                    labels.append(label)
    skipped = [part for part in (
        _plural(hidden, "hidden file") if hidden else "",
        f"{_plural(len(not_images), 'file')} not an image (e.g. {not_images[0]!r}; images end in "
        f"{' '.join(IMAGE_SUFFIXES)})" if not_images else "",
        f"{_plural(loose, 'file')} outside the class folders" if loose else "",
        f"{_plural(len(others), 'folder')} of no class in data.categories ({', '.join(map(repr, others[:4]))}"
        f"{', ...' if len(others) > 4 else ''})" if others else "") if part]
    if skipped:
        note(f"{folder}: skipped {'; '.join(skipped)}")
    return pd.DataFrame({"image_name": names, "label": labels, "row": [None] * len(names)})


_CACHE: dict[tuple, pd.DataFrame] = {}


class ImageFolderReader(Reader):
    kind = "folder"

    def source(self, split: str) -> Path:
        return self.config.root / (self.config.train_dir if split == "train" else self.config.test_dir)

    def rows(self, split: str) -> pd.DataFrame:
        folder = self.source(split)
        stamps = []
        for path in [folder, *(folder / c for c in self.config.categories)]:
            try:
                stamps.append(path.stat().st_mtime_ns)
            except OSError:
                stamps.append(None)
        key = (str(folder.resolve()), tuple(self.config.categories), tuple(stamps))
        if key not in _CACHE:  # listed once per process (a new or removed image changes its folder's time)
            _CACHE[key] = list_images(folder, self.config.categories, self.config.root,
                                      "train_dir" if split == "train" else "test_dir")
        return _CACHE[key]
