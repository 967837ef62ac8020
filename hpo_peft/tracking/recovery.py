"""Keeping a study whole when workers die.

Every worker records who it is (host, pid) and a heartbeat on the trial it runs and on its MLflow
runs. A later `study run` treats a RUNNING trial or run as stale when its worker is gone (same
host, process no longer alive) or its heartbeat is older than the grace period (any host). A
stale trial is marked FAIL, its parameters are queued again once (a retry is not retried), and
its MLflow run is closed as KILLED, so no run stays RUNNING.

This works the same for every Optuna storage (the journal file has no heartbeat of its own).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo_peft.core import interrupts
from hpo_peft.core.runtime import worker_identity
from hpo_peft.tracking.tracker import (
    TAG_HEARTBEAT,
    TAG_TRIAL,
    TAG_WORKER_HOST,
    TAG_WORKER_PID,
    Tracker,
)

WORKER_ATTR = "worker"
HEARTBEAT_ATTR = "heartbeat"
RETRY_OF_ATTR = "retry_of"
RUN_ID_ATTR = "mlflow_run_id"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(worker: dict[str, Any] | None, heartbeat: float | None, grace_period: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    me = worker_identity()
    if worker and worker.get("host") == me["host"] and worker.get("pid") != me["pid"]:
        if not _process_alive(int(worker["pid"])):
            return True
    return heartbeat is not None and now - heartbeat > grace_period


class Heartbeat:
    """A background thread that marks this worker alive on its parent run and current trial."""

    def __init__(self, tracker: Tracker, parent_id: str | None, interval: float):
        self.tracker, self.parent_id, self.interval = tracker, parent_id, interval
        self.trial: optuna.Trial | None = None
        self.run_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hpo-peft-heartbeat", daemon=True)

    def attach(self, trial: optuna.Trial | None, run_id: str | None) -> None:
        self.trial, self.run_id = trial, run_id
        self.beat()

    def beat(self) -> None:
        now = time.time()
        try:
            if self.trial is not None:
                with interrupts.deferred():  # the journal is written whole
                    self.trial.set_user_attr(HEARTBEAT_ATTR, now)
            for run_id in (self.parent_id, self.run_id):
                if run_id:
                    self.tracker.set_tags(run_id, {TAG_HEARTBEAT: str(int(now))})  # never later than the trial's
        except Exception:  # a missed beat is harmless; the next one retries
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def recover_stale(study: optuna.Study, tracker: Tracker, grace_period: float) -> list[int]:
    """Fail stale RUNNING trials, queue each once more, close their runs. Returns their numbers."""
    storage = study._storage  # Optuna exposes no public setter for another worker's trial
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        heartbeat = trial.user_attrs.get(HEARTBEAT_ATTR)
        if heartbeat is None and trial.datetime_start is not None:
            heartbeat = trial.datetime_start.timestamp()
        if not is_stale(trial.user_attrs.get(WORKER_ATTR), heartbeat, grace_period):
            continue
        try:  # a finished trial takes no more attributes: the reason goes first
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "worker stopped (killed or lost) during the trial")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):  # it finished meanwhile
            continue
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            tracker.end_run(run_id, "KILLED", state="FAIL", error="worker stopped (killed or lost) during the trial")
        if RETRY_OF_ATTR not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False)
        recovered.append(trial.number)
    close_orphan_runs(tracker, grace_period)
    return recovered


def close_orphan_runs(tracker: Tracker, grace_period: float) -> list[str]:
    """RUNNING MLflow runs of this experiment whose worker is gone end as KILLED."""
    closed = []
    for run in tracker.running_runs():
        tags = run.data.tags
        worker = {"host": tags.get(TAG_WORKER_HOST), "pid": int(tags.get(TAG_WORKER_PID, "0") or 0)}
        heartbeat = float(tags[TAG_HEARTBEAT]) if TAG_HEARTBEAT in tags else run.info.start_time / 1000
        if is_stale(worker, heartbeat, grace_period):
            tracker.end_run(run.info.run_id, "KILLED", state="FAIL" if TAG_TRIAL in tags else None,
                            error="worker stopped (killed or lost)")
            closed.append(run.info.run_id)
    return closed
