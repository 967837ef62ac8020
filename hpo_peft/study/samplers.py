"""Optuna sampler and pruner from the config's `search.sampler` / `search.pruner` mappings.

Every trial draws with its own random generator, seeded from the study's seed (`seed` in the
sampler mapping, default `data.seed`) and the trial's number. So `--jobs` workers, separate
commands on one study and resumed sessions never replay each other's draws (a sampler seeded once
per process would: each process starts the same generator), while a study run again from scratch
with the same seed draws the same values. QMC is the exception: its seed scrambles one shared
low-discrepancy sequence that the trial number already indexes, so it keeps the study's seed.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable

import optuna
from optuna.samplers import BaseSampler

from hpo_peft.core.config import StudyConfig
from hpo_peft.core.errors import UserError
from hpo_peft.study.search_space import epochs_bound

SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "nsgaii": "NSGAIISampler",
    "bruteforce": "BruteForceSampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "patient": "PatientPruner",
    "wilcoxon": "WilcoxonPruner",
    "none": "NopPruner",
}
SHARED_SEED = {"QMCSampler"}


def trial_seed(study_seed: int, number: int) -> int:
    """A 32-bit seed for one trial, the same on every machine and in every process."""
    return int.from_bytes(hashlib.sha256(f"{study_seed}:{number}".encode()).digest()[:4], "little")


class PerTrialSeed(BaseSampler):
    """Wraps a sampler so that each trial is drawn by a fresh instance seeded for that trial."""

    def __init__(self, make: Callable[[int], BaseSampler], study_seed: int):
        self._make, self.study_seed = make, study_seed
        self._current = make(study_seed)

    def before_trial(self, study, trial) -> None:
        self._current = self._make(trial_seed(self.study_seed, trial.number))
        self._current.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._current.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._current.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._current.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._current.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seeds come from the trial numbers
        pass


def _build(registry: dict[str, str], module, spec: dict[str, Any], key: str, **defaults):
    name = spec["name"]
    class_name = registry.get(name, name)
    cls = getattr(module, class_name, None)
    if cls is None or not isinstance(cls, type):
        raise UserError(f"{key}.name: unknown {key.split('.')[-1]} {name!r}; known: {', '.join(registry)}")
    kwargs = {**defaults, **{k: v for k, v in spec.items() if k != "name"}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # TPE's multivariate/group
            return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"{key}: cannot build {class_name} with {kwargs}: {err}") from None


def make_sampler(config: StudyConfig) -> BaseSampler:
    spec = dict(config.search.sampler)
    study_seed = spec.pop("seed", config.data.seed)
    class_name = SAMPLERS.get(spec["name"], spec["name"])
    defaults = {"multivariate": True, "group": True} if class_name == "TPESampler" else {}

    def make(seed: int) -> BaseSampler:
        return _build(SAMPLERS, optuna.samplers, spec, "search.sampler", seed=seed, **defaults)

    if class_name in SHARED_SEED:
        return make(study_seed)
    return PerTrialSeed(make, study_seed)


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The epoch is the step every pruner sees. Hyperband's resource is epochs too: `max_resource`,
    unless given, is the most epochs a trial of the space can train (Optuna's `auto` would wait for
    a first complete trial, which early stopping may end well short of it); `min_resource` keeps
    Optuna's 1 (rungs at epochs 1, 3, 9, ... for reduction_factor 3) unless given."""
    spec = dict(config.search.pruner)
    if PRUNERS.get(spec["name"], spec["name"]) == "HyperbandPruner" and "max_resource" not in spec:
        spec["max_resource"] = max(epochs_bound(config), int(spec.get("min_resource", 1)))
    return _build(PRUNERS, optuna.pruners, spec, "search.pruner")
