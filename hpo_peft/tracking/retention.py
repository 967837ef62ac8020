"""Artifacts that fit on a disk: which completed trials keep their adapter (`search.keep_adapters`).

- `all`: every adapter is kept.
- `best:N`: the N best trials (by `selection.py`'s order) keep theirs; the others are dropped.
- default (null): every PEFT adapter is kept, and of the methods whose adapter is a whole copy of
  the vision tower (full fine-tuning, ~350 MB per trial for PLIP) only the best 3.

Never dropped: the study's best trial, its top `search.ensemble` trials (the members of the study's
ensemble, ensemble.py), and any trial whose run has a registered model version.
Applied after every trial (an Optuna callback), so a long study never holds more than it keeps.
A dropped adapter is deleted through MLflow's artifact repository and the run is tagged
`hpo_peft.adapter_dropped` with the reason; `evaluate` and `predict` then say so.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from optuna.trial import FrozenTrial, TrialState

from hpo_peft.core import interrupts
from hpo_peft.methods import METHODS
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.selection import ranked
from hpo_peft.tracking.tracker import ADAPTER_PATH, TAG_DROPPED, Tracker

DEFAULT_BACKBONE_COPIES = 3


def adapters_to_drop(trials: list[FrozenTrial], policy: str | None,
                     copies_backbone: Callable[[FrozenTrial], bool], ensemble: int = 1) -> dict[int, str]:
    """Trial number -> why its adapter goes, for the completed trials the policy does not keep.
    The best `ensemble` trials (at least the best one) are never among them."""
    completed = ranked(trials)
    if policy == "all" or not completed:
        return {}
    if policy is None:
        counted, keep = [t for t in completed if copies_backbone(t)], DEFAULT_BACKBONE_COPIES
        what = (f"search.keep_adapters default: only the best {keep} full fine-tunings (whole vision tower) "
                f"keep their adapter; this one ranks")
    else:
        counted, keep = completed, int(policy.split(":", 1)[1])
        what = f"search.keep_adapters={policy}: this trial ranks"
    drop = {t.number: f"{what} {rank} of {len(counted)} by the selection score"
            for rank, t in enumerate(counted, start=1) if rank > keep}
    for trial in completed[:max(1, ensemble)]:
        drop.pop(trial.number, None)
    return drop


def is_registered(tracker: Tracker, run_id: str) -> bool:
    with interrupts.deferred():
        return bool(tracker.client.search_model_versions(f"run_id = '{run_id}'", max_results=1))


def drop_adapter(tracker: Tracker, run_id: str, reason: str) -> bool:
    """Delete the run's adapter artifacts (MLflow's own artifact repository) and say why on the
    run; False when it is registered or was dropped already."""
    run = tracker.get_run(run_id)
    if TAG_DROPPED in run.data.tags or is_registered(tracker, run_id):
        return False
    with interrupts.deferred():
        try:
            get_artifact_repository(run.info.artifact_uri).delete_artifacts(ADAPTER_PATH)
        except (MlflowException, OSError, NotImplementedError) as err:  # a store that cannot delete: keep it, say so
            tracker.set_tags(run_id, {TAG_DROPPED + "_failed": f"{type(err).__name__}: {err}"[:500]})
            return False
    tracker.set_tags(run_id, {TAG_DROPPED: reason})
    return True


def enforce(study: optuna.Study, tracker: Tracker, policy: str | None, ensemble: int = 1) -> list[int]:
    """Apply the policy to the study's trials now; returns the trial numbers whose adapter went."""
    if policy == "all":
        return []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    run_ids = {t.number: t.user_attrs.get(RUN_ID_ATTR) for t in trials}

    def copies_backbone(trial: FrozenTrial) -> bool:
        name = trial.params.get("method")
        if name is None and run_ids[trial.number]:  # a fixed method is a run param, not a trial param
            name = tracker.get_run(run_ids[trial.number]).data.params.get("method")
        return name in METHODS and METHODS[name].copies_backbone

    dropped = []
    for number, reason in adapters_to_drop(trials, policy, copies_backbone, ensemble).items():
        if run_ids[number] and drop_adapter(tracker, run_ids[number], reason):
            dropped.append(number)
    return dropped


def callback(tracker: Tracker, policy: str | None, ensemble: int = 1):
    """`study.optimize(callbacks=[...])`: the policy applied after each trial that completed."""
    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            enforce(study, tracker, policy, ensemble)

    return after_trial
