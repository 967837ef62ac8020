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

from hpo_peft.cli import main
from hpo_peft.recovery import RUN_ID_ATTR
from hpo_peft.run_story import (
    OBJECTIVE,
    TAG_BEST,
    display_value,
    session_name,
    trial_name,
)
from hpo_peft.selection import select_best
from hpo_peft.study import load_study
from hpo_peft.ui_links import run_table_url, run_url

ROOT = Path(__file__).resolve().parents[1]
SEARCH = {  # as tests/test_study.py: random draws, and a pruner that prunes trials below the best so far
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
    from hpo_peft.study import StudyLocation

    return load_study(StudyLocation("s", storage=str(tmp / "optuna.journal")))


def trials_and_runs(s):
    return [(t, s["runs"][t.user_attrs[RUN_ID_ATTR]]) for t in s["study"].trials]


def test_trial_runs_are_named_by_number_method_settings_and_score(story):
    pairs = trials_and_runs(story)
    states = {t.state for t, _ in pairs}
    assert {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED} <= states
    for trial, run in pairs:
        name = run.info.run_name
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
    from hpo_peft.tracking import Tracker

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

    from hpo_peft.run_record import best_marker
    from hpo_peft.tracking import Tracker

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
    assert "workflowType=machine_learning" in table and "orderByKey=metrics.%60" + OBJECTIVE + "%60" in table
    assert f"mlflow ui --backend-store-uri {story['store']}" in story["run_out"]
    assert story["evaluate"]["mlflow_ui"]["run_table"] == table


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
    value_of = {r.info.run_name: t.value if t.state == complete else None for t, r in trials_and_runs(story)}
    shown_trials = [n for n in shown if n in value_of]
    assert sorted(shown_trials) == sorted(value_of)  # every trial, by its new name
    values = [value_of[n] for n in shown_trials]
    completed = [v for v in values if v is not None]
    assert values[:len(completed)] == completed  # pruned trials (no objective) last
    assert completed == sorted(completed, reverse=True)  # best first


def test_workers_writing_the_same_tag_at_once_do_not_fail(tmp_path, monkeypatch):
    """Seen with two workers on a PostgreSQL-backed server: both found no experiment description and
    both inserted it; the second insert broke the unique key and ended its worker."""
    from mlflow.exceptions import MlflowException

    from hpo_peft.tracking import Tracker

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
