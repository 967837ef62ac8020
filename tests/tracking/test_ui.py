"""The MLflow UI tells a study's story: run names, the objective's one metric, the best tag,
descriptions, dataset inputs, figures and the links the commands print; checked through
MLflow's client and, for the run table, in headless Chromium."""

import json
import re
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from hpo_peft.app.cli import main
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.run_story import (
    BEST_MARK,
    OBJECTIVE,
    RANK,
    TAG_BEST,
    display_value,
    session_name,
    trial_name,
)
from hpo_peft.tracking.selection import select_best
from hpo_peft.study.session import load_study
from hpo_peft.tracking.ui_links import run_table_url, run_url

ROOT = Path(__file__).resolve().parents[2]
SEARCH = {  # as tests/study/test_study.py: random draws, and a pruner that prunes trials below the best so far
    "n_trials": 5,
    "sampler": {"name": "random", "seed": 2},
    "pruner": {"name": "percentile", "percentile": 90.0, "n_startup_trials": 1, "n_warmup_steps": 0},
    "params": {"method": {"choices": ["bias", "lora"]}, "learning_rate": {"low": 0.002, "high": 0.01, "log": True},
               "max_epochs": {"choices": [4, 6]}, "patience": 3},
    "methods": {"lora": {"rank": {"choices": [1, 2, 4]}, "b_init": {"choices": ["zeros", "random"]}}},
}
COMPLETE = re.compile(r"^t(\d{3}) (bias|lora)(?: [\w.-]+)*: (\d+\.\d)$")
PRUNED = re.compile(r"^t(\d{3}) (bias|lora) pruned@(\d+)$")


@pytest.fixture(scope="module")
def story(tmp_path_factory, demo_kit):
    """A 5-trial study, its best trial evaluated; the CLI's printed output kept."""
    import os

    from conftest import write_demo_config

    tmp = tmp_path_factory.mktemp("ui")
    config = write_demo_config(demo_kit, tmp / "study.yaml", search=SEARCH)
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    options = ["--study-name", "s", "--storage", str(tmp / "optuna.journal"), "--tracking-uri", store]
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"  # a sample within the short session
    try:
        run_out = run_cli(["study", "run", str(config), *options])
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    evaluate = json.loads(run_cli(["evaluate", str(config), *options, "--json"]))
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {"tmp": tmp, "config": config, "options": options, "store": store, "client": client,
            "experiment": experiment, "runs": {r.info.run_id: r for r in runs}, "run_out": run_out,
            "evaluate": evaluate, "study": load_study_of(tmp)}


def run_cli(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def load_study_of(tmp: Path) -> optuna.Study:
    from hpo_peft.study.session import StudyLocation

    return load_study(StudyLocation("s", storage=str(tmp / "optuna.journal")))


def trials_and_runs(s):
    return [(t, s["runs"][t.user_attrs[RUN_ID_ATTR]]) for t in s["study"].trials]


@pytest.mark.slow
def test_trial_runs_are_named_by_number_method_settings_and_score(story):
    pairs = trials_and_runs(story)
    states = {t.state for t, _ in pairs}
    assert {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED} <= states
    for trial, run in pairs:
        name = run.info.run_name.removeprefix(BEST_MARK)  # the pick's mark: test_the_pick_is_marked_...
        if trial.state == optuna.trial.TrialState.COMPLETE:
            number, method, score = COMPLETE.match(name).groups()
            assert score == f"{trial.value:.1f}" and method == trial.params["method"]
            assert f"lr{trial.params['learning_rate']:.1e}".replace("e-0", "e-") in name
            if method == "lora":
                assert f" r{trial.params['lora.rank']} " in name
        else:
            number, method, epoch = PRUNED.match(name).groups()
            assert float(epoch) == run.data.metrics["pruned_at_epoch"] == max(trial.intermediate_values)
            assert OBJECTIVE not in run.data.metrics  # a pruned trial has no objective: it sorts last
        assert int(number) == trial.number


def test_names_of_failed_killed_and_kfold_pruned_trials():
    assert trial_name(12, "full", {}, "FAIL") == "t012 full FAILED"
    assert trial_name(12, "full", {}, "KILLED") == "t012 full KILLED"
    assert trial_name(31, "zs_linear_probe", {}, "PRUNED", pruned_at="9") == "t031 zs_linear_probe pruned@9"
    assert trial_name(31, "clap", {}, "PRUNED", pruned_at="fold2") == "t031 clap pruned@fold2"
    sampled = {"method": "lora", "learning_rate": 0.010975055467388254, "max_epochs": 20,
               "lora.b_init": "zeros", "lora.rank": 1}
    assert trial_name(43, "lora", sampled, "COMPLETE", 81.25) == "t043 lora r1 zeros lr1.1e-2: 81.2"
    assert session_name("demo", 2, [7, 6]) == "demo session 2: t006-t007"
    assert display_value(57.49999999999999) == 57.5


def test_the_objective_is_one_metric_equal_to_optunas_value(story):
    study = story["study"]
    for trial, run in trials_and_runs(story):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.data.metrics[OBJECTIVE] == trial.value  # exactly: Optuna keeps the logged value
            assert "final_val_balanced_accuracy" not in run.data.metrics
            assert run.data.metrics["selected_epoch"] >= 1
            # the per-epoch series is a different quantity under its own name
            history = sorted(story["client"].get_metric_history(run.info.run_id, "val_balanced_accuracy"),
                             key=lambda m: m.step)
            best = int(run.data.metrics["selected_epoch"])
            assert max(m.value for m in history) == history[best - 1].value  # holdout keeps its best epoch
            window = [m.value for m in history[max(0, best - 2):best + 1]]  # ... and is scored with its neighbours
            assert sum(window) / len(window) == pytest.approx(trial.value, abs=1e-3)
            assert all(m.value == display_value(m.value) for m in history)
    parent = session_parent(story)
    assert parent.data.metrics[OBJECTIVE] == study.best_value
    best_run = story["runs"][select_best(study.trials).user_attrs[RUN_ID_ATTR]]  # and the best's standard error beside it
    assert parent.data.metrics["objective_standard_error"] == best_run.data.metrics["objective_standard_error"] > 0
    pick = select_best(study.trials)  # `study run`'s last words: the pick's score with its error
    assert f"best trial {pick.number}: selection score {pick.value:.2f}% ± {pick.user_attrs['standard_error']:.2f}" \
        in story["run_out"]
    best_id = select_best(study.trials).user_attrs[RUN_ID_ATTR]
    assert parent.data.tags["hpo_peft.best_run_id"] == best_id
    assert best_id in parent.data.tags["mlflow.note.content"]  # the parent's description links to it
    assert parent.info.run_name == f"s session 1: t000-t{len(study.trials) - 1:03d}"


def session_parent(s):
    parents = [r for r in s["runs"].values() if r.data.tags.get("hpo_peft.run_kind") == "study_session"]
    assert len(parents) == 1
    return parents[0]


def test_the_best_tag_is_on_the_best_trial_alone_and_moves(story):
    from hpo_peft.tracking.tracker import Tracker

    best_id = select_best(story["study"].trials).user_attrs[RUN_ID_ATTR]
    client, experiment = story["client"], story["experiment"]

    def tagged():
        runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_BEST}` = 'true'")
        return [r.info.run_id for r in runs]

    assert tagged() == [best_id]
    other = next(r for r in story["runs"] if r != best_id and r != session_parent(story).info.run_id)
    tracker = Tracker(story["store"], experiment="s", create=False)
    tracker.move_best(other)
    assert tagged() == [other]
    tracker.move_best(best_id)
    assert tagged() == [best_id]


def test_two_workers_finishing_together_leave_the_best_tag_on_the_better_trial_alone(tmp_path, monkeypatch):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from hpo_peft.tracking.run_record import best_marker
    from hpo_peft.tracking.tracker import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", experiment="race")
    parent, mine, theirs = (tracker.client.create_run(tracker.experiment_id).info.run_id for _ in range(3))

    def finished(value, run_id):
        return create_trial(state=TrialState.COMPLETE, value=value, params={"x": 0.5},
                            distributions={"x": FloatDistribution(0, 1)}, user_attrs={RUN_ID_ATTR: run_id})

    study = optuna.create_study(direction="maximize")
    study.add_trial(finished(70.0, mine))
    real_move = tracker.move_best

    def while_the_other_worker_finishes(run_id):
        real_move(run_id)
        if run_id == mine:  # its better trial completed, and its marking looked for the tag before ours landed
            study.add_trial(finished(75.0, theirs))
            tracker.client.set_tag(theirs, TAG_BEST, "true")

    monkeypatch.setattr(tracker, "move_best", while_the_other_worker_finishes)
    best_marker(tracker, parent)(study, study.trials[0])
    runs = MlflowClient(tracker.uri).search_runs([tracker.experiment_id], f"tags.`{TAG_BEST}` = 'true'")
    assert [r.info.run_id for r in runs] == [theirs]


def test_trials_log_only_their_defining_params_and_hide_bookkeeping(story):
    for trial, run in trials_and_runs(story):
        params = run.data.params
        assert params["method"] == trial.params["method"]
        assert not {"train.device", "train.precision", "train.momentum", "train.optimizer"} & set(params)
        assert params["train.learning_rate"] == f"{trial.params['learning_rate']:.4g}"
        visible = {k for k in run.data.tags if not k.startswith("mlflow.")}
        assert not {k for k in visible if "worker" in k or "heartbeat" in k}
        assert "mlflow.hpo_peft.heartbeat" in run.data.tags  # kept for recovery, out of the UI's way


def test_descriptions_inputs_and_figures(story):
    client = story["client"]
    note = story["experiment"].tags["mlflow.note.content"]
    for fact in ("sicapv2", "Train.xlsx", "Test.xlsx", "16 training + 16 validation images per class",
                 "**Seed**: 1", "model", OBJECTIVE):
        assert fact in note
    parent = session_parent(story)
    assert "**Label budget**" in parent.data.tags["mlflow.note.content"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(parent.data.metrics)
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= parent_files
    for trial, run in trials_and_runs(story):
        assert run.data.tags["mlflow.note.content"]
        if trial.state != optuna.trial.TrialState.COMPLETE:
            assert "pruned at epoch" in run.data.tags["mlflow.note.content"]
            continue
        assert f"`{OBJECTIVE}`: {trial.value:.2f}" in run.data.tags["mlflow.note.content"]
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert {"training", "validation"} <= set(inputs)
        assert all(inputs[c].digest and "Train.xlsx" in json.loads(inputs[c].source)["uri"]
                   for c in ("training", "validation"))
        assert "learning_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_evaluate_logs_the_test_input_and_puts_test_beside_validation(story):
    run = story["client"].get_run(story["evaluate"]["mlflow_run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert "Test.xlsx" in json.loads(inputs["testing"].source)["uri"]
    note = run.data.tags["mlflow.note.content"]
    assert "Evaluated on the test split" in note and f"{story['evaluate']['balanced_accuracy']:.2f}" in note
    assert note.count("Evaluated on the test split") == 1


def test_commands_print_the_run_table_sorted_by_the_objective_and_the_best_run(story):
    experiment_id = story["experiment"].experiment_id
    best_id = select_best(story["study"].trials).user_attrs[RUN_ID_ATTR]
    table = run_table_url("http://127.0.0.1:5000", experiment_id)
    assert table in story["run_out"] and run_url("http://127.0.0.1:5000", experiment_id, best_id) in story["run_out"]
    assert "workflowType=machine_learning" in table and "orderByKey=metrics.%60" + RANK + "%60" in table
    assert "orderByAsc=true" in table  # rank 1, the pick, first
    assert f"mlflow ui --backend-store-uri {story['store']}" in story["run_out"]
    assert story["evaluate"]["mlflow_ui"]["run_table"] == table


@pytest.mark.service
@pytest.mark.slow
def test_the_browser_lists_the_trials_by_name_in_objective_order(story):
    """`mlflow ui` over the study's store; `study best` asked through it prints the links; headless
    Chromium opens the run table and shows the trials by their names, best first, pruned last."""
    sys.path.insert(0, str(ROOT))
    from docs.screenshots import best_links, browse, start_ui, stop_ui

    process, base = start_ui(story["store"], story["tmp"])
    try:
        best = best_links(str(story["config"]), story["options"], base)
        assert best["mlflow_ui"]["run_table"].startswith(base + "/#/experiments/")
        shown = browse(best["mlflow_ui"]["run_table"], story["tmp"] / "run_table.png", "t00")
    finally:
        stop_ui(process)
    assert (story["tmp"] / "run_table.png").stat().st_size > 10_000
    complete = optuna.trial.TrialState.COMPLETE  # (a pruned trial keeps its last reported value: no objective)
    value_of = {r.info.run_name.removeprefix(BEST_MARK): t.value if t.state == complete else None
                for t, r in trials_and_runs(story)}  # (the names read from the page start at `t0`)
    shown_trials = [n for n in shown if n in value_of]
    assert sorted(shown_trials) == sorted(value_of)  # every trial, by its new name
    values = [value_of[n] for n in shown_trials]
    completed = [v for v in values if v is not None]
    assert values[:len(completed)] == completed  # pruned trials (no objective) last
    assert completed == sorted(completed, reverse=True)  # best first
    pick = story["runs"][select_best(story["study"].trials).user_attrs[RUN_ID_ATTR]].info.run_name
    assert pick == BEST_MARK + shown[0]  # the marked winner is the table's first row, ties broken as selected


def test_workers_writing_the_same_tag_at_once_do_not_fail(tmp_path, monkeypatch):
    """Seen with two workers on a PostgreSQL-backed server: both found no experiment description and
    both inserted it; the second insert broke the unique key and ended its worker."""
    from mlflow.exceptions import MlflowException

    from hpo_peft.tracking.tracker import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", experiment="race")
    experiment_id = tracker.experiment_id
    real_set, real_delete = tracker.client.set_experiment_tag, tracker.client.delete_tag
    calls = []

    def set_after_another_worker(*args):  # the other worker's insert landed between our look and our insert
        calls.append(args)
        if len(calls) == 1:
            real_set(*args)
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"experiment_tag_pk"', error_code="BAD_REQUEST")
        return real_set(*args)

    monkeypatch.setattr(tracker.client, "set_experiment_tag", set_after_another_worker)
    tracker.describe_experiment("## mine")
    assert len(calls) == 2
    assert MlflowClient(tracker.uri).get_experiment(experiment_id).tags["mlflow.note.content"] == "## mine"

    first, second = (tracker.client.create_run(experiment_id).info.run_id for _ in range(2))
    tracker.move_best(first)

    def deleted_by_another_worker(run_id, key):  # it moved the tag off that run a moment before us
        real_delete(run_id, key)
        real_delete(run_id, key)

    monkeypatch.setattr(tracker.client, "delete_tag", deleted_by_another_worker)
    tracker.move_best(second)
    tags = {run_id: MlflowClient(tracker.uri).get_run(run_id).data.tags.get(TAG_BEST) for run_id in (first, second)}
    assert tags == {first: None, second: "true"}


# the search shown (issue #28): ranks, the pick's mark, the history, why trials were pruned --------
def test_every_completed_trial_carries_its_rank_and_the_pick_alone_is_marked(story):
    from hpo_peft.tracking.selection import ranks

    study, complete = story["study"], optuna.trial.TrialState.COMPLETE
    places = ranks(study.trials)
    assert sorted(places.values()) == list(range(1, len(places) + 1)) and places[select_best(study.trials).number] == 1
    for trial, run in trials_and_runs(story):
        assert run.info.run_name.startswith(BEST_MARK) == (places.get(trial.number) == 1)
        if trial.state != complete:
            assert RANK not in run.data.metrics
            continue
        assert run.data.metrics[RANK] == places[trial.number]
    first = min((t for t in study.trials if t.state == complete), key=lambda t: t.number)
    history = story["client"].get_metric_history(first.user_attrs[RUN_ID_ATTR], RANK)  # kept up to date
    assert min(history, key=lambda m: m.step).value == 1 and max(history, key=lambda m: m.step).value == places[first.number]
    assert study.metric_names == [OBJECTIVE]  # Optuna's dashboard names the objective as MLflow does


def test_the_optimisation_history_shows_pruned_trials_and_standard_errors(story):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from hpo_peft.tracking.run_story import history_figure

    trials = story["study"].trials
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    figure = history_figure(trials)
    axes = figure.axes[0]
    (bars,) = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
    points, _, (errors,) = bars.lines
    assert list(points.get_xdata()) == [t.number for t in completed] and list(points.get_ydata()) == [t.value for t in completed]
    spans = [y for low, high in errors.get_segments() for y in (low[1], high[1])]
    expected = [t.value + sign * t.user_attrs["standard_error"] for t in completed for sign in (-1, 1)]
    assert spans == pytest.approx(expected)
    (crosses,) = [c for c in axes.collections if c.get_label().startswith("pruned")]
    last = [xy for t in pruned for xy in (t.number, t.intermediate_values[max(t.intermediate_values)])]
    assert list(crosses.get_offsets().ravel()) == pytest.approx(last)
    plt.close(figure)


def test_a_pruned_run_says_why_and_is_named_pruned(story):
    """The percentile pruner (90: keep the top 90 %) compared the trial's best value so far with
    the 10th percentile of the completed trials' values at that epoch: one worker, so those are the
    trials numbered before it."""
    import numpy as np

    from hpo_peft.tracking.run_story import TAG_PRUNED_BECAUSE

    why = re.compile(r"^(\d+\.\d) < 10th percentile (\d+\.\d) at epoch (\d+) "
                     r"\(its best so far vs (\d+) completed trials?; PercentilePruner\)$")
    trials = story["study"].trials
    for trial, run in trials_and_runs(story):
        if trial.state != optuna.trial.TrialState.PRUNED:
            assert TAG_PRUNED_BECAUSE not in run.data.tags
            continue
        reason = run.data.tags[TAG_PRUNED_BECAUSE]
        mine, bar, epoch, n = why.match(reason).groups()
        before = [t.intermediate_values[int(epoch)] for t in trials if t.number < trial.number
                  and t.state == optuna.trial.TrialState.COMPLETE and int(epoch) in t.intermediate_values]
        assert int(n) == len(before) and bar == f"{np.percentile(before, 10):.1f}"
        assert mine == f"{max(trial.intermediate_values.values()):.1f}" and int(epoch) == max(trial.intermediate_values)
        assert f"pruned at epoch {epoch}: {reason}" in run.data.tags["mlflow.note.content"]
        assert run.info.run_name.endswith(f" pruned@{epoch}") and run.info.status == "FINISHED"
        assert run.data.tags["hpo_peft.trial_state"] == "PRUNED"


def test_prune_reasons_name_the_comparison_each_pruner_made():
    from optuna.pruners import HyperbandPruner, MedianPruner, ThresholdPruner
    from optuna.trial import TrialState, create_trial

    from hpo_peft.tracking.run_story import prune_reason

    others = [create_trial(state=TrialState.COMPLETE, value=70.0, intermediate_values={6: v}) for v in (60.0, 64.1, 70.0)]
    assert prune_reason(MedianPruner(), others, {5: 62.5, 6: 61.0}, 6) == \
        "62.5 < median 64.1 at epoch 6 (its best so far vs 3 completed trials; MedianPruner)"
    assert prune_reason(ThresholdPruner(lower=101.0), [], {1: 50.0}, 1) == "50.0 < lower bound 101 at epoch 1 (ThresholdPruner)"
    assert prune_reason(HyperbandPruner(), others, {6: 1.0}, 6) == "pruned by HyperbandPruner at epoch 6"


def test_the_confusion_matrix_title_names_its_epoch_apart_from_the_window_score():
    """The score averages the selected epoch and its neighbours; the cells are the epoch's own."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from hpo_peft.fewshot.evaluate import Metrics
    from hpo_peft.tracking.run_record import validation_confusion
    from hpo_peft.fewshot.validation import score_window

    def epoch(right: int) -> Metrics:  # two classes of 8 images; `right` of the first one predicted right
        return Metrics(balanced_accuracy=(right / 8 + 1) / 2 * 100, loss=1.0,
                       per_class_recall={"a": right / 8 * 100, "b": 100.0}, confusion=[[right, 8 - right], [0, 8]],
                       categories=["a", "b"])

    validations = [epoch(4), epoch(6), epoch(6)]  # 75.0, 87.5, 87.5: the window's mean 83.3
    outcome = SimpleNamespace(validation=score_window(validations, 2), selected_epoch=2, folds=[], fold_validations=[],
                              training=SimpleNamespace(validations=validations))
    figure = validation_confusion(outcome)
    assert figure.axes[0].get_title() == "validation: cells of epoch 2, balanced accuracy 87.5%\nscore 83.3% (mean of epochs 1-3)"
    plt.close(figure)


def test_a_kfold_trial_that_trains_nothing_titles_its_summed_folds_without_epochs():
    """Zero-shot and Tip-Adapter under kfold are scored on each fold: the title says the folds'
    cells are summed, and names no epoch, which they do not have."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from hpo_peft.fewshot.evaluate import Metrics
    from hpo_peft.fewshot.trial import pooled
    from hpo_peft.tracking.run_record import validation_confusion

    def fold(right: int) -> Metrics:
        return Metrics(balanced_accuracy=(right / 4 + 1) / 2 * 100, loss=1.0,
                       per_class_recall={"a": right / 4 * 100, "b": 100.0}, confusion=[[right, 4 - right], [0, 4]],
                       categories=["a", "b"])

    folds = [fold(2), fold(4)]  # 75.0 and 100.0: the score 87.5, the summed cells 87.5
    outcome = SimpleNamespace(validation=pooled(folds), selected_epoch=None, folds=[], fold_validations=folds,
                              training=SimpleNamespace(validations=[]))
    figure = validation_confusion(outcome)
    assert figure.axes[0].get_title() == "validation: 2 folds' cells summed (87.5%)\nscore 87.5%: mean over folds"
    plt.close(figure)


def test_a_small_study_says_why_it_shows_no_parameter_importances(story):
    parent = session_parent(story)
    assert "**Parameter importances** are left out: " in parent.data.tags["mlflow.note.content"]
    files = {a.path for a in story["client"].list_artifacts(parent.info.run_id)}
    assert "param_importances.png" not in files and "optimization_history.png" in files


def test_a_registered_version_describes_its_study_scores_and_label_budget(story):
    from hpo_peft.tracking.pyfunc_model import register_model
    from hpo_peft.tracking.tracker import Tracker

    evaluated = story["evaluate"]
    run_id = evaluated["mlflow_run_id"]
    tracker = Tracker(story["store"], experiment="s", create=False)
    version = register_model(tracker, run_id, evaluated["model_uri"], "story-model")["version"]
    text = story["client"].get_model_version("story-model", str(version)).description
    params = story["client"].get_run(run_id).data.params
    assert "study `s`" in text and run_id in text
    assert f"{evaluated['val_balanced_accuracy']:.2f} ± {evaluated['val_balanced_accuracy_se']:.2f}" in text
    assert f"{evaluated['balanced_accuracy']:.2f} ± {evaluated['standard_error']:.2f}" in text
    assert f"{params['labels_per_class']} labels per class, validation `holdout`" in text


def test_kfold_logs_no_empty_validation_input(demo_kit):
    """kfold validates inside the shots: its runs carry the training input only, not a 0-row
    "validation 16-shot" dataset."""
    from types import SimpleNamespace

    import torch
    from conftest import demo_config_dict

    from hpo_peft.core.config import StudyConfig
    from hpo_peft.data.images import LabelledImages
    from hpo_peft.tracking.run_record import few_shot_inputs

    config = StudyConfig.model_validate(demo_config_dict(demo_kit))
    shots = LabelledImages(["a.jpg", "b.jpg"], torch.tensor([0, 1]), torch.zeros(2, 3, 4, 4))
    empty = shots.subset([])
    workspace = SimpleNamespace(config=config, data=SimpleNamespace(train=shots, val=empty))
    assert [(len(frame), context) for frame, _, _, context in few_shot_inputs(workspace)] == [(2, "training")]
    workspace.data.val = shots  # holdout: the validation images are an input of their own
    assert [context for *_, context in few_shot_inputs(workspace)] == ["training", "validation"]
