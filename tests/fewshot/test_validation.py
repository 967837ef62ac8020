"""Validation within a stated label budget: holdout, k-fold inside the shots, and compare's budget."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import demo_config_dict
from mlflow import MlflowClient

from hpo_peft.app.cli import main
from hpo_peft.app.commands import prepare_study_config
from hpo_peft.core.config import StudyConfig
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.study.session import StudyLocation, run_study
from hpo_peft.fewshot.trial import open_workspace, run_trial


def kfold_config(kit, **data) -> StudyConfig:
    raw = demo_config_dict(kit)
    raw["data"].update({"shots": 8, "validation": "kfold", **data})
    return StudyConfig.model_validate(raw)


@pytest.fixture(scope="module")
def kfold_workspace(demo_kit):
    return open_workspace(kfold_config(demo_kit))


def test_folds_are_disjoint_stratified_and_cover_the_shots_and_nothing_else(kfold_workspace):
    plan, shots = kfold_workspace.plan, kfold_workspace.data.train
    assert plan.scheme.name == "kfold" and plan.labels_per_class == 8 and len(plan.splits) == 4
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


def curve(*accuracies, losses=None):
    from hpo_peft.fewshot.train import EpochMetrics

    losses = losses or [1.0] * len(accuracies)
    return [EpochMetrics(e + 1, 1.0, loss, acc) for e, (acc, loss) in enumerate(zip(accuracies, losses))]


def test_no_fold_is_scored_at_its_own_best_epoch():
    from hpo_peft.fewshot.validation import best_epoch, cross_fitted_epochs

    # fold A peaks alone at epoch 2, B and C at epoch 1: the mean of the folds' own bests would be 83.3
    histories = [curve(50, 90, 50), curve(80, 50, 50), curve(80, 50, 50)]
    assert best_epoch(histories) == 1  # fold means 70, 63.3, 50
    assert cross_fitted_epochs(histories) == [1, 2, 2]  # A by B+C; B by A+C (means 65, 70, 50); C likewise
    # epochs past the shortest fold do not count; ties go to the lower mean loss, then the earlier epoch
    assert best_epoch([curve(60, 70, 99), curve(60, 70)]) == 2
    assert best_epoch([curve(70, 70, losses=[0.9, 0.5]), curve(70, 70, losses=[0.9, 0.5])]) == 2
    assert best_epoch([curve(70, 70), curve(70, 70)]) == 1


def test_a_score_averages_the_chosen_epoch_with_its_neighbours():
    from hpo_peft.fewshot.evaluate import Metrics
    from hpo_peft.fewshot.validation import score_window

    def run(*accuracies):
        return [Metrics(a, a / 100, {"x": float(e)}, [[e]], ["x"]) for e, a in enumerate(accuracies, start=1)]

    spike, plateau = run(40, 45, 90, 40, 45), run(60, 70, 75, 70, 60)
    # the spike's best epoch alone (90) beats the plateau's (75); with its neighbours it does not
    assert score_window(spike, 3).balanced_accuracy == pytest.approx(175 / 3)
    assert score_window(plateau, 3).balanced_accuracy == pytest.approx(215 / 3)
    assert score_window(spike, 3).loss == pytest.approx(1.75 / 3)
    assert score_window(spike, 3).confusion == [[3]] and score_window(spike, 3).per_class_recall == {"x": 3.0}
    # at the edges the window is cut: the first epoch and the last one run
    assert score_window(spike, 1).balanced_accuracy == pytest.approx(42.5)
    assert score_window(spike[:3], 3).balanced_accuracy == pytest.approx(67.5)
    assert score_window(spike, 5).balanced_accuracy == pytest.approx(42.5)


def test_folds_stop_together_on_their_mean_curve():
    from hpo_peft.fewshot.validation import stop_together

    def stops_after(histories, patience):  # lockstep: asked after every epoch, the first yes stops
        return next((e for e in range(1, len(histories[0]) + 1)
                     if stop_together([h[:e] for h in histories], patience)), None)

    # fold A alone would stop at epoch 4 (best at 2, patience 2) and cut B's curve before B learns;
    # the mean curve (50, 55, 62.5, 67.5, 70, 80) keeps improving: both folds go on
    a, b = curve(50, 60, 55, 55, 55, 70), curve(50, 50, 70, 80, 85, 90)
    assert stops_after([a, b], patience=2) is None
    # the mean curve peaks at epoch 2 (75) and does not beat it for 2 epochs: stop after epoch 4
    c, d = curve(50, 80, 60, 70, 99), curve(50, 70, 60, 60, 99)
    assert stops_after([c, d], patience=2) == 4
    # a tie in accuracy with a lower mean loss is an improvement; no patience: never stop
    e = curve(50, 70, 70, 70, losses=[1.0, 0.9, 0.8, 0.7])
    assert stops_after([e, e], patience=2) is None
    assert stops_after([c, d], patience=None) is None


def test_a_kfold_trial_scores_the_fold_mean_and_refits_on_all_shots(kfold_workspace):
    from hpo_peft.core.config import TrainConfig

    outcome = run_trial(kfold_workspace, "bias", {}, TrainConfig(max_epochs=5, patience=2, learning_rate=0.003, precision="fp32"),
                        progress=False)
    assert len(outcome.folds) == 4
    epochs = len(outcome.folds[0].history)
    assert [len(f.history) for f in outcome.folds] == [epochs] * 4  # the folds stop together
    accuracy = np.array([[m.val_balanced_accuracy for m in f.history] for f in outcome.folds])
    mean, mean_loss = accuracy.mean(axis=0), np.array([[m.val_loss for m in f.history] for f in outcome.folds]).mean(axis=0)
    stop, best = 5, 0  # early stopping (patience 2) on the folds' mean curve, epoch by epoch
    for e in range(1, epochs):
        if (-mean[e], mean_loss[e]) < (-mean[best], mean_loss[best]):
            best = e
        elif e - best >= 2:
            stop = e + 1
            break
    assert epochs == stop  # not before patience ran out, and no further: the folds' epochs are not wasted
    table = np.array([[m.val_balanced_accuracy for m in f.history[:epochs]] for f in outcome.folds])
    losses = np.array([[m.val_loss for m in f.history[:epochs]] for f in outcome.folds])
    expected_refit = 1 + min(range(epochs), key=lambda e: (-table[:, e].mean(), losses[:, e].mean(), e))
    assert outcome.selected_epoch == expected_refit  # the fold-mean curve's best epoch
    scored = []
    for k in range(4):  # each fold at the epoch the other three pick
        others, other_losses = np.delete(table, k, axis=0).mean(axis=0), np.delete(losses, k, axis=0).mean(axis=0)
        scored.append(min(range(epochs), key=lambda e: (-others[e], other_losses[e], e)))
    assert outcome.scored_epochs == [e + 1 for e in scored]
    # each fold's score: its epochs around the scored one, within the epochs counted
    window = [range(max(0, e - 1), min(epochs, e + 2)) for e in scored]
    fold_scores = [table[k, w].mean() for k, w in enumerate(window)]
    assert outcome.fold_scores() == pytest.approx(fold_scores)
    assert outcome.validation.balanced_accuracy == pytest.approx(np.mean(fold_scores))
    assert outcome.validation.loss == pytest.approx(np.mean([losses[k, w].mean() for k, w in enumerate(window)]))
    assert outcome.validation.balanced_accuracy <= np.mean([max(row) for row in accuracy])  # never above the own-best mean
    assert np.sum(outcome.validation.confusion) == 32  # every shot validated once, out of fold
    assert len(outcome.training.history) == outcome.selected_epoch  # the refit: fixed epochs, no validation
    assert all(m.val_loss is None for m in outcome.training.history)
    assert outcome.labels_per_class == 8 and outcome.scheme.name == "kfold"


def test_folds_in_lockstep_train_as_each_would_alone(kfold_workspace):
    """Lockstep interleaves the folds' epochs; each fold keeps its own random stream (batch order,
    LoRA dropout), so its curve is the one it gets trained by itself for as many epochs."""
    from hpo_peft.core.config import TrainConfig
    from hpo_peft.methods import get_method, method_config
    from hpo_peft.models.classifier import build_classifier
    from hpo_peft.core.runtime import set_seeds
    from hpo_peft.fewshot.train import train

    config = TrainConfig(max_epochs=4, patience=None, learning_rate=0.01, precision="fp32")
    options = {"rank": 4, "b_init": "random", "dropout": 0.3}
    outcome = run_trial(kfold_workspace, "lora", options, config, progress=False)
    seed, categories = kfold_workspace.config.data.seed, kfold_workspace.config.data.categories
    for k, split in enumerate(kfold_workspace.plan.splits):
        set_seeds(seed)
        alone = get_method("lora").prepare(build_classifier(kfold_workspace.base, kfold_workspace.prototypes),
                                           method_config("lora", options))
        history = train(alone, split, kfold_workspace.base.preprocessing, categories, config, seed, progress=False,
                        features=kfold_workspace.features).history
        assert [(m.train_loss, m.val_loss, m.val_balanced_accuracy) for m in history] == \
            [(m.train_loss, m.val_loss, m.val_balanced_accuracy) for m in outcome.folds[k].history], f"fold {k + 1}"


def test_one_shot_cannot_be_validated_in_folds(demo_kit, write_config, capsys):
    plan = open_workspace(kfold_config(demo_kit, shots=1)).plan
    assert plan.scheme.name == "fixed" and not plan.selects and plan.labels_per_class == 1
    config = write_config(data={"shots": 1, "validation": "kfold"})
    assert main(["study", "run", str(config), "--storage", "/nonexistent/o.journal"]) == 2
    assert "kfold needs at least 2 shots per class" in capsys.readouterr().err


def test_a_kfold_study_logs_its_budget_fold_curves_and_prunes_on_the_mean_curve(write_config, tmp_path, capsys):
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
        mean = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        f1 = client.get_metric_history(run.info.run_id, "fold1.val_balanced_accuracy")
        f2 = client.get_metric_history(run.info.run_id, "fold2.val_balanced_accuracy")
        # per epoch: each fold's curve and, as it ends, their mean, which is what the pruner sees
        # (logged values keep 6 significant digits, run_story.display_value)
        assert [m.step for m in mean] == [m.step for m in f1] == [m.step for m in f2] == sorted(trial.intermediate_values)
        assert [m.value for m in mean] == pytest.approx([(a.value + b.value) / 2 for a, b in zip(f1, f2)], rel=1e-5)
        assert [m.value for m in mean] == pytest.approx([trial.intermediate_values[m.step] for m in mean], rel=1e-5)
        if trial.state.name == "COMPLETE":
            assert len(mean) == 3 and run.data.metrics["objective_val_balanced_accuracy"] == trial.value
            assert np.mean(trial.user_attrs["fold_scores"]) == pytest.approx(trial.value, rel=1e-5)
        else:  # stopped at an epoch of the mean curve, every fold with it
            assert trial.state.name == "PRUNED" and run.data.metrics["pruned_at_epoch"] == len(mean)
    capsys.readouterr()
    assert main(["study", "best", str(config), "--study-name", "kf", "--storage", options.storage,
                 "--tracking-uri", options.tracking_uri, "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(completed) >= 2:  # the best of several: reported less what choosing it adds (selection.corrected_score)
        assert best["val_balanced_accuracy_corrected"] <= best["val_balanced_accuracy"]
    else:
        assert best["val_balanced_accuracy_corrected"] is None


def test_kfold_trials_that_train_nothing_keep_their_fold_scores_for_the_correction(write_config, tmp_path, capsys):
    """Zero-shot and Tip-Adapter score on each fold's validation images like a trained method: the
    trial's value is their mean, and the winner's-curse correction counts them among its rows."""
    from hpo_peft.tracking.selection import FOLD_SCORES_ATTR, corrected_score, select_best

    search = {"n_trials": 2, "sampler": {"name": "random"}, "pruner": {"name": "none"},
              "params": {"method": {"choices": ["zero_shot", "tip_adapter"]}, "max_epochs": 2},
              "enqueue": [{"method": "zero_shot"}, {"method": "tip_adapter"}]}
    config = write_config(data={"shots": 4, "validation": "kfold", "folds": 2}, search=search)
    options = StudyLocation("kz", storage=str(tmp_path / "o.journal"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    study = run_study(prepare_study_config(config, []), options, n_trials=2, timeout=None)
    trials = study.trials
    assert sorted(t.params["method"] for t in trials) == ["tip_adapter", "zero_shot"]
    for trial in trials:
        assert trial.state.name == "COMPLETE"
        assert len(trial.user_attrs[FOLD_SCORES_ATTR]) == 2
        assert np.mean(trial.user_attrs[FOLD_SCORES_ATTR]) == pytest.approx(trial.value, rel=1e-5)
    best = select_best(trials)
    assert corrected_score(trials, best) is not None
    capsys.readouterr()
    assert main(["study", "best", str(config), "--study-name", "kz", "--storage", options.storage,
                 "--tracking-uri", options.tracking_uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_balanced_accuracy_corrected"] == pytest.approx(
        corrected_score(trials, best))


@pytest.mark.parametrize("validation, budget", [("kfold", lambda k: k), ("holdout", lambda k: 2 * k)])
@pytest.mark.slow
def test_compare_reads_no_more_labels_than_its_budget(write_config, tmp_path, monkeypatch, capsys, validation, budget):
    from hpo_peft.fewshot import trial as trial_module

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


def test_a_holdout_trial_with_refit_keeps_an_adapter_trained_on_every_label(demo_kit):
    """`data.refit`: the validated run (K shots) chooses the epochs and gives the score; the kept
    adapter is trained again from scratch on the K shots and K_val validation images for that many."""
    from hpo_peft.core.config import TrainConfig
    from hpo_peft.data import FewShotSplit
    from hpo_peft.study.identity import differences, fingerprint
    from hpo_peft.methods import get_method, method_config
    from hpo_peft.models.classifier import build_classifier
    from hpo_peft.core.runtime import set_seeds
    from hpo_peft.fewshot.train import train

    def holdout(refit):
        raw = demo_config_dict(demo_kit)
        raw["data"].update({"shots": 4, "val_shots": 4, "validation": "holdout", "refit": refit})
        return StudyConfig.model_validate(raw)

    plain, refit = open_workspace(holdout(False)), open_workspace(holdout(True))
    assert plain.plan.refit is None
    assert refit.plan.refit.names == refit.data.train.names + refit.data.val.names  # 8 labels per class, all of them
    assert np.bincount(refit.plan.refit.labels.numpy()).tolist() == [8, 8, 8, 8] and refit.plan.labels_per_class == 8
    config = TrainConfig(max_epochs=5, patience=2, learning_rate=0.01, precision="fp32")
    kept, chosen = (run_trial(w, "bias", {}, config, progress=False) for w in (plain, refit))
    assert (kept.refit, chosen.refit) == (False, True)
    # the same validated run: the same curve, epoch and score
    assert chosen.selected_epoch == kept.selected_epoch == kept.training.best.epoch
    assert [m.val_balanced_accuracy for m in chosen.training.history] == [m.val_balanced_accuracy for m in kept.training.history]
    assert chosen.validation.balanced_accuracy == kept.validation.balanced_accuracy
    # the adapter kept is a run on all 8 labels per class for the chosen epochs, without validation
    set_seeds(refit.config.data.seed)
    alone = get_method("bias").prepare(build_classifier(refit.base, refit.prototypes), method_config("bias", {}))
    history = train(alone, FewShotSplit(refit.plan.refit, None), refit.base.preprocessing, refit.config.data.categories,
                    config.model_copy(update={"max_epochs": chosen.selected_epoch, "patience": None}),
                    refit.config.data.seed, progress=False, features=refit.features).history
    assert len(history) == chosen.selected_epoch
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), chosen.classifier.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(kept.classifier.state_dict().values(), chosen.classifier.state_dict().values()))
    # a study started before the key existed keeps its fingerprint; turning refit on changes it
    assert "data.refit" not in fingerprint(plain.config)
    assert differences(fingerprint(plain.config), fingerprint(refit.config)) == ["data.refit"]


def test_the_trial_command_says_a_kfold_trial_that_trains_nothing_was_scored_on_each_fold(write_config, capsys):
    config = write_config(data={"shots": 4, "validation": "kfold", "folds": 2})
    assert main(["trial", str(config), "--method", "zero_shot"]) == 0
    out = capsys.readouterr().out
    assert "2 folds scored; nothing trains, so nothing is refit" in out
    assert "refit on all" not in out and "None epochs" not in out
