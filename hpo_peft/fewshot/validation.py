"""How a trial is validated, within the labels the user has (`data.validation`; the label budget).

- `holdout`: K training shots and K_val more validation images per class (budget K + K_val). A
  trial trains once, stops early on the validation images and keeps its best epoch. With
  `data.refit` the adapter it keeps is instead trained again, without validation, on all K + K_val
  images for that many epochs: every label the user paid for then trains the adapter, and the
  selection score is that of the run on K shots, not of the adapter kept (as with kfold's refit).
- `kfold`: validation inside the K shots (budget K). Each class's shots are dealt in turn into
  `folds` folds, so every fold holds the same number of each class. A trial trains once per fold on
  the other folds and validates on it every epoch; the folds train in lockstep (trial.py) and stop
  together when their mean curve stops improving (`stop_together`). The adapter it keeps is trained on all K shots,
  without validation, for the epoch where the folds' mean validation balanced accuracy is highest
  (`best_epoch`). Its score is the mean over folds of each fold's validation balanced accuracy at
  the epoch the *other* folds' mean curve picks (`cross_fitted_epochs`): a fold never scores its
  own choice of epoch, which on a few images per class would be optimistic (mean validation loss
  at the same epochs breaks ties).
- Either way the score at a chosen epoch is the mean over that epoch and its neighbours
  (`score_window`, SCORE_RADIUS either side, within the epochs run): one epoch's balanced accuracy
  on a few images jumps from epoch to epoch, and a trial whose curve spikes once would win a study
  on that spike (the best of many trials is optimistic). What it changed on the selection
  benchmark: docs/validation-and-selection.md, "A trial's score". The confusion matrix and per-class recall stay the chosen epoch's.
- `fixed`: too few shots to hold any out (kfold with K = 1): nothing is selected; the method's
  fixed settings train on all K shots for `max_epochs` (what `compare` reports, labelled as such).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hpo_peft.core.config import Choices, DataConfig, StudyConfig
from hpo_peft.data import FewShotSplit, LabelledImages
from hpo_peft.fewshot.evaluate import Metrics
from hpo_peft.fewshot.train import EpochMetrics, epoch_rank

SCORE_RADIUS = 1  # a score averages the chosen epoch and this many epochs either side


@dataclass(frozen=True)
class ValidationPlan:
    scheme: str  # holdout | kfold | fixed
    splits: list[FewShotSplit]  # one trained and validated run each; none for `fixed`
    refit: LabelledImages | None  # what the kept adapter finally trains on (kfold, fixed, holdout with refit)
    labels_per_class: int

    @property
    def selects(self) -> bool:
        return bool(self.splits)


def fold_of(labels: torch.Tensor, folds: int) -> list[int]:
    """The fold of each image: within a class, the i-th image (in draw order) goes to fold i % folds."""
    seen: dict[int, int] = {}
    out = []
    for label in labels.tolist():
        out.append(seen.get(label, 0) % folds)
        seen[label] = seen.get(label, 0) + 1
    return out


def make_plan(config: DataConfig, data: FewShotSplit) -> ValidationPlan:
    """`data`: the K shots per class (and, for holdout, the K_val validation images)."""
    if config.validation == "holdout":
        return ValidationPlan("holdout", [data], data.train + data.val if config.refit else None, config.labels_per_class)
    shots = data.train
    if not config.selects:
        return ValidationPlan("fixed", [], shots, config.labels_per_class)
    folds = fold_of(shots.labels, config.n_folds)
    splits = [
        FewShotSplit(shots.subset([i for i, f in enumerate(folds) if f != k]), shots.subset([i for i, f in enumerate(folds) if f == k]))
        for k in range(config.n_folds)
    ]
    return ValidationPlan("kfold", splits, shots, config.labels_per_class)


def grid_point(config: StudyConfig, shots: int, seed: int, method: str | None = None) -> StudyConfig:
    """`compare`'s grid point: K shots, the seed, and the same budget rule at every K (holdout:
    K_val from `compare.val_shots`; kfold: no more folds than shots), with a space that draws
    `method` only."""
    data = config.data.model_dump()
    data.update(shots=shots, seed=seed)
    if data["validation"] == "holdout":
        data["val_shots"] = shots if config.compare.val_shots == "shots" else config.compare.val_shots
    elif data["folds"] is not None:
        data["folds"] = min(data["folds"], shots) if shots >= 2 else None
    variant = config.model_copy(deep=True, update={"data": DataConfig.model_validate(data)})
    if method is not None:
        variant.search.params["method"] = Choices(choices=[method])
        variant.search.enqueue = [entry for entry in variant.search.enqueue if entry.get("method", method) == method]
    return variant


def mean_curve(histories: list[list[EpochMetrics]]) -> list[EpochMetrics]:
    """The folds' mean curve, over the epochs every fold reached (`fold` None: the trial's own)."""
    return [EpochMetrics(epoch[0].epoch, *(sum(getattr(m, k) for m in epoch) / len(epoch)
                                           for k in ("train_loss", "val_loss", "val_balanced_accuracy")))
            for epoch in zip(*histories)]


def stop_together(histories: list[list[EpochMetrics]], patience: int | None) -> bool:
    """Whether folds trained in lockstep stop now: `patience` epochs after the best epoch of their
    *mean* curve (`best_epoch`). Asked after every epoch, so they stop the first time it holds."""
    return patience is not None and min(len(h) for h in histories) - best_epoch(histories) >= patience


def best_epoch(histories: list[list[EpochMetrics]]) -> int:
    """The epoch (1-based) with the highest fold-mean validation balanced accuracy, among the epochs
    every fold reached; the lower mean validation loss, then the earlier epoch, break ties (`epoch_rank`)."""
    return min(mean_curve(histories), key=epoch_rank).epoch


def cross_fitted_epochs(histories: list[list[EpochMetrics]]) -> list[int]:
    """For each fold, the epoch at which it is scored: the one the *other* folds' mean curve picks
    (`best_epoch`), never the fold's own best; so no fold's score includes choosing its own epoch,
    and the fold mean estimates how the trial's refit, trained for `best_epoch` of all folds, does on
    images that chose nothing. Only the epochs every fold reached count."""
    epochs = min(len(h) for h in histories)
    return [best_epoch([h[:epochs] for j, h in enumerate(histories) if j != k]) for k in range(len(histories))]


def score_window(validations: list[Metrics], epoch: int) -> Metrics:
    """The score of a run at `epoch` (1-based): balanced accuracy and loss averaged over that epoch
    and SCORE_RADIUS epochs either side among its validated epochs; per-class recall and confusion
    matrix are `epoch`'s own."""
    window = validations[max(0, epoch - 1 - SCORE_RADIUS):epoch + SCORE_RADIUS]
    return replace(validations[epoch - 1],
                   balanced_accuracy=float(sum(m.balanced_accuracy for m in window) / len(window)),
                   loss=float(sum(m.loss for m in window) / len(window)))
