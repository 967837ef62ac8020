"""Images decoded once per process, and the labelled sets a training run sees.

Images are decoded and resized once and kept as uint8 tensors: few-shot sets are tiny, and
re-decoding 512x512 JPEGs every epoch is what made the course loop slow. Every image, of any size
or aspect and from any format, goes through `decode_image`: the whole image resized to the model's
input size (`Preprocessing`, the model family's own), as the package always did.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from hpo_peft.core.errors import UserError


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


def where(row: Any, source: object) -> str:
    """How an error names an image's place: its table row, or the folder or split it is in."""
    if row is None or (isinstance(row, float) and math.isnan(row)):
        return f" (in {source})"
    return f" (row {row} of {source})"


_IMAGE_CACHE: dict[tuple, torch.Tensor] = {}


def load_image(path: Path, prep: Preprocessing, source: str = "") -> torch.Tensor:
    """Decode and resize one image to uint8 (3, H, W), once per process."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: image not found{source}") from None
    return load_cached((str(path), stat.st_mtime_ns, prep.height, prep.width), lambda: path, prep, str(path), source)


def load_cached(key: tuple, opened: Callable[[], Any], prep: Preprocessing, shown: str, source: str) -> torch.Tensor:
    """`decode_image(opened())` once per process for `key` (which must end with the size decoded
    to); an image that cannot be decoded is one error naming `shown` and `source`."""
    if key not in _IMAGE_CACHE:
        try:
            _IMAGE_CACHE[key] = decode_image(opened(), prep)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{shown}: cannot decode image{source} ({err})") from None
    return _IMAGE_CACHE[key]


def decode_image(source, prep: Preprocessing) -> torch.Tensor:
    """A file path or file object (e.g. `io.BytesIO` of sent bytes) decoded and resized to uint8
    (3, H, W): the one decoding every image goes through, for training, evaluation and prediction.
    Raises PIL's `UnidentifiedImageError` or `OSError` for what cannot be decoded."""
    with Image.open(source) as image:
        image = image.convert("RGB").resize((prep.width, prep.height), prep.resample)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def stack(rows: pd.DataFrame, images: list[torch.Tensor], prep: Preprocessing) -> LabelledImages:
    return LabelledImages(
        names=list(rows["image_name"]),
        labels=torch.tensor(rows["label"].to_numpy(), dtype=torch.long),
        images=torch.stack(images) if images else torch.empty(0, 3, prep.height, prep.width, dtype=torch.uint8),
    )


def progress(total: int, desc: str) -> tqdm:
    """A bar in a terminal, none in logs (as the study's epoch bars); the context manager clears it
    before an error message is printed."""
    return tqdm(total=total, desc=desc, leave=False, disable=total < 64 or not sys.stderr.isatty())


def load_images(rows: pd.DataFrame, image_dir: Path, prep: Preprocessing, table: Path, desc: str) -> LabelledImages:
    """The rows' images, `image_dir / image_name` each (an absolute name is that file)."""
    images = []
    with progress(len(rows), desc) as bar:
        for name, row in zip(rows["image_name"], rows["row"]):
            images.append(load_image(image_dir / name, prep, where(row, table)))
            bar.update()
    return stack(rows, images, prep)


def check_files_exist(rows: pd.DataFrame, image_dir: Path, table: Path) -> None:
    for name, row in zip(rows["image_name"], rows["row"]):
        if not (image_dir / name).is_file():
            raise UserError(f"{image_dir / name}: image not found{where(row, table)}")
