"""The study: Optuna storage, sampler and pruner, the objective, and resume.

Default storage (documented in the README): Optuna's journal file `mlruns/optuna.journal`, beside
the MLflow store; any Optuna storage URL works too (e.g. `postgresql://...` for workers on several
machines). The same study name and storage continue a study where it stopped.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hpo_peft.artifacts import load_adapter, save_adapter
from hpo_peft.config import StudyConfig
from hpo_peft.data import LabelledImages, few_shot_rows
from hpo_peft.errors import UserError
from hpo_peft.evaluate import confusion_figure, evaluate
from hpo_peft.model import BaseModel
from hpo_peft.recovery import (
    RUN_ID_ATTR,
    WORKER_ATTR,
    Heartbeat,
    recover_stale,
    worker_identity,
)
from hpo_peft.search_space import sample_plan
from hpo_peft.tracking import DEFAULT_DIR, Tracker, temporary_folder
from hpo_peft.train import EpochMetrics, amp_dtype, resolve_device
from hpo_peft.trial import TrialOutcome, Workspace, open_workspace, run_trial

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


@dataclass
class StudyOptions:
    """Where a study lives: every command takes the same options with the same defaults."""

    study_name: str
    storage: str | None = None
    tracking_uri: str | None = None

    @classmethod
    def of(cls, config: StudyConfig, study_name: str | None, storage: str | None, tracking_uri: str | None) -> "StudyOptions":
        return cls(study_name or config.name, storage, tracking_uri or config.tracking.uri)


def open_storage(url: str | None) -> optuna.storages.BaseStorage | str:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.endswith(".journal") or url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")) if url else DEFAULT_DIR / "optuna.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return with_retries(lambda: optuna.storages.RDBStorage(url), f"Optuna storage {url}")


def with_retries(make, what: str, attempts: int = 5):
    """Workers that start together race to create a fresh database's tables; the loser retries."""
    import time

    for attempt in range(attempts):
        try:
            return make()
        except Exception as err:
            if attempt == attempts - 1:
                raise UserError(f"{what}: cannot open ({type(err).__name__}: {err})") from None
            time.sleep(0.5 * (attempt + 1))


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


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    spec = config.search.sampler
    defaults = {"seed": config.data.seed}
    if SAMPLERS.get(spec["name"], spec["name"]) == "TPESampler":
        defaults |= {"multivariate": True, "group": True}
    return _build(SAMPLERS, optuna.samplers, spec, "search.sampler", **defaults)


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    return _build(PRUNERS, optuna.pruners, config.search.pruner, "search.pruner")


def create_study(config: StudyConfig, options: StudyOptions) -> optuna.Study:
    return optuna.create_study(
        study_name=options.study_name,
        storage=open_storage(options.storage),
        sampler=make_sampler(config),
        pruner=make_pruner(config),
        direction="maximize",
        load_if_exists=True,
    )


def load_study(options: StudyOptions) -> optuna.Study:
    try:
        return optuna.load_study(study_name=options.study_name, storage=open_storage(options.storage))
    except KeyError:
        where = options.storage or DEFAULT_DIR / "optuna.journal"
        raise UserError(f"no study named {options.study_name!r} in storage {where}") from None


def log_outcome(tracker: Tracker, run_id: str, outcome: TrialOutcome, workspace: Workspace) -> None:
    config = workspace.config
    val = outcome.validation
    best = outcome.training.best
    tracker.log_metrics(run_id, {
        "trainable_parameters": outcome.trainable_parameters,
        "best_epoch": best.epoch if best else 0,
        "final_val_balanced_accuracy": val.balanced_accuracy,
        "final_val_loss": val.loss,
        "wall_time_s": outcome.seconds,
        **{f"final_val_recall_{c}": r for c, r in val.per_class_recall.items()},
    })
    tracker.log_figure(run_id, confusion_figure(val, "validation"), "validation_confusion_matrix.png")
    tracker.log_dict(run_id, {**val.as_dict(), "training": outcome.training.as_dict()}, "validation_metrics.json")
    with temporary_folder() as tmp:
        folder = save_adapter(
            Path(tmp) / "adapter", outcome.classifier, workspace.base, outcome.method, outcome.method_options,
            config.data.categories, config.prompts.model_dump(),
            extra={"train": outcome.train_config.model_dump(), "data": {"shots": config.data.shots, "seed": config.data.seed}},
        )
        tracker.log_adapter(run_id, folder)


def make_objective(workspace: Workspace, tracker: Tracker, parent_id: str, study_name: str, heartbeat: Heartbeat):
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_identity())
        heartbeat.attach(trial, None)
        plan = sample_plan(trial, workspace.config)
        run_id = tracker.start_trial(parent_id, study_name, trial.number, plan.params())
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        heartbeat.attach(trial, run_id)

        def on_epoch(metrics: EpochMetrics) -> None:
            tracker.log_metrics(run_id, {
                "train_loss": metrics.train_loss,
                "val_loss": metrics.val_loss,
                "val_balanced_accuracy": metrics.val_balanced_accuracy,
            }, step=metrics.epoch)
            trial.report(metrics.val_balanced_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}")

        try:
            outcome = run_trial(workspace, plan.method, plan.method_options, plan.train, on_epoch,
                                progress=sys.stderr.isatty())  # an epoch bar in a terminal, none in logs
            log_outcome(tracker, run_id, outcome, workspace)
        except optuna.TrialPruned:
            tracker.end_run(run_id, "FINISHED", state="PRUNED")
            raise
        except KeyboardInterrupt:
            tracker.end_run(run_id, "KILLED", state="FAIL", error="interrupted (Ctrl-C)")
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            tracker.end_run(run_id, "FAILED", state="FAIL", error=traceback.format_exc())
            release_accelerator_memory()  # e.g. after CUDA out-of-memory, for the next trial
            raise
        finally:
            heartbeat.attach(None, None)
        tracker.end_run(run_id, "FINISHED", state="COMPLETE")
        return outcome.validation.balanced_accuracy

    return objective


def summarize(tracker: Tracker, parent_id: str, study: optuna.Study) -> None:
    """Optuna's own plots and the best trial, on the session's parent run."""
    from optuna.visualization import matplotlib as plots

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    tracker.log_metrics(parent_id, {
        "n_trials": len(study.trials),
        "n_complete": len(completed),
        "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "n_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
    })
    if not completed:
        return
    best = study.best_trial
    tracker.log_params(parent_id, {f"best.{k}": v for k, v in best.params.items()})
    tracker.log_metrics(parent_id, {"best_val_balanced_accuracy": best.value, "best_trial_number": best.number})
    tracker.set_tags(parent_id, {"hpo_peft.best_run_id": best.user_attrs.get(RUN_ID_ATTR, "")})
    figures = {
        "optimization_history.png": plots.plot_optimization_history,
        "param_importances.png": plots.plot_param_importances,
        "parallel_coordinate.png": plots.plot_parallel_coordinate,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, plot in figures.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. too few trials for importances
                tracker.set_tags(parent_id, {f"hpo_peft.skipped.{path}": str(err)[:500]})
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(11, 6)
            figure.tight_layout()
            tracker.log_figure(parent_id, figure, path)


def release_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimize(study: optuna.Study, workspace: Workspace, tracker: Tracker, parent_id: str,
             n_trials: int | None, timeout: float | None) -> None:
    search = workspace.config.search
    with Heartbeat(tracker, None, search.heartbeat_interval) as heartbeat:
        study.optimize(
            make_objective(workspace, tracker, parent_id, study.study_name, heartbeat),
            n_trials=n_trials,
            timeout=timeout,
            catch=(Exception,),  # a failing trial is recorded as FAIL and the study goes on
            show_progress_bar=False,  # Optuna logs one line per trial instead
        )


def check_before_writing(config: StudyConfig) -> None:
    """The cheap checks a user's input can fail, before a storage, run or model is touched."""
    make_sampler(config)
    make_pruner(config)
    few_shot_rows(config.data)


def run_study(config: StudyConfig, options: StudyOptions, n_trials: int | None, timeout: float | None,
              jobs: int = 1) -> optuna.Study:
    check_before_writing(config)
    # the model loads and every image decodes before anything is written (workers repeat it)
    workspace = open_workspace(config)
    study = create_study(config, options)
    tracker = with_retries(lambda: Tracker(options.tracking_uri, experiment=options.study_name), "MLflow store")
    recovered = recover_stale(study, tracker, config.search.grace_period)
    if recovered:
        print(f"recovered stale trials {recovered}: marked FAIL, queued once more")
    parent_id = tracker.start_parent(options.study_name, {"hpo_peft.storage": str(options.storage or "default"),
                                                          "hpo_peft.jobs": str(jobs)})
    tracker.log_dict(parent_id, config.model_dump(mode="json"), "config.json")
    n_trials = n_trials if n_trials is not None else config.search.n_trials
    timeout = timeout if timeout is not None else config.search.timeout
    status = "FINISHED"
    try:
        with Heartbeat(tracker, parent_id, config.search.heartbeat_interval):
            if jobs == 1:
                optimize(study, workspace, tracker, parent_id, n_trials, timeout)
            else:
                run_workers(config, options, parent_id, n_trials, timeout, jobs)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception:
        status = "FAILED"
        raise
    finally:
        summarize(tracker, parent_id, study)
        tracker.end_run(parent_id, status)
    return study


def _worker(config_json: str, options: StudyOptions, parent_id: str, n_trials: int, timeout: float | None) -> None:
    config = StudyConfig.model_validate_json(config_json)
    study = create_study(config, options)
    tracker = with_retries(lambda: Tracker(options.tracking_uri, experiment=options.study_name), "MLflow store")
    try:
        optimize(study, open_workspace(config), tracker, parent_id, n_trials, timeout)
    except KeyboardInterrupt:
        pass  # the parent process reports the interruption


def run_workers(config: StudyConfig, options: StudyOptions, parent_id: str, n_trials: int,
                timeout: float | None, jobs: int) -> None:
    """`jobs` worker processes on the same storage, splitting the trials between them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch/MLflow state
    shares = [n_trials // jobs + (i < n_trials % jobs) for i in range(jobs)]
    workers = [
        context.Process(target=_worker, args=(config.model_dump_json(), options, parent_id, share, timeout),
                        name=f"hpo-peft-worker-{i}")
        for i, share in enumerate(shares) if share
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too: let them close their runs
        for worker in workers:
            worker.join(timeout=60)
        raise
    failed = [w.name for w in workers if w.exitcode not in (0, None)]
    if failed:
        print(f"workers ended abnormally: {failed} (their trials are recovered by the next `study run`)")


def best_trial(options: StudyOptions) -> optuna.trial.FrozenTrial:
    study = load_study(options)
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study {options.study_name!r} has no completed trial yet") from None


def evaluate_run(tracker: Tracker, run_id: str, base: BaseModel, test: LabelledImages, config: StudyConfig):
    """Rebuild a trial's model from its MLflow adapter artifact alone (never from memory), score it
    on the test split and log the result to that trial's run."""
    with temporary_folder() as tmp:
        classifier, metadata = load_adapter(tracker.download_adapter(run_id, Path(tmp)), base, config.data.categories)
    device = resolve_device(config.train.device)
    classifier.to(device)
    metrics = evaluate(classifier, test, base.preprocessing, config.data.categories,
                       config.train.eval_batch_size, amp_dtype(config.train.precision, device))
    tracker.log_metrics(run_id, {
        "test_balanced_accuracy": metrics.balanced_accuracy,
        "test_loss": metrics.loss,
        **{f"test_recall_{c}": r for c, r in metrics.per_class_recall.items()},
    })
    tracker.log_figure(run_id, confusion_figure(metrics, "test"), "test_confusion_matrix.png")
    tracker.log_dict(run_id, metrics.as_dict(), "test_metrics.json")
    return metrics, metadata
