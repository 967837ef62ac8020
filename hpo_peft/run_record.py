"""What a trial and a study session write to MLflow, and the one place where a trial's outcome
becomes its run's state:

| trial ends          | Optuna trial | MLflow run | recorded                                   |
|---------------------|--------------|------------|--------------------------------------------|
| returns a value     | COMPLETE     | FINISHED   | metrics, figures, adapter                  |
| pruned              | PRUNED       | FINISHED   | `pruned_at_epoch` (kfold: `pruned_after_fold`), tag state PRUNED |
| raises              | FAIL         | FAILED     | `fail_reason`, traceback in `hpo_peft.error` |
| Ctrl-C / SIGTERM    | FAIL         | KILLED     | `fail_reason` "interrupted (...)"          |
"""

from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna

from hpo_peft import interrupts
from hpo_peft.artifacts import save_adapter
from hpo_peft.evaluate import Metrics, confusion_figure
from hpo_peft.recovery import RUN_ID_ATTR
from hpo_peft.selection import select_best
from hpo_peft.tracking import TAG_BEST_RUN, Tracker, temporary_folder
from hpo_peft.trial import TrialOutcome, Workspace

FAIL_REASON_ATTR = "fail_reason"


class Pruned(optuna.TrialPruned):
    def __init__(self, step: int, metric: str = "pruned_at_epoch"):
        super().__init__(f"{metric.replace('_', ' ')} {step}")
        self.step, self.metric = step, metric


@contextmanager
def trial_run(tracker: Tracker, trial: optuna.Trial, parent_id: str, study_name: str, params: dict):
    """Open the trial's child run; close it with the state its outcome maps to (table above)."""
    run_id = None
    try:
        with interrupts.deferred():  # a run is never created without its id recorded on the trial
            run_id = tracker.start_trial(parent_id, study_name, trial.number, params)
            trial.set_user_attr(RUN_ID_ATTR, run_id)
        yield run_id  # a signal held back above is raised here, inside the try
    except optuna.TrialPruned as err:
        if isinstance(err, Pruned):
            tracker.log_metrics(run_id, {err.metric: err.step})
        tracker.end_run(run_id, "FINISHED", state="PRUNED")
        raise
    except KeyboardInterrupt as err:
        trial.set_user_attr(FAIL_REASON_ATTR, interrupts.reason(err))
        if run_id is not None:
            tracker.end_run(run_id, "KILLED", state="FAIL", error=interrupts.reason(err))
        raise
    except Exception as err:
        trial.set_user_attr(FAIL_REASON_ATTR, f"{type(err).__name__}: {err}")
        if run_id is not None:
            tracker.end_run(run_id, "FAILED", state="FAIL", error=traceback.format_exc())
        raise
    with interrupts.deferred():
        tracker.end_run(run_id, "FINISHED", state="COMPLETE")


def log_outcome(tracker: Tracker, run_id: str, outcome: TrialOutcome, workspace: Workspace) -> None:
    config = workspace.config
    val = outcome.validation
    for epoch in outcome.mean_history():  # kfold: the fold-mean curves under the plain names
        tracker.log_metrics(run_id, {"train_loss": epoch.train_loss, "val_loss": epoch.val_loss,
                                     "val_balanced_accuracy": epoch.val_balanced_accuracy}, step=epoch.epoch)
    tracker.log_metrics(run_id, {
        "trainable_parameters": outcome.trainable_parameters,
        "best_epoch": outcome.selected_epoch or 0,
        "final_val_balanced_accuracy": val.balanced_accuracy,
        "final_val_loss": val.loss,
        "wall_time_s": outcome.seconds,
        **{f"final_val_recall_{c}": r for c, r in val.per_class_recall.items()},
    })
    tracker.log_figure(run_id, confusion_figure(val, "validation"), "validation_confusion_matrix.png")
    tracker.log_dict(run_id, {**val.as_dict(), "scheme": outcome.scheme, "training": outcome.training.as_dict(),
                              "folds": [f.as_dict() for f in outcome.folds], "scored_epochs": outcome.scored_epochs},
                    "validation_metrics.json")
    with temporary_folder() as tmp:
        folder = save_adapter(
            Path(tmp) / "adapter", outcome.classifier, workspace.base, outcome.method, outcome.method_options, config,
            extra={"train": outcome.train_config.model_dump(), "selected_epoch": outcome.selected_epoch,
                   "data": {"shots": config.data.shots, "seed": config.data.seed, "validation": outcome.scheme,
                            "labels_per_class": outcome.labels_per_class}},
        )
        tracker.log_adapter(run_id, folder)


def log_test_result(tracker: Tracker, run_id: str, metrics: Metrics) -> None:
    tracker.log_metrics(run_id, {
        "test_balanced_accuracy": metrics.balanced_accuracy,
        "test_loss": metrics.loss,
        **{f"test_recall_{c}": r for c, r in metrics.per_class_recall.items()},
    })
    tracker.log_figure(run_id, confusion_figure(metrics, "test"), "test_confusion_matrix.png")
    tracker.log_dict(run_id, metrics.as_dict(), "test_metrics.json")


def summarize(tracker: Tracker, parent_id: str, study: optuna.Study, figures: bool = True) -> None:
    """Counts, the best trial and Optuna's own plots on the session's parent run. `figures=False`
    (an interrupted session, which must end quickly) leaves the plots to the next session."""
    from optuna.visualization import matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    tracker.log_metrics(parent_id, {
        "n_trials": len(trials),
        "n_complete": len(completed),
        "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
    })
    if not completed:
        return
    best = select_best(trials)
    tracker.log_params(parent_id, {f"best.{k}": v for k, v in best.params.items()})
    tracker.log_metrics(parent_id, {"best_val_balanced_accuracy": best.value, "best_trial_number": best.number})
    tracker.set_tags(parent_id, {TAG_BEST_RUN: best.user_attrs.get(RUN_ID_ATTR, "")})
    if not figures:
        return
    plotters = {
        "optimization_history.png": plots.plot_optimization_history,
        "param_importances.png": plots.plot_param_importances,
        "parallel_coordinate.png": plots.plot_parallel_coordinate,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, plot in plotters.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. too few trials for importances
                tracker.set_tags(parent_id, {f"hpo_peft.skipped.{path}": str(err)[:500]})
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(11, 6)
            figure.tight_layout()
            tracker.log_figure(parent_id, figure, path)
