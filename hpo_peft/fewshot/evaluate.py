"""Predictions, balanced accuracy (ACA), per-class recall, confusion matrix and its figure."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score
from torch import nn
from torch.nn import functional as F

from hpo_peft.data import LabelledImages, Preprocessing
from hpo_peft.core.runtime import autocast

if TYPE_CHECKING:  # settings.py builds on the methods; evaluate only reads the settings it is given
    from hpo_peft.fewshot.settings import TrialSettings


@dataclass
class Metrics:
    balanced_accuracy: float  # percent
    loss: float
    per_class_recall: dict[str, float]  # percent; NaN: the class has no image (None in `as_dict`)
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    categories: list[str]
    # the class probabilities behind the score (N, C), and the true labels (N,): an ensemble's
    # out-of-fold score averages its members' (selection.ensemble_score); not in `as_dict`
    probabilities: torch.Tensor | None = field(default=None, compare=False, repr=False)
    labels: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def standard_error(self) -> float:
        """How far `balanced_accuracy` may be from the accuracy on many more images (points)."""
        return balanced_accuracy_se(list(self.per_class_recall.values()), [sum(row) for row in self.confusion])

    @property
    def classes_without_images(self) -> list[str]:
        """The classes no image belongs to: `balanced_accuracy` is the mean over the others."""
        return [c for c, row in zip(self.categories, self.confusion) if sum(row) == 0]

    def recall_line(self) -> str:
        """`per-class recall: NC 80.0%, G3 no image, ...`"""
        return "per-class recall: " + ", ".join(f"{c} {'no image' if math.isnan(r) else f'{r:.1f}%'}"
                                                for c, r in self.per_class_recall.items())

    def over_classes(self, where: str = "the images") -> str:
        """`; over 3 of 4 classes; NC has no image in the table`, or "" when every class has images."""
        missing = self.classes_without_images
        if not missing:
            return ""
        return (f"; over {len(self.categories) - len(missing)} of {len(self.categories)} classes; "
                f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no image in {where}")

    def as_dict(self) -> dict:
        return {
            "balanced_accuracy": self.balanced_accuracy,
            "standard_error": self.standard_error,
            "loss": self.loss,
            "per_class_recall": {c: None if math.isnan(r) else r for c, r in self.per_class_recall.items()},
            "confusion_matrix": self.confusion,
            "categories": self.categories,
        }


def balanced_accuracy_se(recall: list[float], counts: list[int]) -> float:
    """The binomial standard error (points) of a balanced accuracy, over the classes with images:
    sqrt(sum p (1 - p) / n) / classes, each class's p its recall (percent) as a proportion of its n
    images with half an image right and half wrong added, (r n + 1/2) / (n + 1) (the Jeffreys
    prior's mean). Unlike the plain recall it never calls a class certain because its few images
    all came out alike: one validation image per class would otherwise give ± 0. How it compared
    with the chosen trial's accuracy on unseen images: docs/validation-and-selection.md."""
    shrunk = [(((r / 100) * n + 0.5) / (n + 1), n) for r, n in zip(recall, counts) if n > 0]
    terms = [p * (1 - p) / n for p, n in shrunk]
    return 100.0 * math.sqrt(sum(terms)) / len(terms) if terms else math.nan


@torch.inference_mode()
def forward_in_batches(
    model: nn.Module,
    images: torch.Tensor,
    prep: Preprocessing | None,
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`model` over `images` in batches, without gradients: a classifier's or head's logits, or an
    encoder's features. Outputs (N, C) as float32 on the CPU. uint8 images are normalised batch by batch with
    `prep`; with `prep=None` the inputs (e.g. cached features) go to the model as they are.
    `amp_dtype` is the encoder's autocast: the head and its logits are fp32 whatever it is
    (`ZeroShotHead`), so the outputs are exact fp32 logits, not up-cast bf16 ones."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        if prep is not None:
            batch = prep.normalize(batch)
        with autocast(device, amp_dtype):
            outputs.append(model(batch).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, categories: list[str]) -> Metrics:
    """Arg-max, loss and every metric on fp32 logits."""
    logits = logits.float()
    y_true = labels.numpy()
    y_pred = logits.argmax(dim=1).numpy()
    classes = list(range(len(categories)))
    recall = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    confusion = confusion_matrix(y_true, y_pred, labels=classes).tolist()
    with warnings.catch_warnings():  # a class with no image: the mean is over the others (sklearn says so)
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    return Metrics(
        balanced_accuracy=100.0 * float(balanced),
        loss=float(F.cross_entropy(logits, labels)),
        per_class_recall={c: 100.0 * float(r) if sum(row) else math.nan for c, r, row in zip(categories, recall, confusion)},
        confusion=confusion,
        categories=list(categories),
        probabilities=torch.softmax(logits, dim=1),
        labels=labels,
    )


def evaluate(
    model: nn.Module,
    data: LabelledImages,
    prep: Preprocessing,
    categories: list[str],
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
) -> Metrics:
    return compute_metrics(forward_in_batches(model, data.images, prep, batch_size, amp_dtype), data.labels, categories)


def evaluate_as_trained(model: nn.Module, data: LabelledImages, prep: Preprocessing, categories: list[str],
                        settings: "TrialSettings") -> Metrics:
    """`evaluate` as the trial ran: its encoder under the trial's autocast, in its evaluation batches."""
    return evaluate(model, data, prep, categories, settings.train.eval_batch_size, settings.placement.dtype)


def format_confusion(confusion: list[list[int]], categories: list[str]) -> str:
    width = max(6, *(len(c) + 1 for c in categories))
    lines = ["true\\pred".ljust(10) + "".join(c.rjust(width) for c in categories)]
    for category, row in zip(categories, confusion):
        lines.append(category.ljust(10) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend: figures are saved or logged, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(metrics: Metrics, title: str):
    """A matplotlib figure of the confusion matrix with class names and counts."""
    plt = pyplot()
    matrix = np.array(metrics.confusion)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(metrics.categories))
    ax.set_xticks(ticks, metrics.categories)
    ax.set_yticks(ticks, metrics.categories)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\nbalanced accuracy {metrics.balanced_accuracy:.1f}%")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.tight_layout()
    return fig
