"""One trial of one method with fixed hyper-parameters, validated as `data.validation` says
(validation.py): what the `trial` command and every study trial run. Knows nothing of Optuna or
MLflow: the study calls it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from hpo_peft.core.config import StudyConfig, TrainConfig
from hpo_peft.data import FewShotSplit, few_shot_rows, load_few_shot
from hpo_peft.fewshot.evaluate import Metrics, compute_metrics, forward_in_batches
from hpo_peft.fewshot.features import FeatureCache
from hpo_peft.methods import get_method
from hpo_peft.models.classifier import (
    BaseVLM,
    ImageClassifier,
    build_classifier,
    class_names,
    count_trainable,
    load_base_model,
    text_prototypes,
)
from hpo_peft.core.runtime import resolve_device, set_seeds
from hpo_peft.fewshot.settings import TrialSettings
from hpo_peft.fewshot.train import EpochMetrics, TrainResult, train
from hpo_peft.fewshot.validation import Runs, Scheme, Trainer, ValidationPlan, make_plan, mean_curve


@dataclass
class Workspace:
    """What a process loads once and every trial shares (never trained in place)."""

    config: StudyConfig
    base: BaseVLM
    prototypes: torch.Tensor
    data: FewShotSplit  # the K shots per class (train) and, for holdout, the validation images
    features: FeatureCache
    plan: ValidationPlan  # how trials validate within those labels

    def settings(self, method: str, options: dict[str, Any], train: TrainConfig) -> TrialSettings:
        """A trial's settings, resolved once before it trains: its options checked against this
        workspace's model family (one UserError line), its device and autocast."""
        return TrialSettings.resolve(method, options, train, self.base.family.encoder.module_names)


def open_workspace(config: StudyConfig, base: BaseVLM | None = None) -> Workspace:
    """Everything a trial needs; `base` may be shared by several workspaces (e.g. per shot count)."""
    few_shot_rows(config.data)  # bad tables fail before the (slow) model load
    if base is None:
        base = load_base_model(config.model)
    prototypes = text_prototypes(base, config.prompts, config.data.categories)
    device = resolve_device(config.train.device)  # the study's; a trial's settings may name their own
    base.image_encoder().to(device)  # the text tower stays where it is: it is only used above
    data = load_few_shot(config.data, base.preprocessing)
    features = FeatureCache(
        base.image_encoder(), f"{base.name_or_path}@{base.revision}#{base.fingerprint()}", base.preprocessing,
        config.train.eval_batch_size, directory=config.feature_cache,
    )
    return Workspace(config, base, prototypes.to(device), data, features, make_plan(config.data, data))


@dataclass
class TrialOutcome:
    classifier: ImageClassifier  # the adapter the trial keeps
    settings: TrialSettings  # what it ran: method, options, training config, device and autocast
    trainable_parameters: int
    training: TrainResult  # holdout: the validated run (with refit too); kfold: the refit on all shots
    validation: Metrics  # the selection score: around holdout's best epoch, or the mean over folds (score_window)
    seconds: float
    scheme: Scheme
    labels_per_class: int
    folds: list[TrainResult] = field(default_factory=list)  # kfold: one per fold
    selected_epoch: int | None = None  # the epoch of the kept weights (holdout's best, kfold's refit length)
    scored_epochs: list[int] = field(default_factory=list)  # kfold: the epoch each fold is scored at
    fold_validations: list[Metrics] = field(default_factory=list)  # kfold: each fold's score (zero-shot, Tip-Adapter too)
    refit: bool = False  # the kept adapter was trained again on all labels (kfold; holdout with data.refit)

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def method_options(self) -> dict[str, Any]:
        return self.settings.options.model_dump()

    @property
    def train_config(self) -> TrainConfig:
        return self.settings.train

    def fold_scores(self) -> list[float]:
        """kfold: each fold's validation balanced accuracy around the epoch it is scored at."""
        return [m.balanced_accuracy for m in self.fold_validations]

    def mean_history(self) -> list[EpochMetrics]:
        """kfold: the folds' mean curve (the folds train in lockstep: every one reaches every epoch)."""
        return mean_curve([f.history for f in self.folds])

    def adapter_metadata(self, shots: int, seed: int) -> dict[str, Any]:
        """What the kept adapter's metadata records of its training (artifacts.save_adapter's `extra`):
        predict runs it in the precision it trained in."""
        return {"train": self.train_config.model_dump(), "selected_epoch": self.selected_epoch,
                "data": {"shots": shots, "seed": seed, "validation": self.scheme.name,
                         "labels_per_class": self.labels_per_class, "refit": self.refit}}


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
) -> TrialOutcome:
    """Train (once for holdout; for kfold, its folds in lockstep, then a refit) and score on validation.
    `on_epoch(metrics)` sees every validated epoch: holdout's, and for kfold each fold's (`metrics.fold`
    0, 1, ...) then the folds' mean (`fold` None): the study logs them and prunes on the `fold` None ones.
    The trial's settings are resolved here, once (`Workspace.settings`), before anything trains."""
    started = time.perf_counter()
    settings = workspace.settings(method_name, method_options, train_config)
    plan, seed = workspace.plan, workspace.config.data.seed
    method, options, placement = get_method(method_name), settings.options, settings.placement
    categories = workspace.config.data.categories
    prep = workspace.base.preprocessing
    names = class_names(workspace.config.prompts, categories)

    def fresh() -> ImageClassifier:
        set_seeds(seed)  # the same initialisation (e.g. a linear probe's) every run
        return method.prepare(build_classifier(workspace.base, workspace.prototypes, names), options)

    def features(split):  # the frozen encoder's, in this trial's own precision (method_train.<m>.precision)
        return workspace.features(split, placement.dtype)

    if not method.trains:  # zero-shot, Tip-Adapter: nothing to fit, score it on each validation split
        classifier = fresh()
        runs = Runs(TrainResult(best=None), classifier)
        classifier.to(placement.device)
        for split in plan.splits:  # a head built from the shots (Tip-Adapter's cache) sees each split's own
            classifier.head.initialize_from_shots(features(split.train), split.train.labels)
            logits = forward_in_batches(classifier.head, features(split.val), None, settings.train.eval_batch_size,
                                    placement.dtype)
            runs.scores.append(compute_metrics(logits, split.val.labels, categories))
        kept = plan.refit if plan.refit is not None else plan.splits[0].train  # every label the trial may learn from
        classifier.head.initialize_from_shots(features(kept), kept.labels)
    else:  # the scheme's runs (holdout's one, kfold's folds in lockstep, none for fixed) choose the epochs
        runs = plan.scheme.runs(plan, Trainer(fresh, prep, categories, settings, seed, features, on_epoch, progress))
    classifier, result = runs.classifier, runs.result
    refits = plan.refit is not None and method.trains
    if refits:  # the runs above chose the epochs; the kept adapter trains on every label, without validation
        classifier = fresh()
        refit = train(classifier, FewShotSplit(plan.refit, None), prep, categories,
                      settings.train.model_copy(update={"max_epochs": runs.selected, "patience": None}), seed,
                      progress=progress, features=features, placement=placement)
        if plan.scheme.refit_is_training:  # kfold, fixed: the refit is the trial's training; holdout keeps its run's
            result = refit
    return TrialOutcome(
        classifier=classifier,
        settings=settings,
        trainable_parameters=count_trainable(classifier),  # after training: a head sized by the shots (Tip-Adapter-F)
        training=result,
        validation=runs.scores[0] if len(runs.scores) == 1 else pooled(runs.scores) if runs.scores else None,
        seconds=time.perf_counter() - started,
        scheme=plan.scheme,
        labels_per_class=plan.labels_per_class,
        folds=runs.folds,
        selected_epoch=runs.selected,
        scored_epochs=runs.scored,
        fold_validations=runs.scores if plan.scheme.folds_are_scored else [],  # trained or not: one per fold
        refit=refits,
    )

