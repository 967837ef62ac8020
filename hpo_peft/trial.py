"""One trial of one method with fixed hyper-parameters, validated as `data.validation` says
(validation.py): what the `trial` command and every study trial run. Knows nothing of Optuna or
MLflow: the study calls it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from hpo_peft.config import StudyConfig, TrainConfig
from hpo_peft.data import FewShotSplit, few_shot_rows, load_few_shot
from hpo_peft.evaluate import Metrics, compute_metrics, predict_logits
from hpo_peft.features import FeatureCache
from hpo_peft.methods import get_method, method_config
from hpo_peft.model import (
    BaseModel,
    ImageClassifier,
    build_classifier,
    count_trainable,
    load_base_model,
    text_prototypes,
)
from hpo_peft.runtime import amp_dtype, resolve_device, set_seeds
from hpo_peft.train import EpochMetrics, TrainResult, train
from hpo_peft.validation import (
    ValidationPlan,
    best_epoch,
    cross_fitted_epochs,
    make_plan,
    score_window,
    stopped_together,
)


@dataclass
class Workspace:
    """What a process loads once and every trial shares (never trained in place)."""

    config: StudyConfig
    base: BaseModel
    prototypes: torch.Tensor
    data: FewShotSplit  # the K shots per class (train) and, for holdout, the validation images
    features: FeatureCache
    plan: ValidationPlan  # how trials validate within those labels


def open_workspace(config: StudyConfig, base: BaseModel | None = None) -> Workspace:
    """Everything a trial needs; `base` may be shared by several workspaces (e.g. per shot count)."""
    few_shot_rows(config.data)  # bad tables fail before the (slow) model load
    if base is None:
        base = load_base_model(config.model)
    prototypes = text_prototypes(base, config.prompts, config.data.categories)
    device = resolve_device(config.train.device)
    base.image_encoder().to(device)  # the text tower stays where it is: it is only used above
    data = load_few_shot(config.data, base.preprocessing)
    features = FeatureCache(
        base.image_encoder(), f"{base.name_or_path}@{base.revision}#{base.fingerprint()}", base.preprocessing,
        config.train.eval_batch_size, amp_dtype(config.train.precision, device), config.feature_cache,
    )
    return Workspace(config, base, prototypes.to(device), data, features, make_plan(config.data, data))


@dataclass
class TrialOutcome:
    classifier: ImageClassifier  # the adapter the trial keeps
    method: str
    method_options: dict[str, Any]
    train_config: TrainConfig
    trainable_parameters: int
    training: TrainResult  # holdout: the run; kfold: the refit on all shots
    validation: Metrics  # the selection score: around holdout's best epoch, or the mean over folds (score_window)
    seconds: float
    scheme: str
    labels_per_class: int
    folds: list[TrainResult] = field(default_factory=list)  # kfold: one per fold
    selected_epoch: int | None = None  # the epoch of the kept weights (holdout's best, kfold's refit length)
    scored_epochs: list[int] = field(default_factory=list)  # kfold: the epoch each fold is scored at
    fold_validations: list[Metrics] = field(default_factory=list)  # kfold: each fold's score there

    def fold_scores(self) -> list[float]:
        """kfold: each fold's validation balanced accuracy around the epoch it is scored at."""
        return [m.balanced_accuracy for m in self.fold_validations]

    def mean_history(self) -> list[EpochMetrics]:
        """kfold: per epoch, the mean over the folds that reached it."""
        curves = [f.history for f in self.folds]
        out = []
        for epoch in range(1, max((len(c) for c in curves), default=0) + 1):
            seen = [c[epoch - 1] for c in curves if len(c) >= epoch]
            out.append(EpochMetrics(epoch, *(float(np.mean([getattr(m, k) for m in seen]))
                                             for k in ("train_loss", "val_loss", "val_balanced_accuracy"))))
        return out


def pooled(metrics: list[Metrics]) -> Metrics:
    """One validation result from the folds': mean balanced accuracy and loss (the score), and the
    summed confusion matrix (every shot validated once) for per-class recall and the figure."""
    confusion = np.sum([m.confusion for m in metrics], axis=0)
    recall = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    categories = metrics[0].categories
    return Metrics(
        balanced_accuracy=float(np.mean([m.balanced_accuracy for m in metrics])),
        loss=float(np.mean([m.loss for m in metrics])),
        per_class_recall={c: 100.0 * float(r) for c, r in zip(categories, recall)},
        confusion=confusion.tolist(),
        categories=categories,
    )


def run_trial(
    workspace: Workspace,
    method_name: str,
    method_options: dict[str, Any],
    train_config: TrainConfig,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
    on_fold: Callable[[int, float], None] | None = None,
) -> TrialOutcome:
    """Train (once for holdout, once per fold and a refit for kfold) and score on validation.
    `on_epoch(metrics)` sees every validated epoch (`metrics.fold`: None for holdout); `on_fold(k, mean_so_far)`
    the running fold mean after each fold: the study reports and prunes through them."""
    started = time.perf_counter()
    plan, seed = workspace.plan, workspace.config.data.seed
    method = get_method(method_name)
    options = method_config(method_name, method_options)
    categories = workspace.config.data.categories

    def fresh() -> ImageClassifier:
        set_seeds(seed)  # the same initialisation (e.g. a linear probe's) every run
        return method.prepare(build_classifier(workspace.base, workspace.prototypes), options)

    def fit(classifier, split, config, fold=None) -> TrainResult:
        hook = None if on_epoch is None or split.val is None else on_epoch if fold is None else (
            lambda m: on_epoch(replace(m, fold=fold)))
        return train(classifier, split, workspace.base.preprocessing, categories, config, seed, hook, progress,
                     features=workspace.features)

    classifier, folds, scores, selected, scored = fresh(), [], [], None, []
    trainable = count_trainable(classifier)
    if not method.trains:  # zero-shot: nothing to fit, score it on each validation split
        classifier.to(resolve_device(train_config.device))
        dtype = amp_dtype(train_config.precision, next(classifier.parameters()).device)
        for split in plan.splits:
            logits = predict_logits(classifier.head, workspace.features(split.val), None, train_config.eval_batch_size, dtype)
            scores.append(compute_metrics(logits, split.val.labels, categories))
        result = TrainResult(best=None)
    elif plan.scheme == "holdout":
        result = fit(classifier, plan.splits[0], train_config)
        scores, selected = [score_window(result.validations, result.best.epoch)], result.best.epoch
    else:
        for k, split in enumerate(plan.splits):  # patience applies to the folds' mean curve, below
            folds.append(fit(fresh(), split, train_config.model_copy(update={"patience": None}), fold=k))
            if on_fold is not None:  # the pruner's view: the running mean of the folds' best epochs
                on_fold(k, float(np.mean([f.best.val_balanced_accuracy for f in folds])))
        # none for `fixed`: its settings run for max_epochs
        histories = stopped_together([f.history for f in folds], train_config.patience) if folds else []
        scored = cross_fitted_epochs(histories) if folds else []
        scores = [score_window(f.validations, e, len(h)) for f, e, h in zip(folds, scored, histories)]
        selected = best_epoch(histories) if folds else train_config.max_epochs
        classifier = fresh()
        result = fit(classifier, FewShotSplit(plan.refit, None),
                     train_config.model_copy(update={"max_epochs": selected, "patience": None}))
    return TrialOutcome(
        classifier=classifier,
        method=method_name,
        method_options=options.model_dump(),
        train_config=train_config,
        trainable_parameters=trainable,
        training=result,
        validation=scores[0] if len(scores) == 1 else pooled(scores) if scores else None,
        seconds=time.perf_counter() - started,
        scheme=plan.scheme,
        labels_per_class=plan.labels_per_class,
        folds=folds,
        selected_epoch=selected,
        scored_epochs=scored,
        fold_validations=scores if folds else [],
    )
