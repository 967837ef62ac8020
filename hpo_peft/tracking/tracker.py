"""Everything MLflow: one experiment per study, a parent run per `study run` session, a nested
child run per trial, per-epoch metrics, figures, adapters, test results, the model registry.

Default store (documented in docs/tracking-and-ui.md): MLflow 3's SQLite backend at `mlruns/mlflow.db`, with
artifacts under `mlruns/artifacts/` (see `stores`), or `MLFLOW_TRACKING_URI` where it is set and
no `--tracking-uri` or `tracking.uri` is given. Open it with
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`.
Works through `MlflowClient` with explicit run ids, so several workers never share a global
"active run".
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from hpo_peft.core import interrupts
from hpo_peft.core import stores
from hpo_peft.core.errors import UserError
from hpo_peft.tracking.run_story import TAG_BEST, display_value
from hpo_peft.core.runtime import worker_identity

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # adapters are small; keep output readable
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a server's "View run" lines would break --json

# A tracking server that stops answering for a while (a restart, the network) is waited for: MLflow's
# client retries refused connections, timeouts and 408/429/5xx answers with exponential backoff,
# 0, 2, 4, ... 64, 120 s (about 4 minutes in all), each request given 60 s. Set in the environment
# before any client exists; a user's own MLFLOW_HTTP_REQUEST_* values win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "8", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
for _name, _value in HTTP_RETRY_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
# MLflow logs each database error with its traceback before raising it; we report the raised error
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

ADAPTER_PATH = "adapter"
TAG_STUDY = "hpo_peft.study.session"
TAG_TRIAL = "hpo_peft.trial_number"
TAG_STATE = "hpo_peft.trial_state"
TAG_KIND = "hpo_peft.run_kind"
TAG_ERROR = "hpo_peft.error"
# worker bookkeeping: under `mlflow.`, which the UI keeps out of its columns and Group-by list
TAG_WORKER_HOST = "mlflow.hpo_peft.worker_host"
TAG_WORKER_PID = "mlflow.hpo_peft.worker_pid"
TAG_HEARTBEAT = "mlflow.hpo_peft.heartbeat"
TAG_BEST_RUN = "hpo_peft.best_run_id"
TAG_DROPPED = "hpo_peft.adapter_dropped"  # retention.py: the adapter artifacts were deleted, and why


def _worker_tags() -> dict[str, str]:
    me = worker_identity()
    return {TAG_WORKER_HOST: me["host"], TAG_WORKER_PID: str(me["pid"]), TAG_HEARTBEAT: str(int(time.time()))}


class TrackingUnavailable(UserError):
    """The tracking server did not answer through all of MLflow's retries."""


def _unreachable(err: Exception) -> bool:
    import requests

    text = str(err)
    return isinstance(err, requests.RequestException) or (
        isinstance(err, MlflowException) and ("Max retries exceeded" in text or "timeout exception" in text))


def _whole(method):
    """A signal arriving during a call to the store is raised after it, never inside a transaction.
    A server still unreachable after MLflow's retries is reported in one line naming it."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        started = time.monotonic()
        try:
            with interrupts.deferred():
                return method(self, *args, **kwargs)
        except (MlflowException, OSError) as err:
            if not _unreachable(err):
                raise
            retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            raise TrackingUnavailable(
                f"MLflow tracking server {stores.redact(self.uri)} did not answer {method.__name__} ({retries} retries "
                f"over {time.monotonic() - started:.0f} s; {_reason(err)}); the trial fails, `study run` again "
                "continues the study once the server is back") from err

    return call


def _same_key_race(call):
    """Workers may write the same row at once (the experiment's description, the best-trial tag, a
    dataset every trial logs): MLflow's SQL store inserts when it found no row, and the second
    insert breaks the unique key (PostgreSQL: duplicate key value; SQLite: UNIQUE constraint
    failed). On the retry the row exists and is updated. A tag another worker already deleted is
    already gone."""
    try:
        return call()
    except MlflowException as err:
        text = str(err)
        if "duplicate key value" in text or "UNIQUE constraint failed" in text:
            return call()
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" and "No tag with name" in text:
            return None
        raise


def _reason(err: Exception) -> str:
    text = str(err)
    for hint in ("Connection refused", "Read timed out", "timeout", "Max retries exceeded"):
        if hint in text:
            return hint.lower() if hint != "Max retries exceeded" else "too many failed tries"
    return type(err).__name__


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_store(uri: str, create: bool = True) -> None:
    """The store answers and can be written (a server within seconds), without writing to it."""
    db = stores.sqlite_path(uri)
    if uri.startswith(("http://", "https://")):
        stores.probe_server(uri, "MLflow tracking server", "--tracking-uri", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=hpo-peft-probe")
    elif db is not None and not create:
        stores.check_exists(db, "MLflow store")
    elif db is not None:
        hint = "run from a writable folder or pass --tracking-uri sqlite:///WRITABLE/mlflow.db"
        stores.check_writable(db.parent, "the MLflow store", hint)
        stores.check_writable(db.resolve().parent / "artifacts", "MLflow artifacts", hint)
    check_artifact_roots(uri)


def check_artifact_roots(uri: str) -> None:
    """A local store's artifacts lie beside it. MLflow records their absolute path, so a copied
    study folder would read and write the original's adapters, and a moved one find none: such a
    store is refused, in one line, before anything is read or written."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    db = stores.sqlite_path(uri)
    if db is None or not db.is_file():
        return
    here = db.resolve().parent
    with stores.lock_for(uri):
        experiments = MlflowClient(uri).search_experiments(max_results=1000)
    for experiment in experiments:
        location = experiment.artifact_location or ""
        if experiment.experiment_id == "0" or not location.startswith("file:"):
            continue  # MLflow's Default experiment is never used (its root is the first client's folder)
        where = Path(local_file_uri_to_path(location))
        if where != here and here not in where.parents:
            fate = "write into" if where.exists() else "find no adapter in"
            raise UserError(
                f"{db}: experiment {experiment.name!r} keeps its artifacts in {where}, outside {here}: the study "
                f"folder was copied or moved, and MLflow records that path, so this store would {fate} the other "
                "folder; run in the original folder, or start a new store (--tracking-uri sqlite:///NEW/mlflow.db)")


class Tracker:
    """The MLflow side of one study. Opening it checks that the store answers and can be written,
    and writes nothing; the experiment is created on first use. `create=False` (commands that only
    read) refuses a missing store or experiment instead of creating one."""

    def __init__(self, tracking_uri: str | None, experiment: str, create: bool = True, checked: bool = False):
        self.uri = stores.database_url(tracking_uri or stores.default_tracking_uri())
        self.experiment_name, self.create = experiment, create
        if not checked:  # `checked`: the caller ran check_store on this URI already
            check_store(self.uri, create)
        with stores.lock_for(self.uri):  # the first client of a new SQLite file creates its schema
            self.client = MlflowClient(self.uri)
            self.client.search_experiments(max_results=1)

    def _artifact_location(self) -> str | None:
        """A local SQLite store keeps its artifacts beside it (`mlruns/artifacts` by default)
        rather than wherever the process happens to run; servers choose their own."""
        db = stores.sqlite_path(self.uri)
        return (db.resolve().parent / "artifacts").as_uri() if db is not None else None

    @cached_property
    def experiment_id(self) -> str:
        name = self.experiment_name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        if not self.create:
            raise UserError(f"no MLflow experiment {name!r} in {stores.redact(self.uri)}; "
                            "check --study-name and --tracking-uri")
        try:
            return self.client.create_experiment(name, artifact_location=self._artifact_location())
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    # runs -----------------------------------------------------------------------------------
    @_whole
    def start_parent(self, study: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"{study} session",
            tags={TAG_STUDY: study, TAG_KIND: "study_session", **_worker_tags(), **tags},
        )
        return run.info.run_id

    @_whole
    def start_child(self, parent_id: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_id, **_worker_tags(), **tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_trial(self, parent_id: str, study: str, number: int, params: dict[str, Any]) -> str:
        tags = {TAG_STUDY: study, TAG_TRIAL: str(number), TAG_KIND: "trial", TAG_STATE: "RUNNING"}
        return self.start_child(parent_id, f"trial {number}", params, tags)

    @_whole
    def find_finished(self, tags: dict[str, str]) -> list:
        """FINISHED runs of this experiment carrying all of `tags`."""
        where = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"])
        return self.client.search_runs([self.experiment_id], filter_string=where, max_results=100)

    @_whole
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            self.client.log_batch(run_id, params=chunk)

    @_whole
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, display_value(v), now, step) for k, v in metrics.items()]  # full precision: JSON artifacts
        for chunk in _chunks(items, 500):
            self.client.log_batch(run_id, metrics=chunk)

    @_whole
    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_whole
    def end_run(self, run_id: str, status: str, state: str | None = None, error: str | None = None) -> None:
        """status: MLflow's FINISHED / FAILED / KILLED; state: Optuna's trial state, as a tag."""
        tags = {}
        if state:
            tags[TAG_STATE] = state
        if error:
            tags[TAG_ERROR] = error[:5000]
        if tags:
            self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status)

    @_whole
    def running_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=10_000)

    # artifacts ------------------------------------------------------------------------------
    @_whole
    def log_figure(self, run_id: str, figure, path: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id, figure, path)
        plt.close(figure)

    @_whole
    def log_dict(self, run_id: str, data: dict, path: str) -> None:
        self.client.log_dict(run_id, data, path)

    @_whole
    def log_file(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    @_whole
    def log_adapter(self, run_id: str, folder: Path) -> None:
        self.client.log_artifacts(run_id, str(folder), ADAPTER_PATH)

    @_whole
    def download_adapter(self, run_id: str, destination: Path) -> Path:
        try:
            path = self.client.download_artifacts(run_id, ADAPTER_PATH, str(destination))
        except (MlflowException, OSError) as err:
            if _unreachable(err):
                raise
            raise UserError(f"run {run_id}: no adapter artifact could be downloaded ({err})") from None
        return Path(path)

    @_whole
    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except MlflowException as err:
            if _unreachable(err):
                raise
            raise UserError(f"MLflow run {run_id!r} not found in {stores.redact(self.uri)} ({err.message})") from None

    def check_has_adapter(self, run_id: str) -> None:
        """Only a completed trial keeps an adapter: say why another one has none."""
        tags = self.get_run(run_id).data.tags
        if TAG_DROPPED in tags:
            raise UserError(f"MLflow run {run_id}: its adapter was dropped to save disk ({tags[TAG_DROPPED]}); "
                            "set search.keep_adapters to keep more")
        state = tags.get(TAG_STATE)
        if state in (None, "COMPLETE"):
            return
        trial = f"trial {tags[TAG_TRIAL]}" if TAG_TRIAL in tags else "its trial"
        when = ""
        if state == "PRUNED":
            metrics = self.get_run(run_id).data.metrics
            when = (f" at epoch {int(metrics['pruned_at_epoch'])}" if "pruned_at_epoch" in metrics else
                    f" after fold {int(metrics['pruned_after_fold'])}" if "pruned_after_fold" in metrics else "")
        raise UserError(f"MLflow run {run_id} is {trial}, which was {state.lower()}{when} and kept no adapter; "
                        "evaluate a completed trial (`hpo-peft study best` names the best)")

    # what the UI shows (run_story.py) ----------------------------------------------------------
    @_whole
    def describe(self, run_id: str, name: str | None = None, note: str | None = None) -> None:
        """The run's name and its markdown description (the UI's "Description")."""
        tags = {**({"mlflow.runName": name} if name else {}), **({"mlflow.note.content": note} if note else {})}
        self.set_tags(run_id, tags)

    @_whole
    def describe_experiment(self, note: str) -> None:
        _same_key_race(lambda: self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", note))

    @_whole
    def runs_where(self, where: str, max_results: int = 10_000) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=where, max_results=max_results)

    @_whole
    def move_best(self, run_id: str) -> None:
        """`hpo_peft.best=true` on this run and on no other run of its study (compare keeps several
        studies in one experiment: one best each)."""
        study = self.client.get_run(run_id).data.tags.get(TAG_STUDY)
        scope = f" and tags.`{TAG_STUDY}` = '{study}'" if study else ""
        for run in self.runs_where(f"tags.`{TAG_BEST}` = 'true'{scope}"):
            if run.info.run_id != run_id:
                _same_key_race(lambda: self.client.delete_tag(run.info.run_id, TAG_BEST))
        _same_key_race(lambda: self.client.log_batch(run_id, tags=[RunTag(TAG_BEST, "true")]))

    @_whole
    def log_datasets(self, run_id: str, datasets: list[tuple]) -> None:
        """(pandas DataFrame, source path, name, context) each: MLflow's dataset inputs, with a digest."""
        import mlflow.data
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for frame, source, name, context in datasets:
            with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local file
                warnings.simplefilter("ignore")
                dataset = mlflow.data.from_pandas(frame, source=str(source), name=name, targets="label")
            inputs.append(DatasetInput(Dataset(**dataset.to_dict()), [InputTag("mlflow.data.context", context)]))
        _same_key_race(lambda: self.client.log_inputs(run_id, datasets=inputs))  # workers share the datasets

    def system_metrics(self, run_id: str, interval: float = 10.0):
        """MLflow's own CPU, memory, disk, network (and NVIDIA GPU) sampler on a run, or None
        where it cannot run (it needs psutil); `.finish()` stops it."""
        import logging

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter per session
        try:
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=self.uri)
        except Exception:  # e.g. psutil missing: the study runs without system metrics
            return None
        monitor.start()
        return monitor


def temporary_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="hpo_peft_")
