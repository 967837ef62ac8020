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
from hpo_peft.errors import UserError
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


def distributions(config: StudyConfig) -> dict[str, tuple[str, optuna.distributions.BaseDistribution]]:
    """Each parameter the space can draw, by Optuna's name: the config key that defines it and its
    distribution (what a continued study must keep compatible)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def distribution(spec: Any):
        if isinstance(spec, Choices):
            return CategoricalDistribution(spec.choices)
        if isinstance(spec, Range) and spec.is_int:
            return IntDistribution(int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        if isinstance(spec, Range):
            return FloatDistribution(float(spec.low), float(spec.high), step=spec.step, log=spec.log)
        return None

    found = {key: (f"search.params.{key}", distribution(spec)) for key, spec in config.search.params.items()}
    for method, own in config.search.methods.items():
        found |= {f"{method}.{key}": (f"search.methods.{method}.{key}", distribution(spec)) for key, spec in own.items()}
    return {name: (key, dist) for name, (key, dist) in found.items() if dist is not None}


def check_space(study: optuna.Study, config: StudyConfig, study_name: str) -> None:
    """Optuna cannot continue a study whose parameter changes kind or whose choices change (every
    later trial would fail at once): refused naming the key, before anything loads."""
    from optuna.distributions import check_distribution_compatibility

    space, seen = distributions(config), set()
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            if name in seen or name not in space:
                continue
            seen.add(name)
            key, new = space[name]
            try:
                check_distribution_compatibility(old, new)
            except ValueError:
                then = list(old.choices) if hasattr(old, "choices") else type(old).__name__
                now = list(new.choices) if hasattr(new, "choices") else type(new).__name__
                raise UserError(f"{key}: study {study_name!r} drew it from {then}, the config now from {now}; "
                                f"Optuna cannot continue a study whose choices change, even with --accept-changes: "
                                f"start a new study with --study-name {study_name}-2") from None
