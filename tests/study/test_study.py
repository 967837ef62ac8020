"""The study end to end on the demo kit, with a temporary Optuna storage and MLflow store."""

import json
import shutil
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from hpo_peft.app.cli import main
from hpo_peft.app.commands import prepare_study_config
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.selection import select_best
from hpo_peft.study.session import StudyLocation, load_study, run_study

SEARCH = {
    "n_trials": 6,
    "sampler": {"name": "random", "seed": 2},
    # prunes a trial as soon as it falls below the best earlier trial at the same epoch
    "pruner": {"name": "percentile", "percentile": 90.0, "n_startup_trials": 1, "n_warmup_steps": 0},
    "params": {
        "method": {"choices": ["bias", "lora"]},
        "learning_rate": {"low": 0.002, "high": 0.01, "log": True},
        "max_epochs": {"choices": [4, 6]},
        "patience": 3,
    },
    "methods": {"lora": {"rank": {"choices": [1, 2, 4]}, "b_init": {"choices": ["zeros", "random"]}}},
}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, demo_kit):
    """A 6-trial study, then a second session of 2 more trials on the same storage."""
    import yaml
    from conftest import demo_config_dict

    tmp = tmp_path_factory.mktemp("study")
    shutil.copytree(demo_kit / "sicapv2", tmp / "sicapv2")
    raw = demo_config_dict(demo_kit)
    raw["data"]["root"] = str(tmp / "sicapv2")
    raw["search"] = SEARCH
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    # the study never needs the test table: make it unreadable for the whole study
    test_table = tmp / "sicapv2/partition/Test/Test.xlsx"
    saved = test_table.read_bytes()
    test_table.write_bytes(b"garbage, not a spreadsheet")
    options = StudyLocation("s", storage=str(tmp / "optuna.journal"), tracking_uri="sqlite:///" + str(tmp / "mlflow.db"))
    config = prepare_study_config(path, [])
    first = run_study(config, options, n_trials=6, timeout=None)
    first_numbers = [t.number for t in first.trials]
    run_study(config, options, n_trials=2, timeout=None)
    return {"path": path, "options": options, "tmp": tmp, "first_numbers": first_numbers,
            "test_table": test_table, "test_bytes": saved}


def cli_options(s):
    o = s["options"]
    return ["--study-name", o.study_name, "--storage", o.storage, "--tracking-uri", o.tracking_uri]


def child_runs(s):
    client = MlflowClient(s["options"].tracking_uri)
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"]
    children = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "trial"]
    return client, parents, children


@pytest.mark.slow
def test_resume_continues_numbering_without_duplicates(finished_study):
    study = load_study(finished_study["options"])
    assert finished_study["first_numbers"] == list(range(6))
    assert [t.number for t in study.trials] == list(range(8))
    client, parents, children = child_runs(finished_study)
    assert len(parents) == 2
    assert sorted(int(r.data.tags["hpo_peft.trial_number"]) for r in children) == list(range(8))
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
    assert {r.info.status for r in parents + children} <= {"FINISHED"}


def test_trials_log_params_metrics_and_artifacts(finished_study):
    study = load_study(finished_study["options"])
    client, _, children = child_runs(finished_study)
    by_number = {int(r.data.tags["hpo_peft.trial_number"]): r for r in children}
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    methods = set()
    for trial in study.trials:
        run = by_number[trial.number]
        assert trial.user_attrs[RUN_ID_ATTR] == run.info.run_id
        assert run.data.tags["hpo_peft.trial_state"] == trial.state.name
        params = run.data.params
        methods.add(params["method"])
        assert float(params["train.learning_rate"]) == pytest.approx(trial.params["learning_rate"], rel=1e-3)
        assert params["train.patience"] == "3"
        if params["method"] == "lora":
            assert {"lora.rank", "lora.b_init"} <= set(trial.params)
            assert params["lora.rank"] == str(trial.params["lora.rank"])
        else:
            assert not any(k.startswith("lora.") for k in trial.params)
            assert not any(k.startswith("lora.") for k in params)
        history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and history
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == len(history)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            metrics = run.data.metrics
            assert metrics["objective_val_balanced_accuracy"] == trial.value
            assert metrics["trainable_parameters"] > 0 and metrics["selected_epoch"] >= 1 and metrics["wall_time_s"] > 0
            files = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"validation_confusion_matrix.png", "validation_metrics.json", "adapter"} <= files
            adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
            assert {"adapter/hpo_peft_adapter.json", "adapter/head.safetensors"} <= adapter
            confusion = json.loads(open(client.download_artifacts(run.info.run_id, "validation_metrics.json")).read())
            assert sum(map(sum, confusion["confusion_matrix"])) == 4 * 16
        else:
            assert "adapter" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert methods == {"bias", "lora"}


def test_parent_run_has_study_plots_and_best(finished_study):
    client, parents, _ = child_runs(finished_study)
    study = load_study(finished_study["options"])
    last = max(parents, key=lambda r: r.info.start_time)
    files = {a.path for a in client.list_artifacts(last.info.run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png", "config.json"} <= files
    assert last.data.metrics["objective_val_balanced_accuracy"] == pytest.approx(study.best_value)
    assert last.data.tags["hpo_peft.best_run_id"] == select_best(study.trials).user_attrs[RUN_ID_ATTR]


def test_best_command_prints_the_best_trial(finished_study, capsys):
    assert main(["study", "best", str(finished_study["path"]), *cli_options(finished_study), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    study = load_study(finished_study["options"])
    assert best["trial_number"] == select_best(study.trials).number
    assert best["val_balanced_accuracy"] == study.best_value


def test_evaluate_needs_a_readable_test_table(finished_study, capsys):
    code = main(["evaluate", str(finished_study["path"]), *cli_options(finished_study)])
    assert code == 2
    assert "Test.xlsx: cannot read the table" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_in_fresh_process_reproduces_in_memory_best(finished_study, demo_workspace, capsys):
    finished_study["test_table"].write_bytes(finished_study["test_bytes"])
    out = subprocess.run(
        [sys.executable, "-m", "hpo_peft.app.cli", "evaluate", str(finished_study["path"]), *cli_options(finished_study),
         "--json", "--register", "demo-best"],
        capture_output=True, text=True, check=True,
    )
    fresh = json.loads(out.stdout)
    study = load_study(finished_study["options"])
    best = select_best(study.trials)
    assert fresh["mlflow_run_id"] == best.user_attrs[RUN_ID_ATTR]

    # the same trial retrained in memory (training is deterministic for a seed) and evaluated here
    from hpo_peft.core.config import TrainConfig
    from hpo_peft.data import load_test
    from hpo_peft.fewshot.evaluate import evaluate
    from hpo_peft.fewshot.trial import run_trial

    config = prepare_study_config(finished_study["path"], [])
    params = {k: v for k, v in best.params.items()}
    method = params.pop("method")
    options = {k.split(".", 1)[1]: params.pop(k) for k in list(params) if k.startswith(method + ".")}
    train = TrainConfig.model_validate({**config.train.model_dump(), **params, "patience": 3})
    outcome = run_trial(demo_workspace, method, options, train, progress=False)
    assert outcome.validation.balanced_accuracy == pytest.approx(best.value)
    test = evaluate(outcome.classifier, load_test(config.data, demo_workspace.base.preprocessing),
                    demo_workspace.base.preprocessing, config.data.categories)
    assert fresh["balanced_accuracy"] == pytest.approx(test.balanced_accuracy, abs=1e-9)
    # each score with its binomial standard error, from its own images' per-class recall
    for scored, error in ((test, fresh["standard_error"]), (outcome.validation, fresh["val_balanced_accuracy_se"])):
        confusion = np.array(scored.confusion)
        counts = confusion.sum(axis=1)
        shrunk = (confusion.diagonal() + 0.5) / (counts + 1)  # half an image right, half wrong
        assert error == pytest.approx(100 * np.sqrt(np.sum(shrunk * (1 - shrunk) / counts)) / len(counts), rel=1e-5)

    client, _, _ = child_runs(finished_study)
    run = client.get_run(fresh["mlflow_run_id"])
    from hpo_peft.tracking.run_story import display_value

    # metrics are logged to 6 significant digits
    assert run.data.metrics["test_balanced_accuracy"] == display_value(fresh["balanced_accuracy"])
    assert run.data.metrics["test_standard_error"] == display_value(fresh["standard_error"])
    capsys.readouterr()
    assert main(["study", "best", str(finished_study["path"]), *cli_options(finished_study)]) == 0
    printed = capsys.readouterr().out  # `study best` now shows both scores, each with its error
    assert f"{best.value:.2f}% ± {fresh['val_balanced_accuracy_se']:.2f}" in printed
    assert f"test balanced accuracy: {fresh['balanced_accuracy']:.2f}% ± {fresh['standard_error']:.2f}" in printed
    assert "test_confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    version = client.get_model_version_by_alias("demo-best", "best")
    assert version.run_id == run.info.run_id


def test_peft_loads_a_lora_artifact(finished_study, demo_workspace, tmp_path):
    from peft import PeftModel

    study = load_study(finished_study["options"])
    lora = [t for t in study.trials if t.state.name == "COMPLETE" and t.params["method"] == "lora"]
    assert lora, "the study drew no completed LoRA trial"
    client = MlflowClient(finished_study["options"].tracking_uri)
    folder = client.download_artifacts(lora[0].user_attrs[RUN_ID_ATTR], "adapter/peft_adapter", str(tmp_path))
    encoder = demo_workspace.base.image_encoder()
    import copy

    model = PeftModel.from_pretrained(copy.deepcopy(encoder), folder)
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(names) == 3 * 2  # q, k, v in each of the demo model's 2 layers
    assert model.peft_config["default"].r == lora[0].params["lora.rank"]
    pixels = torch.zeros(1, 3, 64, 64)
    assert model(pixels).shape == encoder(pixels).shape


def test_evaluate_refuses_a_tampered_adapter(finished_study, capsys):
    """Runs last in this module: it damages the best trial's stored adapter."""
    from pathlib import Path
    from urllib.parse import urlparse

    finished_study["test_table"].write_bytes(finished_study["test_bytes"])
    study = load_study(finished_study["options"])
    client = MlflowClient(finished_study["options"].tracking_uri)
    run = client.get_run(select_best(study.trials).user_attrs[RUN_ID_ATTR])
    folder = Path(urlparse(run.info.artifact_uri).path) / "adapter"
    assert folder.is_relative_to(finished_study["tmp"])  # artifacts live beside the SQLite store
    head = folder / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-8])
    assert main(["evaluate", str(finished_study["path"]), *cli_options(finished_study)]) == 2
    assert "head.safetensors: checksum mismatch" in capsys.readouterr().err
