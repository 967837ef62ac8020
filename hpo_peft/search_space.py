"""The YAML search space turned into `trial.suggest_*` calls.

`search.params` holds `method` and training keys; `search.methods.<name>` holds that method's own
options, suggested only in trials that drew it (so e.g. `lora.rank` is absent from a bias trial).
A bare value in the space is fixed: recorded with the trial, never searched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from hpo_peft.config import Choices, Range, StudyConfig, TrainConfig
from hpo_peft.methods import method_config


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
    train_values = {key: suggest(trial, key, spec) for key, spec in search.params.items() if key != "method"}
    train = config.train_for(method, **train_values)
    options = dict(config.methods.get(method, {}))
    for option, spec in search.methods.get(method, {}).items():
        options[option] = suggest(trial, f"{method}.{option}", spec)
    return TrialPlan(method, method_config(method, options).model_dump(), train)


def check_space(config: StudyConfig) -> None:
    """Every method the space can draw exists, and every bound of its options is valid."""
    spec = config.search.params.get("method", config.method.name)
    methods = spec.choices if isinstance(spec, Choices) else [spec]
    for name in methods:
        method_config(name, config.methods.get(name), key="search.params.method" if name not in config.methods else "methods")
    for name, options in config.search.methods.items():
        method_config(name, {}, key="search.methods")
        for option, dist in options.items():
            bounds = dist.choices if isinstance(dist, Choices) else [dist.low, dist.high] if isinstance(dist, Range) else [dist]
            for value in bounds:
                method_config(name, {**config.methods.get(name, {}), option: value}, key="search.methods")
