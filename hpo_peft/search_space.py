"""The YAML search space turned into `trial.suggest_*` calls.

`search.params` holds `method` and the training keys shared by all methods; `search.methods.<name>`
holds one method's own space (its options, and training keys it searches on its own), suggested
only in trials that drew it (so e.g. `lora.rank` is absent from a bias trial). A bare value in the
space is fixed: recorded with the trial, never searched.

A trial's training settings, each layer over the one before:
`train` < shared `search.params` < the method's defaults `method_train.<name>` < `search.methods.<name>`.
So a method keeps its own defaults (e.g. the course's SGD for black-box adapters) for every key its
own space does not name; a shared key is only drawn for methods without a default for it, and
`augment` only for methods whose encoder sees the images (`train_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from hpo_peft.config import (
    SEARCHABLE_TRAIN_KEYS,
    Choices,
    Range,
    StudyConfig,
    TrainConfig,
)
from hpo_peft.methods import get_method, method_config


@dataclass
class TrialPlan:
    method: str
    method_options: dict[str, Any]
    train: TrainConfig

    def params(self) -> dict[str, Any]:
        """Every sampled and fixed value of the trial, flat, for tracking."""
        return {
            "method": self.method,
            **{f"train.{k}": v for k, v in self.train.model_dump().items()},
            **{f"{self.method}.{k}": v for k, v in self.method_options.items()},
        }


def suggest(trial: optuna.Trial, name: str, spec: Any) -> Any:
    if isinstance(spec, Choices):
        return trial.suggest_categorical(name, spec.choices)
    if isinstance(spec, Range):
        if spec.is_int:
            return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=spec.log)
    return spec


def sample_plan(trial: optuna.Trial, config: StudyConfig) -> TrialPlan:
    search = config.search
    method = suggest(trial, "method", search.params.get("method", config.method.name))
    own = search.methods.get(method, {})
    defaults = config.method_train.get(method, {})
    shared = {} if not get_method(method).trains else search.params  # nothing to train: nothing to draw
    unused = {"method"} | (set() if get_method(method).trains_encoder else {"augment"})  # frozen features: no images
    train_values = {key: suggest(trial, key, spec) for key, spec in shared.items()
                    if key not in unused and key not in defaults and key not in own}
    options = dict(config.methods.get(method, {}))
    for key, spec in own.items():
        value = suggest(trial, f"{method}.{key}", spec)
        if key in SEARCHABLE_TRAIN_KEYS:
            train_values[key] = value
        else:
            options[key] = value
    return TrialPlan(method, method_config(method, options).model_dump(), train_settings(config, method, **train_values))


def train_settings(config: StudyConfig, method: str, **values: Any) -> TrainConfig:
    """`config.train_for(method, **values)`, with `augment` none for a method on frozen features
    (black-box adapters, zero-shot): they never see an image, so their runs record none."""
    train = config.train_for(method, **values)
    return train if get_method(method).trains_encoder else train.model_copy(update={"augment": "none"})
