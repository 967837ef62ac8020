"""Validation within a stated label budget: holdout, k-fold inside the shots, and compare's budget."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import demo_config_dict
from mlflow import MlflowClient

from hpo_peft.cli import main
from hpo_peft.commands import prepare_study_config
from hpo_peft.config import StudyConfig
from hpo_peft.recovery import RUN_ID_ATTR
from hpo_peft.study import StudyLocation, run_study
from hpo_peft.trial import open_workspace, run_trial


def kfold_config(kit, **data) -> StudyConfig:
    raw = demo_config_dict(kit)
    raw["data"].update({"shots": 8, "validation": "kfold", **data})
    return StudyConfig.model_validate(raw)


@pytest.fixture(scope="module")
def kfold_workspace(demo_kit):
    return open_workspace(kfold_config(demo_kit))


def test_folds_are_disjoint_stratified_and_cover_the_shots_and_nothing_else(kfold_workspace):
    plan, shots = kfold_workspace.plan, kfold_workspace.data.train
    assert plan.scheme == "kfold" and plan.labels_per_class == 8 and len(plan.splits) == 4
    assert len(kfold_workspace.data.val) == 0  # no validation images beyond the shots were drawn
    assert np.bincount(shots.labels.numpy()).tolist() == [8, 8, 8, 8]
    held_out = []
    for split in plan.splits:
        assert set(split.train.names).isdisjoint(split.val.names)
        assert set(split.train.names) | set(split.val.names) == set(shots.names)
        assert np.bincount(split.val.labels.numpy()).tolist() == [2, 2, 2, 2]
        held_out += split.val.names
    assert sorted(held_out) == sorted(shots.names)  # each shot validated exactly once
    assert plan.refit.names == shots.names


def test_a_kfold_trial_scores_the_fold_mean_and_refits_on_all_shots(kfold_workspace):
    from hpo_peft.config import TrainConfig

    outcome = run_trial(kfold_workspace, "bias", {}, TrainConfig(max_epochs=5, patience=2, learning_rate=0.003, precision="fp32"),
                        progress=False)
    assert len(outcome.folds) == 4
    bests = [f.best for f in outcome.folds]
    assert outcome.validation.balanced_accuracy == pytest.approx(np.mean([b.val_balanced_accuracy for b in bests]))
    assert outcome.validation.loss == pytest.approx(np.mean([b.val_loss for b in bests]))
    assert np.sum(outcome.validation.confusion) == 32  # every shot validated once, out of fold
    assert outcome.selected_epoch == sorted(b.epoch for b in bests)[1]  # lower median of 4
    assert len(outcome.training.history) == outcome.selected_epoch  # the refit: fixed epochs, no validation
    assert all(m.val_loss is None for m in outcome.training.history)
    assert outcome.labels_per_class == 8 and outcome.scheme == "kfold"


def test_one_shot_cannot_be_validated_in_folds(demo_kit, write_config, capsys):
    plan = open_workspace(kfold_config(demo_kit, shots=1)).plan
    assert plan.scheme == "fixed" and not plan.selects and plan.labels_per_class == 1
    config = write_config(data={"shots": 1, "validation": "kfold"})
    assert main(["study", "run", str(config), "--storage", "/nonexistent/o.journal"]) == 2
    assert "kfold needs at least 2 shots per class" in capsys.readouterr().err


def test_a_kfold_study_logs_its_budget_fold_curves_and_prunes_on_folds(write_config, tmp_path):
    search = {"n_trials": 3, "sampler": {"name": "random"}, "pruner": {"name": "percentile", "percentile": 99.0,
              "n_startup_trials": 1, "n_warmup_steps": 0},
              "params": {"method": {"choices": ["bias", "clap"]}, "learning_rate": {"low": 0.001, "high": 0.01, "log": True},
                         "max_epochs": 3, "patience": None}}
    config = write_config(data={"shots": 4, "validation": "kfold", "folds": 2}, search=search)
    options = StudyLocation("kf", storage=str(tmp_path / "o.journal"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    study = run_study(prepare_study_config(config, []), options, n_trials=3, timeout=None)
    client = MlflowClient(options.tracking_uri)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.data.params["labels_per_class"] == "4" and run.data.params["data.validation"] == "kfold"
        assert set(trial.intermediate_values) <= {1, 2}  # reported per fold seen, not per epoch
        assert len(client.get_metric_history(run.info.run_id, "fold1.val_balanced_accuracy")) == 3
        if trial.state.name == "COMPLETE":
            assert run.data.metrics["objective_val_balanced_accuracy"] == trial.value
            mean = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
            f1 = client.get_metric_history(run.info.run_id, "fold1.val_balanced_accuracy")
            f2 = client.get_metric_history(run.info.run_id, "fold2.val_balanced_accuracy")
            # logged values keep 6 significant digits (run_story.display_value)
            assert [m.value for m in mean] == pytest.approx([(a.value + b.value) / 2 for a, b in zip(f1, f2)], rel=1e-5)
            assert trial.intermediate_values[2] == pytest.approx(trial.value)
        else:
            assert trial.state.name == "PRUNED" and "pruned_after_fold" in run.data.metrics


@pytest.mark.parametrize("validation, budget", [("kfold", lambda k: k), ("holdout", lambda k: 2 * k)])
def test_compare_reads_no_more_labels_than_its_budget(write_config, tmp_path, monkeypatch, capsys, validation, budget):
    from hpo_peft import trial as trial_module

    drawn = []
    real = trial_module.load_few_shot

    def recording(data_config, prep):
        split = real(data_config, prep)
        drawn.append((data_config.shots, np.bincount(split.train.labels.numpy()).tolist(),
                      np.bincount(split.val.labels.numpy(), minlength=4).tolist()))
        return split

    monkeypatch.setattr(trial_module, "load_few_shot", recording)
    course_sgd = {"optimizer": "sgd", "learning_rate": 0.001, "max_epochs": 3, "patience": None}
    config = write_config(data={"validation": validation}, train={"max_epochs": 2, "patience": None},
                          method_train={"clap": course_sgd})
    store = f"sqlite:///{tmp_path}/m.db"
    argv = ["compare", str(config), "--shots", "1", "2", "--seeds", "1", "--methods", "zero_shot", "clap",
            "--trials-per-method", "1", "--study-name", "c", "--storage", str(tmp_path / "o.journal"),
            "--tracking-uri", store, "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    for shots, train, val in drawn:
        assert train == [shots] * 4
        assert sum(train) + sum(val) == 4 * budget(shots)
    summary = pd.read_csv(tmp_path / "out" / "compare_summary.csv")
    assert sorted(zip(summary.shots, summary.labels_per_class)) == sorted((k, budget(k)) for k in (1, 2) for _ in range(2))
    one_shot = summary[summary.shots == 1].selection.tolist()
    assert one_shot == (["fixed defaults"] * 2 if validation == "kfold" else ["holdout"] * 2)
    assert "gap_mean" in summary.columns
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("c-compare").experiment_id], max_results=100)
    clap = [r for r in runs if r.data.params.get("method") == "clap"]
    assert clap and all(r.data.params["train.optimizer"] == "sgd" and r.data.params["train.learning_rate"] == "0.001"
                        for r in clap)  # the demo space's Adam learning rates do not reach a black-box adapter
