"""The chosen adapter put to work: images in, class probabilities out.

One prediction path for every way in: `hpo-peft predict`, the MLflow pyfunc model and its REST
server all rebuild the classifier with `artifacts.load_adapter` (checksums, metadata checksum,
base-model fingerprint, revision, pre-processing, categories), decode images with
`data.decode_image` and compute logits with `evaluate.forward_in_batches`, exactly as `evaluate` does;
probabilities are the softmax of those fp32 logits. Knows nothing of MLflow.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import torch
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

from hpo_peft.fewshot import ensemble
from hpo_peft.fewshot.artifacts import is_ensemble, load_adapter, read_metadata, shown_as
from hpo_peft.core.config import ModelConfig
from hpo_peft.data import Preprocessing, decode_image, is_csv_text, read_labelled_csv, read_table
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.evaluate import forward_in_batches
from hpo_peft.models.classifier import BaseVLM, ImageClassifier, load_base_model
from hpo_peft.fewshot.settings import TrialSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_BATCH_SIZE = 64


@dataclass
class Predictor:
    """A rebuilt, checked classifier on its device, with what it needs to predict."""

    classifier: ImageClassifier
    metadata: dict[str, Any]
    preprocessing: Preprocessing
    amp_dtype: torch.dtype | None

    @property
    def categories(self) -> list[str]:
        return list(self.metadata["categories"])

    def logits(self, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        """uint8 (N, 3, H, W) images -> fp32 (N, C) logits: evaluate's own function."""
        if len(images) == 0:
            return torch.empty(0, len(self.categories))
        return forward_in_batches(self.classifier, images, self.preprocessing, batch_size, self.amp_dtype)

    def probabilities(self, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        return torch.softmax(self.logits(images, batch_size), dim=1)


def base_model_config(metadata: dict[str, Any], name_or_path: str | None = None) -> ModelConfig:
    """The base model an adapter names (id and revision), or `name_or_path` where it lives
    elsewhere on this machine; the fingerprint check on load says if it is not the same model."""
    built_for = metadata["base_model"]
    return ModelConfig(name_or_path=name_or_path or built_for["name_or_path"], revision=built_for.get("revision"))


def load_predictor(folder: Path, base: BaseVLM | None = None, device: str = "auto", precision: str | None = None,
                   label: str | None = None, categories: list[str] | None = None) -> "Predictor | ensemble.EnsemblePredictor":
    """The adapter in `folder` on `base` (default: the base model its metadata names), checked by
    `artifacts.load_adapter` (and against `categories`, when given). `precision` defaults to the one
    the trial trained with; `label` names the adapter in errors (`artifacts.shown_as`)."""
    metadata = read_metadata(Path(folder), label)
    base = base or load_base_model(base_model_config(metadata))
    if is_ensemble(metadata):  # the study's top trials: each member on the same base model
        with shown_as(Path(folder), label):
            members = ensemble.member_folders(Path(folder), metadata)
        return ensemble.EnsemblePredictor([load_predictor(m, base, device, precision, label, categories)
                                           for m in members], metadata)
    classifier, metadata = load_adapter(Path(folder), base, categories, label=label)
    settings = TrialSettings.saved(metadata, device, precision)
    classifier.to(settings.placement.device)
    return Predictor(classifier, metadata, base.preprocessing, settings.placement.dtype)


# images in ------------------------------------------------------------------------------------
def collect_images(inputs: Iterable[str]) -> list[Path]:
    """Files as given, folders (their images and their subfolders', sorted: a test/<class>/ tree
    is read whole; hidden files and folders skipped) and globs (their matches)."""
    inputs, found = list(inputs), []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(given):
            matches = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"IMAGES: {given}: no file matches this pattern")
            found += matches
        else:
            raise UserError(f"IMAGES: {given}: no such file or folder")
    if not found:
        raise UserError(f"IMAGES: no images found in {', '.join(inputs)} "
                        f"(a folder's {', '.join(IMAGE_SUFFIXES)} files are read, its subfolders' too)")
    return found


def check_out_file(out: Path) -> None:
    """`--out` names a CSV file that can be written: not a folder, in a folder that is writable."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / 'predictions.csv'}")
    parent = next(p for p in [out.parent.absolute(), *out.parent.absolute().parents] if p.exists())
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: folder {parent} cannot be written (permission denied)")


def labelled_images(table: Path, images_dir: Path | None, image_column: str,
                    categories: list[str], label_column: str | None = None) -> tuple[list[Path], list[int]]:
    """The images a labelled table names, and their labels. A SICAPv2-style .xlsx table (anything
    but CSV text; `data.read_table`): its images by default in the SICAPv2 layout's `ROOT/images`
    for a table at `ROOT/partition/NAME/TABLE.xlsx`. CSV text of class names (`data.read_labelled_csv`:
    in `label_column`, by default `label` or the one column of class names only): its image paths
    relative to `images_dir`, by default the table's folder, or absolute."""
    if not is_csv_text(table):
        rows = read_table(table, image_column, categories)
        if images_dir is None:
            images_dir = table.resolve().parents[2] / "images" if len(table.resolve().parents) > 2 else table.parent
    else:
        rows = read_labelled_csv(table, image_column, categories, label_column)
        images_dir = table.parent if images_dir is None else images_dir
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: image folder of {table} not found; give it as IMAGES")
    return [images_dir / name for name in rows["image_name"]], [int(v) for v in rows["label"]]


def decode_batches(paths: list[Path], prep: Preprocessing, batch_size: int, strict: bool,
                   progress: bool = True) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[Path, str]]]]:
    """Batches of (indices into `paths`, uint8 images, skipped (path, reason)), decoded on the fly
    so a folder of any size fits in memory. `strict`: the first unreadable image stops with exit 2."""
    with tqdm(total=len(paths), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            index, images, skipped = [], [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(decode_image(paths[i], prep))
                    index.append(i)
                except (UnidentifiedImageError, OSError) as err:
                    reason = " ".join(str(err).split()) or type(err).__name__
                    if strict:
                        raise UserError(f"{paths[i]}: cannot decode image ({reason}); --strict stops here") from None
                    skipped.append((paths[i], reason))
                bar.update()
            empty = torch.empty(0, 3, prep.height, prep.width, dtype=torch.uint8)
            yield index, torch.stack(images) if images else empty, skipped


# probabilities out -----------------------------------------------------------------------------
def probability_frame(probabilities: torch.Tensor, categories: list[str]) -> pd.DataFrame:
    """One column per class, one row per image: what the pyfunc model and its server return."""
    return pd.DataFrame(probabilities.double().numpy(), columns=list(categories))


def predictions_table(names: list[str], logits: torch.Tensor, categories: list[str],
                      labels: list[int] | None = None) -> pd.DataFrame:
    """The CSV `hpo-peft predict` writes: image, predicted class, (true label), every probability."""
    table = pd.DataFrame({"image": names, "predicted": [categories[i] for i in logits.argmax(dim=1).tolist()]})
    if labels is not None:
        table["label"] = [categories[i] for i in labels]
    probabilities = probability_frame(torch.softmax(logits, dim=1), categories)
    return pd.concat([table, probabilities.add_prefix("p_")], axis=1)
