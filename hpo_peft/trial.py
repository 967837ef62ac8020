"""One training run of one method with fixed hyper-parameters: what the course notebook does, and
what every study trial does. Knows nothing of Optuna or MLflow: the study calls it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

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
from hpo_peft.train import (
    EpochMetrics,
    TrainResult,
    amp_dtype,
    resolve_device,
    set_seeds,
    train,
)


@dataclass
class Workspace:
    """What a process loads once and every trial shares (never trained in place)."""

    config: StudyConfig
    base: BaseModel
    prototypes: torch.Tensor
    data: FewShotSplit
    features: FeatureCache


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
    return Workspace(config, base, prototypes.to(device), data, features)


@dataclass
class TrialOutcome:
    classifier: ImageClassifier
    method: str
    method_options: dict[str, Any]
    train_config: TrainConfig
    trainable_parameters: int
    training: TrainResult
    validation: Metrics
    seconds: float


def run_trial(
    workspace: Workspace,
    method_name: str,
    method_options: dict[str, Any],
    train_config: TrainConfig,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
) -> TrialOutcome:
    started = time.perf_counter()
    set_seeds(workspace.config.data.seed)  # the same initialisation (e.g. a linear probe's) every run
    method = get_method(method_name)
    options = method_config(method_name, method_options)
    classifier = method.prepare(build_classifier(workspace.base, workspace.prototypes), options)
    trainable = count_trainable(classifier)
    categories = workspace.config.data.categories
    prep = workspace.base.preprocessing
    if method.trains:
        result = train(
            classifier, workspace.data, prep, categories, train_config, workspace.config.data.seed,
            on_epoch, progress, features=workspace.features,
        )
    else:
        classifier.to(resolve_device(train_config.device))
        result = TrainResult(best=None)
    validation = result.best_validation  # the restored weights are the best epoch's: already scored
    if validation is None:  # nothing trained
        dtype = amp_dtype(train_config.precision, next(classifier.parameters()).device)
        logits = predict_logits(classifier.head, workspace.features(workspace.data.val), None, train_config.eval_batch_size, dtype)
        validation = compute_metrics(logits, workspace.data.val.labels, categories)
    return TrialOutcome(
        classifier=classifier,
        method=method_name,
        method_options=options.model_dump(),
        train_config=train_config,
        trainable_parameters=trainable,
        training=result,
        validation=validation,
        seconds=time.perf_counter() - started,
    )
