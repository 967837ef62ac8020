"""The study: Optuna storage, sampler and pruner, the objective, and resume.

Default storage (documented in docs/tracking-and-ui.md): Optuna's journal file `mlruns/optuna.journal`, beside
the MLflow store; any Optuna storage URL works too (e.g. `postgresql://...` for workers on several
machines). The same study name and storage continue a study where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass

import optuna

from hpo_peft.study import trial_budget
from hpo_peft.study import compute_budget
from hpo_peft.study import identity
from hpo_peft.core import interrupts
from hpo_peft.study import preflight
from hpo_peft.tracking import retention
from hpo_peft.core import stores
from hpo_peft.core.config import StudyConfig
from hpo_peft.core.errors import UserError
from hpo_peft.tracking.recovery import (
    WORKER_ATTR,
    Heartbeat,
    recover_stale,
)
from hpo_peft.tracking.run_record import (
    Pruned,
    best_marker,
    name_objective,
    log_outcome,
    open_session,
    summarize,
    trial_run,
)
from hpo_peft.tracking.run_story import defining_params
from hpo_peft.core.runtime import GPU_ENV, spread_workers, worker_identity
from hpo_peft.study.samplers import make_pruner, make_sampler
from hpo_peft.study.search_space import check_settings, check_space, first_trials, sample_plan
from hpo_peft.tracking.selection import (
    FOLD_SCORES_ATTR,
    VAL_PREDICTIONS_ATTR,
    STANDARD_ERROR_ATTR,
    TRAINABLE_ATTR,
    VAL_LOSS_ATTR,
    corrected_score,
    val_predictions,
    select_best,
)
from hpo_peft.tracking.tracker import TAG_ERROR, Tracker, check_store
from hpo_peft.fewshot.train import EpochMetrics
from hpo_peft.fewshot.trial import Workspace, open_workspace, run_trial


@dataclass
class StudyLocation:
    """Where a study lives, the same for every command: each store the flag's, else the config's, else
    the environment's (`OPTUNA_STORAGE`, `MLFLOW_TRACKING_URI`), else (None) the default in `mlruns/`."""

    study_name: str
    storage: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        self.storage = self.storage or stores.default_storage()
        self.tracking_uri = self.tracking_uri or os.environ.get(stores.TRACKING_ENV) or None

    @classmethod
    def of(cls, config: StudyConfig, study_name: str | None, storage: str | None, tracking_uri: str | None) -> "StudyLocation":
        return cls(study_name or config.name, storage, tracking_uri or config.tracking.uri)


_DATABASES: dict[tuple[int, str], optuna.storages.RDBStorage] = {}  # (process id, URL): a forked child opens its own


def open_storage(url: str | None, create: bool = True) -> optuna.storages.BaseStorage:
    """A journal file (default `mlruns/optuna.journal`) or any Optuna storage URL. `create=False`
    (commands that only read) refuses a journal or SQLite file that does not exist."""
    from optuna.storages import JournalStorage

    path = stores.journal_path(url)
    if path is not None:
        if not create:  # read, so a read-only folder will do
            stores.check_exists(path, "study storage")
        else:
            stores.check_writable(path.parent, "the Optuna journal", "pass --storage WRITABLE/optuna.journal")
            path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(stores.journal_backend(path))
    url = stores.database_url(url)
    db = stores.sqlite_path(url)
    if db is not None and not create:
        stores.check_exists(db, "study storage")
    opened = _DATABASES.get((os.getpid(), url))
    if opened is not None:  # one engine (one connection pool) per server database and process: each
        return opened       # new RDBStorage holds its connections until the garbage collector runs
    engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True} if url.startswith("postgresql") else None
    for attempt in range(3):
        try:  # processes starting together race to create the tables: a file lock for SQLite, ...
            with stores.lock_for(url):
                opened = optuna.storages.RDBStorage(url, engine_kwargs=engine)
            if db is None:  # a database server (a SQLite file may be replaced under the same name)
                _DATABASES[(os.getpid(), url)] = opened
            return opened
        except Exception as err:
            raced = "already exists" in str(err) or type(err).__name__ == "IntegrityError"
            if raced and attempt < 2:  # ... and for a server, the loser finds the tables made on its retry
                time.sleep(0.5 * (attempt + 1))
                continue
            reason = " ".join(str(err).split())[:300]
            raise UserError(f"Optuna storage {stores.redact(url)}: cannot open ({type(err).__name__}: {reason})") from None


def create_study(config: StudyConfig, options: StudyLocation, storage=None, accept_changes: bool = False) -> optuna.Study:
    """A new study records what defines it; an existing one must have been started with the same
    (or `accept_changes`, `study run --accept-changes`, says the user means to change it)."""
    storage = storage or open_storage(options.storage)
    sampler, pruner = make_sampler(config), make_pruner(config)
    try:  # loading writes nothing (creating an existing study would append to a journal)
        study = optuna.load_study(study_name=options.study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(study_name=options.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
        for params in first_trials(config):  # enqueue, then the race (workers starting together: once)
            study.enqueue_trial(params, skip_if_exists=True)
        name_objective(study)  # Optuna's dashboard names the objective
    if study.user_attrs.get(identity.FINGERPRINT_ATTR) is None:
        study.set_user_attr(identity.FINGERPRINT_ATTR, identity.fingerprint(config))
    else:
        check_settings(study, config, options.study_name, accept_changes)
    return study


def load_study(options: StudyLocation) -> optuna.Study:
    storage = open_storage(options.storage, create=False)
    try:
        return optuna.load_study(study_name=options.study_name, storage=storage)
    except KeyError:
        where = options.storage or stores.default_journal()
        raise UserError(f"no study named {options.study_name!r} in storage {where}") from None


def existing_study(options: StudyLocation) -> optuna.Study | None:
    """The study if its storage and the study exist (an unreachable storage is reported later, by open_stores)."""
    try:
        return load_study(options)
    except UserError:
        return None


def make_objective(workspace: Workspace, config: StudyConfig, tracker: Tracker, parent_id: str, study_name: str,
                   heartbeat: Heartbeat, on_start=None, on_disk_full=None):
    """`config` holds the study's search space; `workspace` the data and model its trials train on;
    `on_start()` is called once the trial exists (trial_budget.ClaimLock's release); a full disk stops
    the study after the trial it failed, and `on_disk_full(error)` hears of it."""
    def objective(trial: optuna.Trial) -> float:
        with contextlib.ExitStack() as opened:
            with interrupts.deferred():  # a stop before the trial's run exists waits for the run: no trial without one
                if on_start is not None:
                    on_start()
                trial.set_user_attr(WORKER_ATTR, worker_identity())
                heartbeat.attach(trial, None)
                plan = sample_plan(trial, config)
                label_budget = {"data.validation": workspace.plan.scheme.name, "labels_per_class": workspace.plan.labels_per_class,
                                **({"data.refit": True} if config.data.refit else {})}
                params = {**defining_params(plan.method, trial.params, plan.train.model_dump(), config.train.model_dump(),
                                            plan.method_options), **label_budget}
                run_id = opened.enter_context(trial_run(tracker, trial, parent_id, study_name, params))
            # a stop held back above is raised here, and trial_run closes the run as KILLED
            heartbeat.attach(trial, run_id)
            spending = compute_budget.TrialSpending(parent_id, workspace.plan.scheme)  # epochs and seconds trained

            def on_epoch(metrics: EpochMetrics) -> None:
                spending.saw(metrics)  # before pruning: a pruned trial counts the epochs it ran
                fold = metrics.fold  # kfold: each fold's epoch, then (None) the folds' mean
                prefix = "" if fold is None else f"fold{fold + 1}."
                tracker.log_metrics(run_id, {
                    f"{prefix}train_loss": metrics.train_loss,
                    f"{prefix}val_loss": metrics.val_loss,
                    f"{prefix}val_balanced_accuracy": metrics.val_balanced_accuracy,
                }, step=metrics.epoch)
                if fold is None:  # the trial's curve (holdout's, or the folds' mean): reported, maybe pruned
                    with interrupts.deferred():  # the journal is written whole
                        trial.report(metrics.val_balanced_accuracy, metrics.epoch)
                        pruned = trial.should_prune()
                    if pruned:
                        raise Pruned(metrics.epoch)

            try:
                outcome = run_trial(workspace, plan.method, plan.method_options, plan.train, on_epoch,
                                    progress=sys.stderr.isatty())  # an epoch bar in a terminal, none in logs
                spending.record(trial, tracker, run_id, outcome)  # with its refit's epochs
                value = log_outcome(tracker, run_id, outcome, workspace, trial, params)
                trial.set_user_attr(VAL_LOSS_ATTR, outcome.validation.loss)  # tie-breakers (selection.py)
                trial.set_user_attr(TRAINABLE_ATTR, outcome.trainable_parameters)
                trial.set_user_attr(STANDARD_ERROR_ATTR, outcome.validation.standard_error)  # the parent's, when best
                if outcome.fold_validations:  # kfold, a method that trains or not
                    trial.set_user_attr(FOLD_SCORES_ATTR, outcome.fold_scores())  # for corrected_score
                if (record := val_predictions(outcome.fold_validations or [outcome.validation])) is not None:
                    trial.set_user_attr(VAL_PREDICTIONS_ATTR, record)  # an ensemble's score (ensemble_run.py)
            except Exception as err:
                release_accelerator_memory()  # e.g. after CUDA out-of-memory, for the next trial
                if stores.disk_full(err) is not None and on_disk_full is not None:
                    on_disk_full(err)  # every later trial would fail the same way
                    trial.study.stop()
                raise
            finally:
                spending.record(trial, tracker, run_id, quiet=True)  # pruned, failed, stopped: what it ran
                heartbeat.attach(None, None)
        return value  # the objective as logged on the run (rounded for display)

    return objective


def release_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimize(study: optuna.Study, workspace: Workspace, tracker: Tracker, parent_id: str,
             n_trials: int | None, timeout: float | None, config: StudyConfig | None = None, on_start=None) -> None:
    config, full = config or workspace.config, []
    with Heartbeat(tracker, None, config.search.heartbeat_interval) as heartbeat:
        study.optimize(
            make_objective(workspace, config, tracker, parent_id, study.study_name, heartbeat, on_start, full.append),
            n_trials=n_trials,
            timeout=timeout,
            catch=(Exception,),  # a failing trial is recorded as FAIL and the study goes on
            show_progress_bar=False,  # Optuna logs one line per trial instead
            callbacks=[best_marker(tracker, parent_id),  # the best tag moves as better trials appear
                       retention.callback(tracker, config.search.keep_adapters, config.search.ensemble),  # adapters that fit on a disk
                       *compute_budget.callbacks(config.search.budget, parent_id)],  # no new trial once spent
        )
    if full:
        raise full[0]


def open_stores(config: StudyConfig, options: StudyLocation, accept_changes: bool = False,
                checked: bool = False) -> tuple[optuna.Study, Tracker]:
    """Both stores answer (or fail in seconds with one line) and the study's settings match before
    either is written to; `checked`: the caller ran check_store on the tracking store already."""
    if not checked:
        check_store(stores.database_url(options.tracking_uri or stores.default_tracking_uri()))
    study = create_study(config, options, open_storage(options.storage), accept_changes)
    return study, Tracker(options.tracking_uri, experiment=options.study_name, checked=True)


def run_study(config: StudyConfig, options: StudyLocation, n_trials: int | None, timeout: float | None,
              jobs: int = 1, accept_changes: bool = False, total: bool = False) -> optuna.Study:
    """`total` (`study worker`): `n_trials` is the study's total over all workers (trial_budget.py)."""
    preflight.check_study_data(config)
    check_store(stores.database_url(options.tracking_uri or stores.default_tracking_uri()))  # before the model loads
    if (existing := existing_study(options)) is not None:  # other settings: refused before the model loads
        check_space(existing, config, options.study_name)
        if not accept_changes:
            check_settings(existing, config, options.study_name)
    # the model loads and every image decodes before anything is written (workers repeat it)
    workspace = open_workspace(config)
    study, tracker = open_stores(config, options, accept_changes, checked=True)  # checked above, before the model
    recovered = recover_stale(study, tracker, config.search.grace_period)
    if recovered:
        print(f"recovered stale trials {recovered}: marked FAIL, queued once more")
    n_trials = n_trials if n_trials is not None else config.search.n_trials
    timeout = timeout if timeout is not None else config.search.timeout
    if total and (used := trial_budget.usage(study)).used_up(n_trials):  # a late worker: no empty session run
        print(f"the study's budget is used up: {used.ended} of {n_trials} trials ended", flush=True)
        return study
    status, parent_id, monitor, full = "FINISHED", None, None, None
    try:  # the parent run is closed on every path from here on
        with interrupts.deferred():
            parent_id = tracker.start_parent(options.study_name, {"hpo_peft.storage": str(options.storage or "default"),
                                                                  "hpo_peft.jobs": str(jobs),  # the data's path: logged, never compared
                                                                  "hpo_peft.data_root": str(config.data.root.resolve())})
        tracker.log_dict(parent_id, config.model_dump(mode="json"), "config.json")
        monitor = open_session(tracker, parent_id, options.study_name, workspace)
        with Heartbeat(tracker, parent_id, config.search.heartbeat_interval):
            if total:
                work_through_budget(study, workspace, tracker, parent_id, n_trials, timeout, options)
            elif jobs == 1:
                optimize(study, workspace, tracker, parent_id, n_trials, timeout)
            else:
                run_workers(config, options, parent_id, n_trials, timeout, jobs)
    except KeyboardInterrupt as err:
        status = "KILLED"
        if parent_id is not None:
            tracker.set_tags(parent_id, {TAG_ERROR: interrupts.reason(err)})
        raise
    except BaseException as err:
        status = "FAILED"
        if stores.disk_full(err) is None:
            raise
        full = err
    finally:
        if monitor is not None:
            monitor.finish()
        if parent_id is not None:
            try:
                try:
                    summarize(tracker, parent_id, study, figures=status == "FINISHED", config=config)
                finally:
                    tracker.end_run(parent_id, status)
            except Exception as err:  # a full disk: the session run stays open until the next session
                if stores.disk_full(err) is None:
                    raise
                full = full or err
    if full is not None:
        raise UserError(f"disk full ({stores.disk_full(full)}): the session stopped; free some space, then "
                        "`study run` again continues the study (it closes the unfinished trial and runs)")
    return study


def work_through_budget(study: optuna.Study, workspace: Workspace, tracker: Tracker, parent_id: str, total: int,
                        timeout: float | None, options: StudyLocation) -> None:
    """One worker of a job array: trials until the study's `total` is used up by all workers together.
    Between trials it recovers other workers' dead trials (by heartbeat: they may run on other hosts)."""
    search, me = workspace.config.search, worker_identity()
    print(f"worker {me['host']} pid {me['pid']}: study {options.study_name!r} in "
          f"{stores.redact(str(options.storage or stores.default_journal()))}, {total} trials in all; MLflow "
          f"{stores.redact(tracker.uri)}, experiment {options.study_name!r}, session run {parent_id}", flush=True)
    started = time.monotonic()
    while True:
        recovered = recover_stale(study, tracker, search.grace_period)
        if recovered:
            print(f"recovered stale trials {recovered}: marked FAIL, queued once more", flush=True)
        with trial_budget.ClaimLock(options.storage, options.study_name) as claim:  # released once the trial exists
            used = trial_budget.usage(study)
            if used.used_up(total):
                print(f"the study's budget is used up: {used.ended} of {total} trials ended", flush=True)
                return
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                print(f"--timeout reached: {used.ended} of {total} trials ended", flush=True)
                return
            if used.has_room(total):
                optimize(study, workspace, tracker, parent_id, 1, left, on_start=claim.release)
                continue
        time.sleep(max(1.0, min(search.heartbeat_interval, 10.0)))  # running trials fill the budget; one may die


def _worker(config_json: str, options: StudyLocation, parent_id: str, n_trials: int, timeout: float | None,
            gpu: str | None = None) -> None:
    os.environ.update({GPU_ENV: gpu} if gpu else {})  # first: CUDA reads it once, when it starts (not yet)
    interrupts.exit_with_parent()  # a worker never outlives its parent, however the parent ended
    with interrupts.handled():
        config = StudyConfig.model_validate_json(config_json)
        try:
            study, tracker = open_stores(config, options, accept_changes=True)  # the parent checked
            optimize(study, open_workspace(config), tracker, parent_id, n_trials, timeout)
        except KeyboardInterrupt:
            sys.exit(1)  # the trial and its run are closed; the parent reports the interruption
        except Exception as err:  # a full disk: one line, as from `study run`
            if (full := stores.disk_full(err)) is None:
                raise
            print(f"hpo-peft: error: disk full ({full}): worker stopped", file=sys.stderr, flush=True)
            sys.exit(2)


def run_workers(config: StudyConfig, options: StudyLocation, parent_id: str, n_trials: int,
                timeout: float | None, jobs: int) -> None:
    """`jobs` worker processes on the same storage, splitting the trials between them. Whatever
    stops the parent stops them: the signal it got is passed on (Ctrl-C stays Ctrl-C on their
    trials), and a dead parent is noticed (SIGTERM, `interrupts.exit_with_parent`). Worker i of G GPUs sees GPU i mod G."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch/MLflow state
    shares = [n_trials // jobs + (i < n_trials % jobs) for i in range(jobs)]
    gpus = spread_workers(min(jobs, n_trials), config)  # runtime.worker_gpus, said in one line
    workers = [
        context.Process(target=_worker, args=(config.model_dump_json(), options, parent_id, share, timeout, gpus[i]),
                        name=f"hpo-peft-worker-{i}")
        for i, share in enumerate(shares) if share
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except KeyboardInterrupt as err:  # let them close their trials and runs, then make sure they are gone
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, getattr(err, "signum", signal.SIGINT))
        deadline = time.monotonic() + interrupts.STOP_TIMEOUT * 0.75
        for worker in workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
        raise
    failed = [w.name for w in workers if w.exitcode not in (0, None)]
    if failed:
        print(f"workers ended abnormally: {failed} (their trials are recovered by the next `study run`)")


def best_and_corrected(options: StudyLocation, trials: list | None = None) -> tuple[optuna.trial.FrozenTrial, float | None]:
    """The best trial, and (kfold) its score corrected for being the best of the study's trials
    (`trials`: the study's, when the caller has loaded them)."""
    trials = load_study(options).get_trials(deepcopy=False) if trials is None else trials
    best = select_best(trials)
    if best is None:
        raise UserError(f"study {options.study_name!r} has no completed trial yet")
    return best, corrected_score(trials, best)
