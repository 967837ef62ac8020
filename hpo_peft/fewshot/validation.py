"""How a trial is validated, within the labels the user has (`data.validation`; the label budget).

- `holdout`: K training shots and K_val more validation images per class (budget K + K_val). A
  trial trains once, stops early on the validation images and keeps its best epoch. With
  `data.refit` the adapter it keeps is instead trained again, without validation, on all K + K_val
  images for that many epochs: every label the user paid for then trains the adapter, and the
  selection score is that of the run on K shots, not of the adapter kept (as with kfold's refit).
- `kfold`: validation inside the K shots (budget K). Each class's shots are dealt in turn into
  `folds` folds, so every fold holds the same number of each class. A trial trains once per fold on
  the other folds and validates on it every epoch; the folds train in lockstep (`train.drive`) and stop
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

`protocol: course` is not a scheme here: it validates and selects nothing, and it draws its shots,
decodes its images and batches them as the course notebook does (course.py), so it has no plan,
runs or score to give a trial; its loop stays the notebook's (a DataLoader's batches, the last
epoch's weights) because its one purpose is to reproduce that run draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch

from hpo_peft.core.config import Choices, DataConfig, StudyConfig
from hpo_peft.data import FewShotSplit, LabelledImages
from hpo_peft.fewshot.evaluate import Metrics
from hpo_peft.fewshot.settings import TrialSettings
from hpo_peft.fewshot.train import (  # noqa: F401  (the folds' curve and stop rule: re-exported)
    EpochMetrics,
    Training,
    TrainResult,
    best_epoch,
    drive,
    mean_curve,
    stop_together,
    train,
)

SCORE_RADIUS = 1  # a score averages the chosen epoch and this many epochs either side


@dataclass
class Runs:
    """What a scheme's validated runs give the trial: holdout's run (and the classifier it trained),
    or kfold's folds, with the selection scores, the epoch the kept weights come from, and the epoch
    each fold is scored at."""

    result: TrainResult | None = None
    classifier: Any = None  # holdout's trained classifier, the adapter kept unless a refit replaces it
    folds: list[TrainResult] = field(default_factory=list)
    scores: list[Metrics] = field(default_factory=list)
    selected: int | None = None
    scored: list[int] = field(default_factory=list)


@dataclass
class Trainer:
    """How the scheme's runs train: a fresh prepared classifier each, and what `train.train` needs."""

    fresh: Callable[[], Any]  # () -> a newly prepared classifier, the same initialisation each time
    prep: Any
    categories: list[str]
    settings: TrialSettings  # the trial's, resolved once: training config, device, autocast
    seed: int
    features: Callable | None
    on_epoch: Callable[[EpochMetrics], None] | None = None
    progress: bool = True


class Scheme:
    """One way to validate inside the label budget (module docstring): how its runs train and are
    scored, and what the records say of it. Scheme names are compared nowhere else."""

    name: ClassVar[str]
    folds_are_scored: ClassVar[bool] = False  # the score is a mean over folds (each fold's kept)
    refit_is_training: ClassVar[bool] = True  # the kept adapter's training is the refit (holdout keeps its run's)

    def plan(self, config: DataConfig, data: FewShotSplit) -> "ValidationPlan":
        """The runs it validates with and what the kept adapter finally trains on, from the drawn labels."""
        raise NotImplementedError

    def runs(self, plan: "ValidationPlan", trainer: Trainer) -> Runs:
        raise NotImplementedError

    def score_note(self) -> str:
        return " (mean over folds)" if self.folds_are_scored else ""

    def kept_epoch(self, refit: bool) -> str:
        return ("best validation epoch; adapter refit on all labels for as many epochs" if refit else
                "best validation epoch, weights kept")

    def budget(self, data: DataConfig) -> str:
        refit = "; adapter refit on all of them for the best epoch" if data.refit else ""
        return (f"{data.shots} training + {data.val_shots} validation images per class "
                f"({data.labels_per_class} labels per class; early stopping on the validation images{refit})")

    def describe(self, outcome) -> list[str]:
        """The `trial` command's lines on how the kept adapter was chosen and trained."""
        return []

    def score_where(self, refit: bool) -> str:
        return "the best epoch and its neighbours" + (", in the run before the refit" if refit else "")


class Holdout(Scheme):
    name = "holdout"
    refit_is_training = False

    def plan(self, config: DataConfig, data: FewShotSplit) -> "ValidationPlan":
        return ValidationPlan(self, [data], data.train + data.val if config.refit else None, config.labels_per_class)

    def runs(self, plan: "ValidationPlan", trainer: Trainer) -> Runs:
        classifier = trainer.fresh()
        result = train(classifier, plan.splits[0], trainer.prep, trainer.categories, trainer.settings.train,
                       trainer.seed, trainer.on_epoch, trainer.progress, features=trainer.features,
                       placement=trainer.settings.placement)
        return Runs(result, classifier, scores=[score_window(result.validations, result.best.epoch)],
                    selected=result.best.epoch)

    def describe(self, outcome) -> list[str]:
        if outcome.training.best is None:
            return []
        return [f"best epoch {outcome.selected_epoch} (early stop: {outcome.training.stopped_early})"
                + (f"; adapter refit on all {outcome.labels_per_class} labels/class for as many epochs" if outcome.refit else "")]


class KFold(Scheme):
    name = "kfold"
    folds_are_scored = True

    def plan(self, config: DataConfig, data: FewShotSplit) -> "ValidationPlan":
        shots, k = data.train, config.n_folds
        folds = fold_of(shots.labels, k)
        splits = [FewShotSplit(shots.subset([i for i, f in enumerate(folds) if f != j]),
                               shots.subset([i for i, f in enumerate(folds) if f == j])) for j in range(k)]
        return ValidationPlan(self, splits, shots, config.labels_per_class)

    def runs(self, plan: "ValidationPlan", trainer: Trainer) -> Runs:
        config, placement = trainer.settings.train, trainer.settings.placement
        folds = drive([Training(trainer.fresh(), split, trainer.prep, trainer.categories, config, trainer.seed,
                                trainer.features, keep_best=False, placement=placement) for split in plan.splits],
                      config, trainer.on_epoch, trainer.progress)
        histories = [f.history for f in folds]
        scored = cross_fitted_epochs(histories)
        return Runs(folds=folds, scores=[score_window(f.validations, e) for f, e in zip(folds, scored)],
                    selected=best_epoch(histories), scored=scored)

    def kept_epoch(self, refit: bool) -> str:
        return "refit length (the peak of the folds' mean curve)"

    def budget(self, data: DataConfig) -> str:
        return (f"{data.shots} labelled images per class, validated inside them by {data.n_folds}-fold "
                "cross-validation (adapter refit on all shots for the epoch where the folds' mean curve peaks)")

    def describe(self, outcome) -> list[str]:
        if not outcome.folds:  # a method that trains nothing: scored on each fold
            return [f"{len(outcome.fold_validations)} folds scored; nothing trains, so nothing is refit"]
        return [f"{len(outcome.folds)} folds; adapter refit on all {outcome.labels_per_class} shots/class for "
                f"{outcome.selected_epoch} epochs (the folds' mean curve's best epoch)"]

    def score_where(self, refit: bool) -> str:
        return "mean over folds, each around the epoch the other folds pick"


class Fixed(Scheme):
    """Too few shots to hold any out: the method's fixed settings train on all K shots for `max_epochs`."""

    name = "fixed"

    def plan(self, config: DataConfig, data: FewShotSplit) -> "ValidationPlan":
        return ValidationPlan(self, [], data.train, config.labels_per_class)

    def runs(self, plan: "ValidationPlan", trainer: Trainer) -> Runs:
        return Runs(selected=trainer.settings.train.max_epochs)


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (Holdout(), KFold(), Fixed())}


def scheme_of(config: DataConfig) -> Scheme:
    """The scheme `data.validation` asks for, or `fixed` where its shots are too few to validate."""
    return SCHEMES[config.validation] if config.selects else SCHEMES["fixed"]


@dataclass(frozen=True)
class ValidationPlan:
    scheme: Scheme
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
    return scheme_of(config).plan(config, data)


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
    matrix are `epoch`'s own; the class probabilities are the window's mean (an ensemble's
    out-of-fold score averages its members', tracking/selection.py)."""
    window = validations[max(0, epoch - 1 - SCORE_RADIUS):epoch + SCORE_RADIUS]
    probabilities = [m.probabilities for m in window if m.probabilities is not None]
    return replace(validations[epoch - 1],
                   balanced_accuracy=float(sum(m.balanced_accuracy for m in window) / len(window)),
                   loss=float(sum(m.loss for m in window) / len(window)),
                   probabilities=torch.stack(probabilities).mean(dim=0) if len(probabilities) == len(window) else None)
