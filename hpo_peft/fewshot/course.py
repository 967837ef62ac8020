"""The course notebook's own experiment (`protocol: course`).

The package's `study` protocol (trial.py, train.py) improves on the course: validation shots,
early stopping, the best epoch's weights, a resize of the uint8 image before normalising. This
module does what the course's notebook and its `vlms` helpers do instead (docs/course-protocol.md),
so that a result can be compared with the notebook's own number:

- seeds 42 (Python, numpy, torch) at the start;
- the course's sampler (`course_shots`): rows in table order, Python's `random.shuffle` with the
  sampling seed, then the first K of each class in shuffled order; no validation set;
- the course's transform (`course_transform`): ToTensor, Normalize, then torchvision's Resize on
  the float tensor of the original patch;
- fp32 everywhere;
- LoRA's adapters drawn as the notebook's own wrapper draws them (`Method.prepare_as_notebook`);
- encoder-training methods (`train_ft`): a `DataLoader(shuffle=True)` over the shots, every batch
  forward, cross-entropy, zero_grad, backward, step, fixed epochs, the last epoch's weights;
- black-box adapters (`train_adapter`): features extracted once through the same loader, each
  epoch shuffled by `np.random.rand(N).argsort()`, `N // batch_size` batches (at least one);
- the test table in table order, batch 8; ACA = mean of the row-normalised confusion diagonal.

Epochs, optimiser, learning rate and batch size come from the config (`config.train_for(method)`),
which `studies/course_notebook.yaml` sets to the course's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from hpo_peft.core.config import StudyConfig, TrainConfig
from hpo_peft.data import (
    Preprocessing,
    check_overlap,
    reader_for,
    sample_few_shot,
    where,
)
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.evaluate import Metrics, compute_metrics
from hpo_peft.fewshot.settings import TrialSettings
from hpo_peft.methods import get_method
from hpo_peft.models.classifier import (
    BaseVLM,
    ImageClassifier,
    build_classifier,
    count_trainable,
    encoder_is_frozen,
    load_base_model,
    text_prototypes,
)
from hpo_peft.core.runtime import set_seeds
from hpo_peft.fewshot.train import make_optimizer

COURSE_SEED = 42  # the notebook's `set_seeds(42, ...)`
TEST_BATCH_SIZE = 8  # the notebook's test loader


# --------------------------------------------------------------------------------------
# Sampler and transform
# --------------------------------------------------------------------------------------


def course_shots(table: pd.DataFrame, categories: list[str], shots: int, seed: int,
                 source: Path = Path("the training table")) -> pd.DataFrame:
    """The course's `few_shot_loader` selection, as rows of `table` (`data.read_table`'s output):
    the rows in table order shuffled with Python's `random` seeded with `seed` (`data.course_order`),
    then, for each label ascending, the first `shots` rows of that label in shuffled order; that is
    `data.sample_few_shot` with the course's sampler and no validation images."""
    return sample_few_shot(table, categories, shots, 0, seed, source, sampler="course")[0]


def course_pipeline(prep: Preprocessing) -> transforms.Compose:
    """The notebook's `plip_transforms`, verbatim."""
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(mean=list(prep.mean), std=list(prep.std)),
        transforms.Resize([prep.height, prep.width]),
    ])


def course_transform(images: Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """ToTensor -> Normalize(mean, std) -> Resize([H, W]) (torchvision's bilinear, antialias) on
    the float tensor of the original image: the resize comes after normalisation.

    A PIL image gives (3, H, W); a uint8 tensor (3, h, w) or (N, 3, h, w) gives the same rank;
    a sequence of either gives (N, 3, H, W)."""
    if isinstance(images, Image.Image):
        return course_pipeline(prep)(images)
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"course_transform expects uint8 images, got {images.dtype}")
        pixels = images.to(torch.float32).div(255)  # what ToTensor does to 8-bit pixels
        return transforms.Compose(course_pipeline(prep).transforms[1:])(pixels)
    return torch.stack([course_transform(image, prep) for image in images])


def _open_image(path: Path, source: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image not found{source}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: cannot decode image{source} ({err})") from None


def load_course_images(rows: pd.DataFrame, image_dir: Path, prep: Preprocessing, table: Path) -> torch.Tensor:
    """(N, 3, H, W) float32: each image decoded and passed through `course_transform`."""
    tensors = [
        course_transform(_open_image(image_dir / name, where(row, table)), prep)
        for name, row in zip(rows["image_name"], rows["row"])
    ]
    return torch.stack(tensors) if tensors else torch.empty(0, 3, prep.height, prep.width)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

EpochHook = Callable[[int, float], None]


def shot_loader(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> DataLoader:
    """The course's few-shot loader over already transformed shots: each pass draws its order from
    torch's global generator, as `DataLoader(shuffle=True)` does."""
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True)


def course_loop(module: nn.Module, batches: Callable[[], Iterable], config: TrainConfig,
                on_epoch: EpochHook | None = None, penalty: Callable[[], torch.Tensor | None] = lambda: None) -> list[float]:
    """The loop both course trainers share: fixed epochs; every batch forward, cross-entropy (plus
    `penalty()`, CLAP's), zero_grad, backward, step; no validation; the last epoch's weights stay.
    `batches()` gives one epoch's (inputs, labels). Returns the mean loss per epoch."""
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], config)
    losses = []
    for epoch in range(1, config.max_epochs + 1):
        module.train()
        batch_losses = []
        for inputs, labels in batches():
            loss = F.cross_entropy(module(inputs), labels)
            if (extra := penalty()) is not None:
                loss = loss + extra
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
        losses.append(float(np.mean(batch_losses)))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    module.eval()
    return losses


def train_ft(classifier: ImageClassifier, loader: DataLoader, config: TrainConfig, device: torch.device,
             on_epoch: EpochHook | None = None) -> list[float]:
    """The course's `train_ft`: the loader's batches (reshuffled every pass) through the whole classifier."""
    return course_loop(classifier, lambda: ((x.to(device), y.to(device)) for x, y in loader), config, on_epoch)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The course's `extract_vision_features`: one pass of the loader through the frozen encoder
    (L2-normalised features), in the order the loader yields them."""
    encoder.eval()
    features, labels = [], []
    for images, batch_labels in loader:
        features.append(encoder(images.to(device)).float())
        labels.append(batch_labels.to(device))
    return torch.cat(features), torch.cat(labels)


def train_adapter(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                  on_epoch: EpochHook | None = None) -> list[float]:
    """The course's `train_adapter`: each epoch shuffles with `np.random.rand(N).argsort()` and
    runs `N // batch_size` batches (the last incomplete one dropped, at least one batch). The
    head is initialised from the training features first and its `penalty()` (CLAP's) is added
    to the loss."""
    head.initialize_from_shots(features, labels)
    count, batch_size = len(features), config.batch_size

    def batches():
        order = torch.from_numpy(np.random.rand(count).argsort()).to(features.device)
        for index in range(max(count // batch_size, 1)):
            batch = order[index * batch_size : (index + 1) * batch_size]
            yield features[batch], labels[batch]

    return course_loop(head, batches, config, on_epoch, head.penalty)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_test(classifier: ImageClassifier, rows: pd.DataFrame, image_dir: Path, prep: Preprocessing,
                 table: Path, device: torch.device) -> torch.Tensor:
    """fp32 logits (N, C) on the CPU, the test table in table order, batch 8, decoded per batch."""
    classifier.eval()
    outputs = []
    for start in range(0, len(rows), TEST_BATCH_SIZE):
        images = load_course_images(rows.iloc[start : start + TEST_BATCH_SIZE], image_dir, prep, table)
        outputs.append(classifier(images.to(device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, len(classifier.head.weight))


def course_aca(confusion: list[list[int]]) -> float:
    """The course's `evaluate`: mean of the row-normalised confusion diagonal x 100, rounded to 2
    decimals (rows: true classes). A class with no test image has no row in the course's matrix
    and is left out here too (the course's matrix would give NaN only if one were predicted)."""
    matrix = np.asarray(confusion, dtype=float)
    totals = matrix.sum(axis=1)
    present = totals > 0
    if not present.any():
        return float("nan")
    recall = np.diag(matrix)[present] / totals[present]
    return round(float(np.mean(recall)) * 100, 2)


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------


@dataclass
class CourseResult:
    method: str
    method_options: dict[str, Any]
    trainable_parameters: int
    train_losses: list[float]  # mean training loss per epoch
    test: Metrics  # on the test table, fp32
    test_aca: float  # the course's ACA: mean row-normalised confusion diagonal x 100, 2 decimals
    classifier: ImageClassifier  # the last epoch's weights


def course_rows(data) -> tuple:
    """The course's shots and the whole test table, checked without decoding an image (tables or
    folders, files, no image in both splits unless `data.allow_overlap`): before any model loads."""
    reader = reader_for(data)
    reader.check_root()
    table = reader.rows("train")
    check_overlap(data, table)
    shots = course_shots(table, data.categories, data.shots, data.seed, reader.source("train"))
    reader.check_images(shots, "train")
    test_rows = reader.rows("test")
    reader.check_images(test_rows, "test")
    return shots, test_rows


def run_course_trial(config: StudyConfig, method: str, on_epoch: EpochHook | None = None,
                     base: BaseVLM | None = None) -> CourseResult:
    """The notebook's experiment for one method: shots from the training table by the course's
    sampler, fixed-epoch training as the course does it, then the whole test table."""
    set_seeds(COURSE_SEED)
    data = config.data
    reader = reader_for(data)
    image_dir, train_path, test_path = reader.image_dir(), reader.source("train"), reader.source("test")
    shots, test_rows = course_rows(data)

    chosen = get_method(method)
    if base is None:
        base = load_base_model(config.model)
    settings = TrialSettings.resolve(method, config.methods.get(method, {}), config.train_for(method),
                                     base.family.encoder.module_names)
    options, train_config, device = settings.options, settings.train, settings.placement.device  # fp32 always
    prototypes = text_prototypes(base, config.prompts, data.categories)
    classifier = chosen.prepare_as_notebook(build_classifier(base, prototypes), options).to(device).float()
    trainable = count_trainable(classifier)

    prep = base.preprocessing
    losses: list[float] = []
    if chosen.trains:
        inputs = load_course_images(shots, image_dir, prep, train_path)
        labels = torch.tensor(shots["label"].to_numpy(), dtype=torch.long)
        loader = shot_loader(inputs, labels, train_config.batch_size)
        if encoder_is_frozen(classifier):
            features, feature_labels = extract_features(classifier.encoder, loader, device)
            losses = train_adapter(classifier.head, features, feature_labels, train_config, on_epoch)
        else:
            losses = train_ft(classifier, loader, train_config, device, on_epoch)

    logits = predict_test(classifier, test_rows, image_dir, prep, test_path, device)
    test = compute_metrics(logits, torch.tensor(test_rows["label"].to_numpy(), dtype=torch.long), data.categories)
    return CourseResult(
        method=method,
        method_options=options.model_dump(),
        trainable_parameters=trainable,
        train_losses=losses,
        test=test,
        test_aca=course_aca(test.confusion),
        classifier=classifier,
    )
