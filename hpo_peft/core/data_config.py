"""The `data` section of a study config (config.py re-exports it): where the labelled images are,
in which format (`data.format`, read by hpo_peft/data/), and the label budget a study draws from them.
Like config.py it never imports torch: a typo fails before anything heavy loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")  # any case
# per data.format, the keys it reads beyond root, categories and the label budget, and their defaults
# (None: required, or optional for a column); a key of FORMAT_ONLY_KEYS another format reads is refused
_CSV = {"images_dir": ".", "train_table": None, "test_table": None, "image_column": "image_name",
        "label_column": "label", "group_column": None, "split_column": None, "train_split": "train", "test_split": "test"}
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "sicapv2": {"images_dir": "images", "train_table": "partition/Test/Train.xlsx",
                "test_table": "partition/Test/Test.xlsx", "image_column": "image_name"},
    "imagefolder": {"train_dir": "train", "test_dir": "test"},
    "csv": _CSV,
    "hf": {**{k: _CSV[k] for k in ("label_column", "group_column", "train_split", "test_split")}, "image_column": "image"},
}
FORMAT_ONLY_KEYS = ("train_dir", "test_dir", "label_column", "group_column", "split_column", "train_split", "test_split")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as config.Strict

    # where the images and labels come from (hpo_peft/data/, docs/data.md)
    format: Literal["sicapv2", "imagefolder", "csv", "hf"] = "sicapv2"
    root: Path
    images_dir: str = "images"
    train_table: str = "partition/Test/Train.xlsx"
    test_table: str = "partition/Test/Test.xlsx"
    image_column: str = "image_name"
    categories: list[str] = Field(default_factory=lambda: ["NC", "G3", "G4", "G5"], min_length=2)
    shots: int = Field(16, ge=1)
    # how trials are validated, within the label budget (see validation.py): `holdout` draws
    # val_shots more images per class (budget shots + val_shots); `kfold` validates inside the
    # shots, in `folds` folds (default 4, or shots when fewer; budget shots)
    validation: Literal["holdout", "kfold"] = "holdout"
    val_shots: int = Field(16, ge=1)
    folds: int | None = Field(None, ge=2)
    refit: bool = False  # holdout only: train the kept adapter again on shots + val_shots for its best epoch
    # which images a seed draws (data.sample_few_shot): `package`, numpy's generator per class; `course`,
    # the course notebook's order, so a study's shots are the notebook's for the same seed and K
    sampler: Literal["package", "course"] = "package"
    seed: int = 1
    # an image in both the training and the test table is refused before anything trains, unless
    # this is set (data.check_overlap); not part of a study's identity (identity.py)
    allow_overlap: bool = False
    # the other formats' keys (FORMAT_DEFAULTS): None where the format does not read them (identity.py
    # drops them); group_column: the slide or patient, kept on one side of holdout and of every fold;
    # split_column: csv, each row's split (train_split or test_split)
    train_dir: str | None = None
    test_dir: str | None = None
    label_column: str | None = None
    group_column: str | None = None
    split_column: str | None = None
    train_split: str | None = None
    test_split: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, raw: Any) -> Any:
        """The format's defaults for the keys it reads; its class names from the data where cheap to read."""
        fmt = raw.get("format", "sicapv2") if isinstance(raw, dict) else None
        if fmt not in FORMAT_DEFAULTS:
            return raw  # an unknown format is reported by the field's own check
        raw, defaults = dict(raw), FORMAT_DEFAULTS[fmt]
        for key in FORMAT_ONLY_KEYS:
            if raw.get(key) is not None and key not in defaults:
                raise ValueError(f"{key}: not read with format {fmt}; it reads {sorted(defaults)}")
        for key, value in defaults.items():
            if value is None and key in ("train_table", "test_table") and key not in raw:
                raise ValueError(f"{key}: required with format {fmt} (a CSV or Excel table, relative to root)")
            raw[key] = value if raw.get(key) is None else raw[key]
        if raw.get("categories") is None and fmt != "sicapv2" and raw.get("root") is not None:
            raw["categories"] = _categories_in_data(fmt, Path(raw["root"]), raw)
        return raw

    @property
    def drawn_val_shots(self) -> int:
        """Validation images drawn beside the shots: none when validating inside them."""
        return self.val_shots if self.validation == "holdout" else 0

    @property
    def labels_per_class(self) -> int:
        return self.shots + self.drawn_val_shots

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"categories must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _validation_fits(self) -> "DataConfig":
        if self.validation == "kfold" and self.folds is not None and self.folds > self.shots:
            raise ValueError(f"folds: {self.folds} folds need at least {self.folds} shots per class, got {self.shots}")
        if self.validation == "kfold" and self.refit:
            raise ValueError("refit: kfold always refits the kept adapter on all its shots; `refit` is for holdout, remove it")
        return self

    @property
    def n_folds(self) -> int:
        """kfold: the folds used (default 4, or the shots when fewer; 1 means nothing can be held out)."""
        return min(self.folds or 4, self.shots)

    @property
    def folds_drawn(self) -> int:
        """The folds the sampler deals the shots into (kfold's; 1 for holdout: the shots are one set)."""
        return self.n_folds if self.validation == "kfold" else 1

    @property
    def selects(self) -> bool:
        """Whether trials can be validated and chosen between: not with kfold on one shot per class."""
        return self.validation == "holdout" or self.n_folds >= 2


def _categories_in_data(fmt: str, root: Path, raw: dict[str, Any]) -> list[str]:
    """imagefolder: the training folder's class folders, sorted; hf: the label's ClassLabel names."""
    if fmt not in ("imagefolder", "hf"):
        raise ValueError(f"categories: required with format {fmt} (the class names, in label order)")
    try:
        if fmt == "imagefolder":
            return sorted(p.name for p in (root / raw["train_dir"]).iterdir() if p.is_dir() and not p.name.startswith("."))
        feature = json.loads((root / raw["train_split"] / "dataset_info.json").read_text())["features"][raw["label_column"]]
        return [str(name) for name in feature["names"]]  # a ClassLabel's
    except (OSError, ValueError, KeyError, TypeError):
        where = f"{root / raw['train_dir']} cannot be listed" if fmt == "imagefolder" else "no ClassLabel names them"
        raise ValueError(f"categories: required with format {fmt} where {where} (the class names, in label order)") from None
