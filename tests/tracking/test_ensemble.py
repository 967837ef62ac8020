"""The study's top trials as one model (`search.ensemble`, #28): retention keeps the members, `evaluate`
builds the ensemble run once and scores the mean of the members' probabilities, and `predict` and the
pyfunc model serve it through the same path. One tiny study serves the module."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hpo_peft.app.cli import main

SEARCH = {
    "n_trials": 4,
    "sampler": {"name": "random", "seed": 5},
    "pruner": {"name": "none"},
    "params": {"method": {"choices": ["bias", "lora", "affine_ln"]}, "learning_rate": {"low": 0.002, "high": 0.02, "log": True},
               "max_epochs": 3, "patience": 2},
    "keep_adapters": "best:1",  # the members are kept all the same
    "ensemble": 3,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, demo_kit):
    from conftest import run_demo_study

    return run_demo_study(demo_kit, tmp_path_factory.mktemp("ensemble"), "top3", SEARCH, n_trials=4)


def run_json(args: list[str]) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def evaluated(study):
    return run_json(["evaluate", str(study["path"]), *study["options"], "--register", "top3-model"])


def ranked_runs(study) -> list[tuple[int, str]]:
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.tracking.selection import ranks

    trials = study["study"].get_trials()
    order = ranks(trials)
    return [(t.number, t.user_attrs[RUN_ID_ATTR]) for t in sorted(trials, key=lambda t: order.get(t.number, 99))
            if t.number in order]


@pytest.fixture(scope="module")
def test_split(study, demo_workspace):
    from hpo_peft.data import load_test

    return load_test(demo_workspace.config.data, demo_workspace.base.preprocessing)


def members_mean(study, demo_workspace, test_split, run_ids: list[str]) -> torch.Tensor:
    """The reference, apart from the ensemble's code: each member's own adapter rebuilt with
    `load_adapter`, its softmax on the test images, the mean."""
    from hpo_peft.fewshot.artifacts import load_adapter
    from hpo_peft.fewshot.evaluate import forward_in_batches
    from hpo_peft.tracking.tracker import Tracker

    tracker, probabilities = Tracker(study["uri"], "top3", create=False), []
    for run_id in run_ids:
        folder = tracker.download_adapter(run_id, study["tmp"] / f"ref-{run_id}")
        classifier, _ = load_adapter(folder, demo_workspace.base)
        logits = forward_in_batches(classifier, test_split.images, demo_workspace.base.preprocessing)
        probabilities.append(torch.softmax(logits, dim=1))
    return torch.stack(probabilities).mean(dim=0)


def test_retention_keeps_the_members_beyond_keep_adapters(study):
    from hpo_peft.tracking.tracker import TAG_DROPPED

    client, ranked = MlflowClient(study["uri"]), ranked_runs(study)
    assert len(ranked) == 4
    dropped = [TAG_DROPPED in client.get_run(run_id).data.tags for _, run_id in ranked]
    assert dropped == [False, False, False, True]  # best:1 keeps one; the ensemble keeps its three


def test_evaluate_scores_the_mean_of_the_top_trials_probabilities(study, evaluated, demo_workspace, test_split):
    from sklearn.metrics import balanced_accuracy_score

    ranked = ranked_runs(study)
    assert evaluated["ensemble_trials"] == [number for number, _ in ranked[:3]]
    run = MlflowClient(study["uri"]).get_run(evaluated["mlflow_run_id"])
    assert run.data.tags["hpo_peft.run_kind"] == "ensemble"
    assert run.info.run_name == "ensemble of top 3: trials " + ", ".join(str(n) for n, _ in ranked[:3])
    assert run.data.params["labels_per_class"]  # the label budget travels with the model
    assert run.data.metrics["selection_rank"] == 0  # above the trials (rank 1 on) in the table the links sort
    methods = [t.params["method"] for t in sorted(study["study"].get_trials(), key=lambda t: t.number)]
    assert run.data.params["ensemble.methods"] == ",".join(methods[n] for n, _ in ranked[:3])
    mean = members_mean(study, demo_workspace, test_split, [run_id for _, run_id in ranked[:3]])
    expected = 100 * balanced_accuracy_score(test_split.labels.numpy(), mean.argmax(dim=1).numpy())
    assert evaluated["balanced_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert run.data.metrics["test_balanced_accuracy"] == pytest.approx(expected, abs=1e-4)  # display rounding


def test_a_second_evaluate_scores_the_same_ensemble_run(study, evaluated):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["evaluate", str(study["path"]), *study["options"]]) == 0
    printed = out.getvalue()
    assert f"run {evaluated['mlflow_run_id']} (ensemble)" in printed
    assert "the study's top 3 trials as one model" in printed
    assert (f"selection score (validation balanced accuracy of the members' mean probabilities) "
            f"{evaluated['val_balanced_accuracy']:.2f}%") in printed
    runs = MlflowClient(study["uri"]).search_runs(
        [MlflowClient(study["uri"]).get_experiment_by_name("top3").experiment_id],
        filter_string="tags.`hpo_peft.run_kind` = 'ensemble'")
    assert len(runs) == 1


def test_the_registered_ensemble_predicts_as_evaluate_scored(study, evaluated, demo_workspace, test_split, tmp_path):
    """`predict` from the registry and the pyfunc model: the members' mean probabilities."""
    import mlflow
    import pandas as pd

    from hpo_peft.tracking.pyfunc_model import using_store

    ranked = ranked_runs(study)
    mean = members_mean(study, demo_workspace, test_split, [run_id for _, run_id in ranked[:3]]).double().numpy()
    table = study["kit"] / "sicapv2/partition/Test/Test.xlsx"
    out = tmp_path / "predictions.csv"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["predict", "models:/top3-model@best", str(study["kit"] / "sicapv2/images"), "--table", str(table),
                     "--out", str(out), "--tracking-uri", study["uri"]]) == 0
    assert f"balanced accuracy {evaluated['balanced_accuracy']:.2f}%" in printed.getvalue()
    columns = ["p_NC", "p_G3", "p_G4", "p_G5"]
    frame = pd.read_csv(out)
    row_of = {name: row for row, name in enumerate(test_split.names)}
    order = [row_of[Path(path).name] for path in frame["image"]]
    assert frame[columns].to_numpy() == pytest.approx(mean[order], abs=1e-5)
    with using_store(study["uri"]):
        model = mlflow.pyfunc.load_model("models:/top3-model@best")
    served = model.predict(pd.DataFrame({"path": list(frame["image"][:4])}))
    assert served.to_numpy() == pytest.approx(frame[columns].to_numpy()[:4], abs=1e-5)


def test_the_ensemble_takes_the_alias_from_its_best_member(study, evaluated):
    """Registered after its own best trial, the ensemble ranks just ahead of it: the alias moves."""
    client = MlflowClient(study["uri"])
    assert client.get_model_version_by_alias("top3-model", "best").run_id == evaluated["mlflow_run_id"]
    top_run = ranked_runs(study)[0][1]
    single = run_json(["evaluate", str(study["path"]), *study["options"], "--run-id", top_run, "--register", "top3-model"])
    assert single["alias_moved"] is False
    assert client.get_model_version_by_alias("top3-model", "best").run_id == evaluated["mlflow_run_id"]


def test_an_altered_member_file_is_refused_naming_it(study, evaluated, tmp_path, capsys):
    from hpo_peft.tracking.tracker import Tracker

    folder = Tracker(study["uri"], "top3", create=False).download_adapter(evaluated["mlflow_run_id"], tmp_path)
    head = folder / "member-2" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-8] + b"\0" * 8)
    code = main(["predict", str(folder), str(study["kit"] / "sicapv2/images"), "--out", str(tmp_path / "p.csv")])
    assert code == 2
    assert "member-2/head.safetensors: checksum mismatch" in capsys.readouterr().err


def test_members_of_other_categories_are_refused(study, evaluated, tmp_path):
    import json as json_

    from hpo_peft.core.errors import UserError
    from hpo_peft.fewshot.artifacts import METADATA_FILE, _metadata_digest
    from hpo_peft.fewshot.ensemble import save_ensemble
    from hpo_peft.tracking.tracker import Tracker

    tracker, (first, second) = Tracker(study["uri"], "top3", create=False), ranked_runs(study)[:2]
    a = tracker.download_adapter(first[1], tmp_path / "a")
    b = Path(shutil.copytree(tracker.download_adapter(second[1], tmp_path / "b0"), tmp_path / "b"))
    metadata = json_.loads((b / METADATA_FILE).read_text())
    metadata["categories"] = ["NC", "G3", "G4", "G6"]
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    (b / METADATA_FILE).write_text(json_.dumps(metadata))
    with pytest.raises(UserError, match="member 2 .*categories differs"):
        save_ensemble(tmp_path / "ensemble", [(a, {"trial": 0}), (b, {"trial": 1})])


def test_load_adapter_says_an_ensemble_is_several_adapters(study, evaluated, demo_workspace, tmp_path):
    from hpo_peft.core.errors import UserError
    from hpo_peft.fewshot.artifacts import load_adapter
    from hpo_peft.tracking.tracker import Tracker

    folder = Tracker(study["uri"], "top3", create=False).download_adapter(evaluated["mlflow_run_id"], tmp_path)
    with pytest.raises(UserError, match="ensemble of 3 adapters, not one; load it with .*load_predictor"):
        load_adapter(folder, demo_workspace.base)


def test_every_trial_records_its_validation_predictions(study, demo_workspace):
    """Per validation split (holdout's one, kfold's folds) the labels, the workspace's own, and each
    image's class probabilities, which sum to one."""
    from hpo_peft.tracking.selection import VAL_PREDICTIONS_ATTR

    records = [t.user_attrs[VAL_PREDICTIONS_ATTR] for t in study["study"].get_trials() if t.state.name == "COMPLETE"]
    folds = [split.val.labels.tolist() for split in demo_workspace.plan.splits]
    assert len(records) == 4 and sum(map(len, folds)) > 0
    for record in records:
        assert record["labels"] == folds
        for fold, labels in zip(record["probabilities"], folds):
            assert len(fold) == len(labels)
            assert all(abs(sum(row) - 1) < 1e-3 for row in fold)


def test_the_ensemble_run_records_its_out_of_fold_score(study, evaluated):
    from hpo_peft.tracking.selection import ensemble_score, ranks

    trials = study["study"].get_trials()
    order = ranks(trials)
    top = sorted((t for t in trials if t.number in order), key=lambda t: order[t.number])[:3]
    assert evaluated["val_balanced_accuracy"] == pytest.approx(ensemble_score(top), abs=1e-4)  # display rounding


def test_the_ensemble_score_averages_probabilities_per_fold():
    """Two folds of two images, classes 0 and 1. Alone, member a is right on fold 0 only and b on
    fold 1 only; averaged, the surer member wins each image."""
    from optuna.trial import create_trial

    from hpo_peft.tracking.selection import VAL_PREDICTIONS_ATTR, ensemble_score

    labels = [[0, 1], [0, 1]]
    a = {"labels": labels, "probabilities": [[[0.9, 0.1], [0.2, 0.8]], [[0.4, 0.6], [0.6, 0.4]]]}
    b = {"labels": labels, "probabilities": [[[0.3, 0.7], [0.6, 0.4]], [[0.8, 0.2], [0.1, 0.9]]]}
    trial = lambda record: create_trial(value=50.0, user_attrs={VAL_PREDICTIONS_ATTR: record})  # noqa: E731
    assert ensemble_score([trial(a)]) == 50.0  # fold 0: 100, fold 1: 0
    assert ensemble_score([trial(a), trial(b)]) == 100.0  # fold 0 (0.6, 0.4), (0.4, 0.6); fold 1 (0.6, 0.4), (0.35, 0.65)
    other = {"labels": [[1, 0], [0, 1]], "probabilities": b["probabilities"]}
    assert ensemble_score([trial(a), trial(other)]) is None  # not the same folds


def test_a_new_set_of_members_supersedes_the_earlier_ensemble(study, evaluated):
    """Other top trials (here: another size) make a new run; the earlier one sinks below every
    trial in the rank-sorted table and names its successor. Last in the module: it adds a run."""
    from hpo_peft.tracking.ensemble_run import SUPERSEDED, TAG_SUPERSEDED, ensemble_run
    from hpo_peft.tracking.tracker import Tracker

    tracker = Tracker(study["uri"], "top3", create=False)
    new_id, members = ensemble_run(tracker, "top3", study["study"].get_trials(), 2)
    assert new_id != evaluated["mlflow_run_id"] and len(members) == 2
    old = MlflowClient(study["uri"]).get_run(evaluated["mlflow_run_id"])
    assert old.data.metrics["selection_rank"] == SUPERSEDED and old.data.tags[TAG_SUPERSEDED] == new_id
    assert MlflowClient(study["uri"]).get_run(new_id).data.metrics["selection_rank"] == 0
