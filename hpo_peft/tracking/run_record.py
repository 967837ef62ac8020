"""What a trial and a study session write to MLflow, and the one place where a trial's outcome
becomes its run's state:

| trial ends          | Optuna trial | MLflow run | recorded                                   |
|---------------------|--------------|------------|--------------------------------------------|
| returns a value     | COMPLETE     | FINISHED   | `objective_val_balanced_accuracy`, metrics, figures, adapter |
| pruned              | PRUNED       | FINISHED   | `pruned_at_epoch` (older kfold runs: `pruned_after_fold`), tag state PRUNED |
| raises              | FAIL         | FAILED     | `fail_reason`, traceback in `hpo_peft.error` |
| Ctrl-C / SIGTERM    | FAIL         | KILLED     | `fail_reason` "interrupted (...)"          |

Each run is named and described for the MLflow UI as it ends (run_story.py), and carries its
dataset inputs; the study's best trial carries `hpo_peft.best=true`, moved as better ones appear,
and every completed trial its place in the selection, `selection_rank` (1 = the pick, whose name
leads with a mark), kept up to date as trials complete (`sync_ranks`). A pruned trial's run says
why in its description and the tag `hpo_peft.pruned_because` (`run_story.prune_reason`).
"""

from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna

from hpo_peft.core import interrupts
from hpo_peft.core import stores
from hpo_peft.tracking import run_story as story
from hpo_peft.fewshot.artifacts import save_adapter
from hpo_peft.data import LabelledImages
from hpo_peft.fewshot.evaluate import Metrics, confusion_figure
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.run_story import OBJECTIVE, OBJECTIVE_SE, RANK, TAG_PRUNED_BECAUSE, display_value
from hpo_peft.tracking.selection import STANDARD_ERROR_ATTR, ranks, select_best
from hpo_peft.tracking.tracker import (
    TAG_BEST_RUN,
    TAG_KIND,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    Tracker,
    temporary_folder,
)
from hpo_peft.fewshot.trial import TrialOutcome, Workspace
from hpo_peft.fewshot.validation import SCORE_RADIUS

TAG_SESSION = "hpo_peft.session"

FAIL_REASON_ATTR = "fail_reason"
RUN_LABEL_ATTR = "hpo_peft.run_label"  # a study's user attr: leads its trials' run names (compare's `K4 s1`)


class Pruned(optuna.TrialPruned):
    def __init__(self, epoch: int):
        super().__init__(f"pruned at epoch {epoch}")
        self.epoch = epoch


@contextmanager
def trial_run(tracker: Tracker, trial: optuna.Trial, parent_id: str, study_name: str, params: dict):
    """Open the trial's child run; close it with the state its outcome maps to (table above)."""
    run_id, method, sampled, label = None, str(params.get("method")), dict(trial.params), run_label(trial)

    def tell(state: str, note: str, pruned_at: str | None = None) -> None:
        name = story.trial_name(trial.number, method, sampled, state, pruned_at=pruned_at, label=label)
        tracker.describe(run_id, name, story.trial_description(params, state, note=note))

    try:
        with interrupts.deferred():  # a run is never created without its id recorded on the trial
            run_id = tracker.start_trial(parent_id, study_name, trial.number, params)
            trial.set_user_attr(RUN_ID_ATTR, run_id)
            tracker.describe(run_id, story.trial_name(trial.number, method, sampled, "RUNNING", label=label))
        yield run_id  # a signal held back above is raised here, inside the try
    except optuna.TrialPruned as err:
        at, note = None, str(err)
        if isinstance(err, Pruned):
            tracker.log_metrics(run_id, {"pruned_at_epoch": err.epoch})
            at, reason = str(err.epoch), why_pruned(trial, err.epoch)
            tracker.set_tags(run_id, {TAG_PRUNED_BECAUSE: reason})
            note = reason if reason.startswith("pruned by") else f"{err}: {reason}"
        tell("PRUNED", note, at)
        tracker.end_run(run_id, "FINISHED", state="PRUNED")
        raise
    except KeyboardInterrupt as err:
        trial.set_user_attr(FAIL_REASON_ATTR, interrupts.reason(err))
        if run_id is not None:
            tell("KILLED", interrupts.reason(err))
            tracker.end_run(run_id, "KILLED", state="FAIL", error=interrupts.reason(err))
        raise
    except Exception as err:
        try:
            trial.set_user_attr(FAIL_REASON_ATTR, f"{type(err).__name__}: {err}")
            if run_id is not None:
                tell("FAIL", f"{type(err).__name__}: {str(err)[:300]}")
                tracker.end_run(run_id, "FAILED", state="FAIL", error=traceback.format_exc())
        except Exception as closing:  # a full disk refuses these too: the next session closes the run
            if stores.disk_full(closing) is None:
                raise
        raise
    with interrupts.deferred():
        tracker.end_run(run_id, "FINISHED", state="COMPLETE")


def run_label(trial: optuna.Trial) -> str | None:
    try:
        return trial.study.user_attrs.get(RUN_LABEL_ATTR)
    except AttributeError:  # a trial without its study (tests' fakes)
        return None


def why_pruned(trial: optuna.Trial, epoch: int) -> str:
    """`run_story.prune_reason` for this trial, from its study's trials as the pruner saw them."""
    try:
        study = trial.study
        trials = study.get_trials(deepcopy=False)
        mine = next(t for t in trials if t.number == trial.number)
        completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        return story.prune_reason(study.pruner, completed, dict(mine.intermediate_values), epoch, maximize)
    except Exception:  # only words: a prune stays a prune
        return f"pruned at epoch {epoch}"


def name_objective(study: optuna.Study) -> None:
    """Optuna's dashboard and plots name the objective `objective_val_balanced_accuracy`, as MLflow
    does (once per study: a journal keeps every write)."""
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])


def dataset_frame(images: LabelledImages, categories: list[str]):
    import pandas as pd

    return pd.DataFrame({"image_name": images.names, "label": [categories[i] for i in images.labels.tolist()]})


def few_shot_inputs(workspace: Workspace) -> list[tuple]:
    """The training shots and (holdout) validation images as MLflow dataset inputs; kfold validates
    inside the shots, so it logs no (empty) validation input."""
    data, split = workspace.config.data, workspace.data
    table = data.root / data.train_table
    inputs = [(dataset_frame(split.train, data.categories), table, f"{data.root.name} train {data.shots}-shot", "training")]
    if split.val is not None and len(split.val.names):
        inputs.append((dataset_frame(split.val, data.categories), table,
                       f"{data.root.name} validation {data.val_shots}-shot", "validation"))
    return inputs


def log_outcome(tracker: Tracker, run_id: str, outcome: TrialOutcome, workspace: Workspace,
                trial: optuna.Trial, params: dict) -> float:
    """Everything a completed trial keeps; returns the objective as logged (Optuna's value)."""
    config = workspace.config
    val = outcome.validation
    objective = display_value(val.balanced_accuracy)
    tracker.log_metrics(run_id, {
        "trainable_parameters": outcome.trainable_parameters,
        "selected_epoch": outcome.selected_epoch or 0,
        OBJECTIVE: objective,
        OBJECTIVE_SE: display_value(val.standard_error),
        "final_val_loss": val.loss,
        "wall_time_s": outcome.seconds,
        **{f"final_val_recall_{c}": r for c, r in val.per_class_recall.items()},
    })
    tracker.log_figure(run_id, validation_confusion(outcome), "validation_confusion_matrix.png")
    history = outcome.mean_history() if outcome.folds else outcome.training.history
    name = story.trial_name(trial.number, outcome.method, dict(trial.params), "COMPLETE", objective,
                            label=run_label(trial))
    if history:
        title = name + (" (mean over folds)" if outcome.folds else "")
        tracker.log_figure(run_id, story.learning_curve_figure(history, outcome.selected_epoch, title), "learning_curve.png")
    tracker.log_datasets(run_id, few_shot_inputs(workspace))
    tracker.describe(run_id, name, story.trial_description(
        params, "COMPLETE", objective, outcome.selected_epoch, outcome.trainable_parameters, outcome.scheme,
        refit=outcome.refit, standard_error=val.standard_error))
    tracker.log_dict(run_id, {**val.as_dict(), "scheme": outcome.scheme.name, "training": outcome.training.as_dict(),
                              "folds": [f.as_dict() for f in outcome.folds], "scored_epochs": outcome.scored_epochs},
                    "validation_metrics.json")
    with temporary_folder() as tmp:
        folder = save_adapter(
            Path(tmp) / "adapter", outcome.classifier, workspace.base, outcome.method, outcome.method_options, config,
            extra=outcome.adapter_metadata(config.data.shots, config.data.seed),
        )
        tracker.log_adapter(run_id, folder)
    return objective


def validation_confusion(outcome: TrialOutcome):
    """The validation confusion matrix, titled with the epoch whose cells it draws apart from the
    score (a window of epochs around it; kfold: the folds' cells summed)."""
    val, epoch = outcome.validation, outcome.selected_epoch
    figure = confusion_figure(val, "validation")
    validated = len(outcome.training.validations) if outcome.training is not None else 0
    if outcome.fold_validations:  # kfold: the folds' cells summed, trained or not
        title = story.confusion_title("validation", val.confusion, val.balanced_accuracy,
                                      folds=len(outcome.fold_validations), trained=bool(outcome.folds))
    elif epoch and validated:
        window = (max(1, epoch - SCORE_RADIUS), min(validated, epoch + SCORE_RADIUS))
        title = story.confusion_title("validation", val.confusion, val.balanced_accuracy, epoch, window)
    else:  # zero-shot: one score, no epoch
        title = story.confusion_title("validation", val.confusion, val.balanced_accuracy)
    figure.axes[0].set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def log_test_result(tracker: Tracker, run_id: str, metrics: Metrics, test: LabelledImages | None = None,
                    config=None) -> None:
    """The test score on the trial's run, the test table as its `testing` input, and validation
    beside test in its description."""
    tracker.log_metrics(run_id, {
        "test_balanced_accuracy": metrics.balanced_accuracy,
        "test_standard_error": metrics.standard_error,
        "test_loss": metrics.loss,
        **{f"test_recall_{c}": r for c, r in metrics.per_class_recall.items()},
    })
    tracker.log_figure(run_id, confusion_figure(metrics, "test"), "test_confusion_matrix.png")
    tracker.log_dict(run_id, metrics.as_dict(), "test_metrics.json")
    if test is not None and config is not None:
        data = config.data
        tracker.log_datasets(run_id, [(dataset_frame(test, data.categories), data.root / data.test_table,
                                       f"{data.root.name} test", "testing")])
    run = tracker.get_run(run_id)
    note = run.data.tags.get("mlflow.note.content", "").split(story.TEST_HEADING)[0].rstrip()
    section = story.test_section(run.data.metrics.get(OBJECTIVE), metrics.balanced_accuracy, metrics.per_class_recall)
    tracker.describe(run_id, note=note + "\n" + section)


def open_session(tracker: Tracker, parent_id: str, study_name: str, workspace: Workspace):
    """Name and describe a new session parent and the experiment, log the few-shot inputs, and
    start MLflow's system metrics on the parent (the returned monitor, or None; `.finish()` it)."""
    config = workspace.config
    session = len(tracker.runs_where(f"tags.`{TAG_KIND}` = 'study_session' and tags.`{TAG_STUDY}` = '{study_name}'"))
    tracker.set_tags(parent_id, {TAG_SESSION: str(session)})
    tracker.describe(parent_id, story.session_name(study_name, session))
    tracker.describe_experiment(story.study_description(config, study_name))
    tracker.log_datasets(parent_id, few_shot_inputs(workspace))
    return tracker.system_metrics(parent_id)


def best_marker(tracker: Tracker, parent_id: str):
    """An Optuna callback: when a trial becomes the study's best, the `hpo_peft.best` tag moves to
    its run and the session parent records it. Two workers whose trials finish together may each
    look for the tag before the other sets it; so after moving it, a worker looks at the study
    again and moves it on to a better trial finished meanwhile (whose own worker, having looked
    before, could not take it off ours): the tag ends on the best trial alone either way. After
    every completed trial, the runs' `selection_rank` and the pick's name mark follow (`sync_ranks`)."""
    def mark(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            with interrupts.deferred():
                name_objective(study)  # once; a study made before it was named too
                sync_ranks(tracker, study)
        best = select_best(study.get_trials(deepcopy=False))
        if best is None or best.number != trial.number or RUN_ID_ATTR not in best.user_attrs:
            return
        with interrupts.deferred():
            mark_best(tracker, parent_id, best)
            now = select_best(study.get_trials(deepcopy=False))
            if now is not None and now.number != best.number and RUN_ID_ATTR in now.user_attrs:
                tracker.move_best(now.user_attrs[RUN_ID_ATTR])

    return mark


def sync_ranks(tracker: Tracker, study: optuna.Study) -> None:
    """`selection_rank` on every completed trial's run, where it changed, and the pick's mark on its
    run name alone. Logged at step = the number of completed trials, so that a worker that looked
    earlier cannot overwrite a newer rank (the UI shows the latest step's value); a worker whose
    view went stale meanwhile (another trial completed) looks again, as `best_marker` does."""
    trials = study.get_trials(deepcopy=False)
    for _ in range(3):
        places = ranks(trials)
        rank_of = {t.user_attrs[RUN_ID_ATTR]: places.get(t.number) for t in trials if RUN_ID_ATTR in t.user_attrs}
        runs = tracker.runs_where(f"tags.`{TAG_STUDY}` = '{study.study_name}' and tags.`{TAG_KIND}` = 'trial'")
        for run in runs:
            run_id, rank = run.info.run_id, rank_of.get(run.info.run_id)
            if rank is not None and run.data.metrics.get(RANK) != rank:
                tracker.log_metrics(run_id, {RANK: rank}, step=len(places))
            name = story.marked(run.info.run_name or "", rank == 1)
            if name and name != run.info.run_name:
                tracker.describe(run_id, name)
        trials = study.get_trials(deepcopy=False)
        if len(ranks(trials)) == len(places):
            return


def mark_best(tracker: Tracker, parent_id: str, best: optuna.trial.FrozenTrial) -> None:
    run_id = best.user_attrs[RUN_ID_ATTR]
    tracker.move_best(run_id)
    tracker.set_tags(parent_id, {TAG_BEST_RUN: run_id})
    error = best.user_attrs.get(STANDARD_ERROR_ATTR)  # absent on trials from before it was kept
    tracker.log_metrics(parent_id, {OBJECTIVE: best.value, "best_trial_number": best.number,
                                    **({OBJECTIVE_SE: display_value(error)} if error is not None else {})})


def close_session(tracker: Tracker, parent_id: str, study: optuna.Study, config) -> None:
    """The parent's final name (study, session, trial range) and description (the best trial linked)."""
    parent = tracker.get_run(parent_id)
    session = int(parent.data.tags.get(TAG_SESSION, "1"))
    children = tracker.runs_where(f"tags.`mlflow.parentRunId` = '{parent_id}'")
    numbers = sorted(int(r.data.tags[TAG_TRIAL]) for r in children if TAG_TRIAL in r.data.tags)
    counts: dict[str, int] = {}
    for run in children:
        state = run.data.tags.get(TAG_STATE, "RUNNING")
        counts[state] = counts.get(state, 0) + 1
    best = select_best(study.get_trials(deepcopy=False))
    linked = None
    if best is not None and RUN_ID_ATTR in best.user_attrs:
        run_id = best.user_attrs[RUN_ID_ATTR]
        linked = (tracker.get_run(run_id).info.run_name, run_id, best.value)
    name = story.session_name(study.study_name, session, numbers)
    tracker.describe(parent_id, name, story.session_description(
        study.study_name, session, config, numbers, counts, linked, tracker.experiment_id))


def summarize(tracker: Tracker, parent_id: str, study: optuna.Study, figures: bool = True, config=None) -> None:
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
    if completed:
        sync_ranks(tracker, study)  # trials other workers or sessions completed, and the pick's mark
    if config is not None:
        close_session(tracker, parent_id, study, config)
    if not completed:
        return
    best = select_best(trials)
    tracker.log_params(parent_id, {f"best.{k}": story.display_param(v) for k, v in best.params.items()})
    if RUN_ID_ATTR in best.user_attrs:
        mark_best(tracker, parent_id, best)
    if not figures:
        return
    tracker.log_figure(parent_id, story.history_figure(trials), "optimization_history.png")
    plotters = {
        "param_importances.png": plots.plot_param_importances,
        "parallel_coordinate.png": plots.plot_parallel_coordinate,
    }
    if (note := story.importance_note(trials)) is not None:  # ranks from a handful of trials are noise
        del plotters["param_importances.png"]
        tracker.set_tags(parent_id, {"hpo_peft.skipped.param_importances.png": note})
        text = tracker.get_run(parent_id).data.tags.get("mlflow.note.content", "")
        if note not in text:
            tracker.describe(parent_id, note=f"{text}\n\n{note}".strip())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, plot in plotters.items():
            try:
                axes = plot(study, target_name=OBJECTIVE)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. too few trials for importances
                tracker.set_tags(parent_id, {f"hpo_peft.skipped.{path}": str(err)[:500]})
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(11, 6)
            figure.tight_layout()
            tracker.log_figure(parent_id, figure, path)
