"""The YAML search space turned into `trial.suggest_*` calls.

`search.params` holds `method` and the training keys shared by all methods; `search.methods.<name>`
holds one method's own space (its options, and training keys it searches on its own), suggested
only in trials that drew it (so e.g. `lora.rank` is absent from a bias trial). A bare value in the
space is fixed: recorded with the trial, never searched.

A trial's training settings, each layer over the one before:
`train` < shared `search.params` < the method's defaults `method_train.<name>` < `search.methods.<name>`.
So a method keeps its own defaults (e.g. the course's SGD for black-box adapters) for every key its
own space does not name; a shared key is only drawn for methods without a default for it, and
`augment` only for methods whose encoder sees the images (`fewshot.settings.merged_train`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import optuna

from hpo_peft.core.config import (
    SEARCHABLE_TRAIN_KEYS,
    Choices,
    Range,
    StudyConfig,
    TrainConfig,
)
from hpo_peft.study import identity
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.settings import merged_train
from hpo_peft.methods import get_method, method_config
from hpo_peft.study.portfolio import PORTFOLIO


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


def shared_space(config: StudyConfig, method: str) -> dict[str, Any]:
    """The shared `search.params` keys a trial of `method` draws: none for a method that trains
    nothing, no `augment` for one on frozen features, none the method's defaults or own space set."""
    own, defaults = config.search.methods.get(method, {}), config.method_train.get(method, {})
    shared = {} if not get_method(method).trains else config.search.params  # nothing to train: nothing to draw
    unused = {"method"} | (set() if get_method(method).trains_encoder else {"augment"})  # frozen features: no images
    return {key: spec for key, spec in shared.items() if key not in unused and key not in defaults and key not in own}


def searches(config: StudyConfig, method: str) -> bool:
    """A trial of `method` draws something: a shared key, or one of its own space."""
    own = config.search.methods.get(method, {}).values()
    return any(isinstance(spec, (Choices, Range)) for spec in [*shared_space(config, method).values(), *own])


def sample_plan(trial: optuna.Trial, config: StudyConfig) -> TrialPlan:
    search = config.search
    method = suggest(trial, "method", search.params.get("method", config.method.name))
    own = search.methods.get(method, {})
    train_values = {key: suggest(trial, key, spec) for key, spec in shared_space(config, method).items()}
    options = dict(config.methods.get(method, {}))
    for key, spec in own.items():
        value = suggest(trial, f"{method}.{key}", spec)
        if key in SEARCHABLE_TRAIN_KEYS:
            train_values[key] = value
        else:
            options[key] = value
    return TrialPlan(method, method_config(method, options).model_dump(), merged_train(config, method, **train_values))


# a PEFT method's prior settings (the encoder trains): the course's Adam, 1e-3, 20 epochs, batch 32
COURSE_PEFT = {"optimizer": "adam", "learning_rate": 1e-3, "max_epochs": 20, "batch_size": 32, "weight_decay": 0.0}


def methods_drawn(config: StudyConfig) -> list[str]:
    spec = config.search.params.get("method", config.method.name)
    return list(spec.choices) if isinstance(spec, Choices) else [spec]


def clip(spec: Any, value: Any) -> Any:
    """`value` made one the space can draw: into a Range (the nearest bound; on its step grid, an
    integer for an integer range), or for Choices the listed value nearest it (numbers), else the first."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(spec, Range):
        value = min(max(value if number else spec.low, spec.low), spec.high)
        if spec.step:
            steps = min(round((value - spec.low) / spec.step), int((spec.high - spec.low) / spec.step + 1e-9))
            value = round(spec.low + steps * spec.step, 12)  # on the grid, without float residue
        return int(round(value)) if spec.is_int else float(value)
    if isinstance(spec, Choices):
        if any(value == c and type(value) is type(c) for c in spec.choices):
            return value
        numbers = [c for c in spec.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        return min(numbers, key=lambda c: abs(c - value)) if number and numbers else spec.choices[0]
    return spec


def prior_entry(config: StudyConfig, method: str) -> dict[str, Any]:
    """One trial of `method` at its prior settings, named as the space names them and clipped into
    it: a PEFT method the course's (COURSE_PEFT) unless `method_train` sets them, a black-box
    adapter its `method_train` defaults over `train`, method options as `methods.<name>` (else the
    method's defaults, e.g. LoRA rank 4, B zeros). Only what the space draws: a fixed key is no parameter."""
    return entry_at(config, method, {})


def entry_at(config: StudyConfig, method: str, values: dict[str, Any]) -> dict[str, Any]:
    """One trial of `method` named as the space names its parameters and clipped into it: `values`
    (bare keys: learning_rate, max_epochs, rank, ...) where given, the method's prior settings elsewhere."""
    prior = config.train_for(method).model_dump()
    if get_method(method).trains_encoder:  # PEFT: the course's settings, but for those method_train sets
        prior |= {key: value for key, value in COURSE_PEFT.items() if key not in config.method_train.get(method, {})}
    options = method_config(method, config.methods.get(method, {})).model_dump()
    drawn = {key: (spec, values.get(key, prior[key])) for key, spec in shared_space(config, method).items()}
    for key, spec in config.search.methods.get(method, {}).items():
        drawn[f"{method}.{key}"] = (spec, values.get(key, prior[key] if key in SEARCHABLE_TRAIN_KEYS else options.get(key)))
    entry = {"method": method} if isinstance(config.search.params.get("method"), Choices) else {}
    searched = {name: (spec, value) for name, (spec, value) in drawn.items() if isinstance(spec, (Choices, Range))}
    return entry | {name: clip(spec, value) for name, (spec, value) in searched.items()}


def race_entries(config: StudyConfig) -> list[dict[str, Any]]:
    """`search.start: race`: one trial per method the space draws at its prior settings (prior_entry),
    but for methods a `search.enqueue` entry already starts."""
    started = {entry.get("method") for entry in config.search.enqueue}
    return [prior_entry(config, method) for method in methods_drawn(config) if method not in started]


def portfolio_entries(config: StudyConfig) -> list[dict[str, Any]]:
    """`search.start: portfolio`: the package's portfolio (portfolio.py) taken into this study's space:
    entries of methods the space draws, their values clipped into it (entry_at), each once."""
    drawn, out = methods_drawn(config), []
    for values in PORTFOLIO:
        if values["method"] in drawn and (entry := entry_at(config, values["method"], values)) not in out:
            out.append(entry)
    return out


def first_trials(config: StudyConfig) -> list[dict[str, Any]]:
    """What a new study runs before its sampler: `search.enqueue`, then the race or the portfolio (`start`)."""
    start = {"race": race_entries, "portfolio": portfolio_entries}.get(config.search.start, lambda _: [])
    return [*config.search.enqueue, *start(config)]


def epochs_bound(config: StudyConfig) -> int:
    """The most epochs a trial of this space can train (a method's own space, else its defaults,
    else the shared space, else `train`): a pruner's maximum resource."""
    def highest(spec: Any) -> int:
        values = spec.choices if isinstance(spec, Choices) else [spec.high] if isinstance(spec, Range) else [spec]
        return max(int(v) for v in values)

    bounds = []
    for method in methods_drawn(config):
        own, shared = config.search.methods.get(method, {}), shared_space(config, method)
        spec = own.get("max_epochs", shared.get("max_epochs", config.train_for(method).max_epochs))
        bounds.append(highest(spec) if get_method(method).trains else 0)
    return max([1, *bounds])


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


def check_settings(study: optuna.Study, config: StudyConfig, study_name: str, accept_changes: bool = False) -> None:
    """The study was started with these settings (or `accept_changes` says the user means to change them)."""
    current, recorded = identity.fingerprint(config), study.user_attrs.get(identity.FINGERPRINT_ATTR)
    if recorded is None:
        return
    if (differ := identity.differences(recorded, current)) and accept_changes:
        print(f"continuing study {study_name!r} with changed settings: {', '.join(differ)}", file=sys.stderr)
    elif differ:
        first = differ[0]
        raise UserError(
            f"study {study_name!r} was started with other settings: {', '.join(differ[:6])}"
            f"{f' and {len(differ) - 6} more' if len(differ) > 6 else ''} differ (e.g. {first}: "
            f"{recorded.get(first, 'unset')} then, {current.get(first, 'unset')} now); continue it with its "
            f"own settings, start a new study with --study-name {study_name}-2, or pass --accept-changes"
        )
