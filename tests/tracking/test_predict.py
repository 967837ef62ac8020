"""The chosen adapter put to work (issue 15): `hpo-peft predict`, the MLflow pyfunc model in a fresh
process, the real REST server, and adapter retention. One tiny study serves the whole module."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from hpo_peft.app.cli import main

ROOT = Path(__file__).resolve().parents[2]
MODEL = "models:/demo-chosen@best"
SEARCH = {
    "n_trials": 3,
    "sampler": {"name": "random", "seed": 3},
    "pruner": {"name": "none"},
    "params": {"method": {"choices": ["bias", "lora", "full"]}, "learning_rate": {"low": 0.002, "high": 0.01, "log": True},
               "max_epochs": 3, "patience": 2},
    "keep_adapters": "best:2",
}


def fresh_env(uri: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the server execs the venv's uvicorn
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def chosen(tmp_path_factory, demo_kit):
    """A 3-trial study (`keep_adapters: best:2`), then `evaluate --register` on its best trial."""
    from conftest import run_demo_study

    return run_demo_study(demo_kit, tmp_path_factory.mktemp("predict"), "chosen", SEARCH, n_trials=3)


@pytest.fixture(scope="module")
def evaluated(chosen):
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["evaluate", str(chosen["path"]), *chosen["options"], "--register", "demo-chosen", "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def test_images(chosen):
    """The demo kit's test split: paths, labels, and the probabilities computed here, in this
    process, through `load_adapter` and `evaluate`'s own `forward_in_batches`."""
    from hpo_peft.data import read_table

    table = chosen["kit"] / "sicapv2/partition/Test/Test.xlsx"
    rows = read_table(table, "image_name", ["NC", "G3", "G4", "G5"])
    return {"table": table, "paths": [chosen["kit"] / "sicapv2/images" / n for n in rows["image_name"]],
            "labels": list(rows["label"])}


@pytest.fixture(scope="module")
def reference(chosen, evaluated, test_images, demo_workspace):
    from hpo_peft.fewshot.artifacts import load_adapter
    from hpo_peft.data import load_image
    from hpo_peft.fewshot.evaluate import forward_in_batches
    from hpo_peft.tracking.tracker import Tracker

    folder = Tracker(chosen["uri"], "chosen", create=False).download_adapter(evaluated["mlflow_run_id"], chosen["tmp"] / "ref")
    classifier, _ = load_adapter(folder, demo_workspace.base)
    prep = demo_workspace.base.preprocessing
    images = torch.stack([load_image(p, prep) for p in test_images["paths"]])
    return torch.softmax(forward_in_batches(classifier, images, prep), dim=1).double().numpy()


def test_evaluate_logs_and_registers_a_pyfunc_model(chosen, evaluated):
    client = MlflowClient(chosen["uri"])
    version = client.get_model_version_by_alias("demo-chosen", "best")
    assert version.run_id == evaluated["mlflow_run_id"]
    assert evaluated["model_uri"].startswith("models:/m-") and version.source == evaluated["model_uri"]
    from mlflow.models import get_model_info

    from hpo_peft.tracking.pyfunc_model import using_store

    with using_store(chosen["uri"]):
        info = get_model_info(MODEL)
    assert info.signature.outputs.input_names() == ["NC", "G3", "G4", "G5"]
    assert {"image", "path"} == set(info.signature.inputs.input_names())
    assert info.metadata["hpo_peft_base_model"]["fingerprint"]  # the base model is referenced, not copied
    model_id = evaluated["model_uri"][len("models:/"):]
    assert client.get_logged_model(model_id).artifact_location.startswith(chosen["tmp"].as_uri())  # beside the store
    files = [a.path for a in client.list_logged_model_artifacts(model_id)]
    assert not any("model.safetensors" in f for f in files)


@pytest.mark.slow
def test_the_pyfunc_model_imports_without_mlflows_type_hint_advice():
    """MLflow printed "Add type hints to the `predict` method" on every import of the model class,
    so in every `evaluate` and `predict` (a warnings filter could not stop it: MLflow resets them)."""
    done = subprocess.run([sys.executable, "-W", "always", "-c", "import hpo_peft.tracking.pyfunc_model"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "type hint" not in done.stderr.lower()


@pytest.mark.slow
def test_pyfunc_in_a_fresh_process_equals_evaluate(chosen, evaluated, test_images, reference):
    """`mlflow.pyfunc.load_model("models:/NAME@best")` in a new interpreter: probabilities equal
    the adapter's through `evaluate`'s path, its arg-max gives evaluate's confusion matrix, and a
    base64 row gives what the same image's path gives."""
    script = (
        "import base64, json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({MODEL!r})\n"
        "paths = json.loads(sys.stdin.read())\n"
        "frame = pd.DataFrame({'path': paths, 'image': [None] * len(paths)})\n"
        "frame.loc[0, 'image'] = base64.b64encode(open(paths[0], 'rb').read()).decode()\n"
        "frame.loc[0, 'path'] = None\n"
        "print(model.predict(frame).to_json(orient='split'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([str(p) for p in test_images["paths"]]),
                          capture_output=True, text=True, env=fresh_env(chosen["uri"]), cwd=chosen["tmp"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = pd.read_json(io.StringIO(done.stdout.strip().splitlines()[-1]), orient="split")
    assert list(fresh.columns) == ["NC", "G3", "G4", "G5"]
    assert fresh.to_numpy() == pytest.approx(reference, abs=1e-6)
    from sklearn.metrics import confusion_matrix

    predicted = fresh.to_numpy().argmax(axis=1)
    assert confusion_matrix(test_images["labels"], predicted, labels=range(4)).tolist() == evaluated["confusion_matrix"]


def test_predict_a_folder_with_a_corrupt_and_a_png_image(chosen, evaluated, test_images, reference, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "new_slide"
    folder.mkdir()
    Image.open(test_images["paths"][0]).save(folder / "a.png")
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.copy(test_images["paths"][1], folder / "c.jpg")
    (folder / "notes.txt").write_text("not an image, not picked from a folder")
    out = tmp_path / "predictions.csv"
    code = main(["predict", evaluated["mlflow_run_id"], str(folder), "--out", str(out), "--tracking-uri", chosen["uri"]])
    printed = capsys.readouterr().out
    assert code == 0
    assert "2 of 3 images predicted" in printed and f"skipped {folder / 'b_corrupt.png'}: " in printed
    table = pd.read_csv(out)
    assert list(table.columns) == ["image", "predicted", "p_NC", "p_G3", "p_G4", "p_G5"]
    assert [Path(p).name for p in table["image"]] == ["a.png", "c.jpg"]
    probabilities = table[["p_NC", "p_G3", "p_G4", "p_G5"]].to_numpy()
    assert probabilities == pytest.approx(reference[:2], abs=1e-6)  # PNG re-encoding is lossless
    assert list(table["predicted"]) == [["NC", "G3", "G4", "G5"][i] for i in reference[:2].argmax(axis=1)]

    assert main(["predict", evaluated["mlflow_run_id"], str(folder), "--strict", "--out", str(out),
                 "--tracking-uri", chosen["uri"]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hpo-peft: error")]
    assert len(errors) == 1 and "b_corrupt.png: cannot decode image" in errors[0] and "--strict" in errors[0]


def test_predict_a_labelled_table_from_the_registry_prints_evaluates_metrics(chosen, evaluated, test_images, tmp_path, capsys):
    out = tmp_path / "test.csv"
    assert main(["predict", MODEL, "--table", str(test_images["table"]), "--out", str(out),
                 "--tracking-uri", chosen["uri"], "--batch-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert (f"balanced accuracy {evaluated['balanced_accuracy']:.2f}% ± {evaluated['standard_error']:.2f} "
            f"(standard error, {len(test_images['paths'])} images)") in printed  # as `evaluate` says it
    assert "true\\pred" in printed
    table = pd.read_csv(out)
    assert len(table) == len(test_images["paths"]) and "label" in table.columns


def test_predict_refuses_an_adapter_folder_with_an_altered_metadata_value(chosen, evaluated, tmp_path, capsys):
    from hpo_peft.tracking.tracker import Tracker

    folder = Tracker(chosen["uri"], "chosen", create=False).download_adapter(evaluated["mlflow_run_id"], tmp_path)
    image = next((chosen["kit"] / "sicapv2/images").iterdir())
    assert main(["predict", str(folder), str(image), "--out", str(tmp_path / "ok.csv")]) == 0
    meta = folder / "hpo_peft_adapter.json"
    data = json.loads(meta.read_text())
    data["categories"] = list(reversed(data["categories"]))
    meta.write_text(json.dumps(data))
    assert main(["predict", str(folder), str(image), "--out", str(tmp_path / "no.csv")]) == 2
    assert "metadata was altered" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.service
@pytest.mark.slow
def test_rest_server_round_trip(chosen, evaluated, test_images, reference, tmp_path):
    """The real `mlflow models serve` on loopback: the same probabilities over HTTP; a bad image and
    an empty batch get a 400 with a clear message, and the server keeps serving."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        env=fresh_env(chosen["uri"]), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping"
            time.sleep(0.5)
        n = 5
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in test_images["paths"][:n]]
        status, answer = _post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
        assert status == 200, answer
        served = pd.DataFrame(answer["predictions"])
        assert list(served.columns) == ["NC", "G3", "G4", "G5"]
        assert served.to_numpy() == pytest.approx(reference[:n], abs=1e-6)

        bad = base64.b64encode(b"these bytes are no image").decode()
        status, answer = _post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]], [bad]]}})
        assert status == 400 and "row 1" in answer["message"] and "cannot be decoded" in answer["message"]
        status, answer = _post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}})
        assert status == 400 and "not base64" in answer["message"]
        status, answer = _post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": []}})
        assert 400 <= status < 500 and "empty batch" in answer.get("message", "")

        status, answer = _post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [[encoded[1]]]}})
        assert status == 200 and pd.DataFrame(answer["predictions"]).to_numpy() == pytest.approx(reference[1:2], abs=1e-6)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # the server and the uvicorn worker it started
        server.wait(timeout=60)
        log.close()


# retention (search.keep_adapters) -------------------------------------------------------------
def test_default_keeps_every_peft_adapter_and_the_best_three_full_fine_tunings():
    import optuna

    from hpo_peft.methods import METHODS
    from hpo_peft.tracking.retention import adapters_to_drop

    space = {"method": optuna.distributions.CategoricalDistribution(["lora", "full"])}
    values = {0: ("full", 50.0), 1: ("lora", 10.0), 2: ("full", 70.0), 3: ("full", 40.0), 4: ("full", 60.0),
              5: ("lora", 5.0), 6: ("full", 20.0)}
    trials = []
    for number, (method, value) in values.items():
        trial = optuna.trial.create_trial(value=value, params={"method": method}, distributions=space)
        trial.number = number
        trials.append(trial)
    full = lambda t: METHODS[t.params["method"]].copies_backbone  # noqa: E731
    dropped = adapters_to_drop(trials, None, full)
    assert sorted(dropped) == [3, 6]  # full fine-tunings ranked 4th and 5th of 5; both LoRAs kept
    assert "ranks 4 of 5" in dropped[3] and "full fine-tunings" in dropped[3]
    assert sorted(adapters_to_drop(trials, "best:2", full)) == [0, 1, 3, 5, 6]
    assert adapters_to_drop(trials, "all", full) == {}
    assert 2 not in adapters_to_drop(trials, "best:1", lambda t: True)  # never the best


@pytest.mark.parametrize("value", ["best:0", "best", "some", "best:-1"])
def test_keep_adapters_is_checked(value, write_config, capsys):
    config = write_config(search={**SEARCH, "keep_adapters": value})
    assert main(["study", "run", str(config), "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "search.keep_adapters" in err and "best:N" in err and len(err.strip().splitlines()) == 1


def test_retention_drops_superseded_adapters_and_keeps_the_best_and_registered(chosen, evaluated, capsys):
    """The study ran with `best:2`: its third trial's adapter went through MLflow, with the reason
    on the run. Then `best:1` keeps the best and a registered trial, and evaluate says why a
    dropped one has no adapter."""
    from hpo_peft.tracking import retention
    from hpo_peft.tracking.pyfunc_model import log_adapter_model, register_model
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.tracking.selection import selection_key
    from hpo_peft.tracking.tracker import Tracker

    study = chosen["study"]
    ranked = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=selection_key)
    assert len(ranked) == 3
    best, second, third = (t.user_attrs[RUN_ID_ATTR] for t in ranked)
    assert best == evaluated["mlflow_run_id"]
    tracker = Tracker(chosen["uri"], "chosen", create=False)
    client = tracker.client

    def has_adapter(run_id):
        return "adapter" in {a.path for a in client.list_artifacts(run_id)}

    assert has_adapter(best) and has_adapter(second) and not has_adapter(third)
    assert "best:2" in client.get_run(third).data.tags["hpo_peft.adapter_dropped"]
    assert "hpo_peft.adapter_dropped" not in client.get_run(second).data.tags

    register_model(tracker, second, log_adapter_model(tracker, second), "kept-by-hand", alias="mine")
    assert retention.enforce(study, tracker, "best:1") == []
    assert has_adapter(best) and has_adapter(second)

    assert main(["evaluate", str(chosen["path"]), *chosen["options"], "--run-id", third]) == 2
    assert "adapter was dropped" in capsys.readouterr().err


# faults found by the probe campaign -------------------------------------------------------------
def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hpo-peft")]  # beside the progress bar
    assert len(lines) == 1 and lines[0].startswith("hpo-peft: error: "), err
    return lines[0]


def test_metrics_of_a_class_with_no_image_say_so():
    """No image of a class: its recall is None (not 0%), balanced accuracy the mean over the others;
    with every class present, the figures sklearn gives, as before."""
    from sklearn.metrics import balanced_accuracy_score, recall_score

    from hpo_peft.fewshot.evaluate import compute_metrics

    categories = ["NC", "G3", "G4", "G5"]
    labels = torch.tensor([1, 1, 2, 2, 3, 3])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 0, 2, 2, 3, 1]), 4).float()
    metrics = compute_metrics(logits, labels, categories)
    assert metrics.as_dict()["per_class_recall"] == {"NC": None, "G3": 50.0, "G4": 100.0, "G5": 50.0}
    assert math.isnan(metrics.per_class_recall["NC"])  # what MLflow logs: not a recall of 0
    assert metrics.balanced_accuracy == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    assert metrics.classes_without_images == ["NC"]
    assert metrics.recall_line() == "per-class recall: NC no image, G3 50.0%, G4 100.0%, G5 50.0%"
    assert metrics.over_classes("the table") == "; over 3 of 4 classes; NC has no image in the table"
    full = torch.tensor([0, 1, 1, 2, 2, 3, 3, 0])
    every = compute_metrics(torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 2, 2, 3, 1, 1]), 4).float(), full, categories)
    predicted = [0, 1, 0, 2, 2, 3, 1, 1]
    assert every.balanced_accuracy == 100.0 * balanced_accuracy_score(full.numpy(), predicted)
    assert list(every.per_class_recall.values()) == [100.0 * r for r in recall_score(full.numpy(), predicted, average=None)]
    assert every.over_classes() == "" and "no image" not in every.recall_line()


def test_predict_a_table_without_one_class_says_so(chosen, evaluated, test_images, tmp_path, capsys):
    table = pd.read_excel(test_images["table"])
    without_nc = tmp_path / "partition" / "Test" / "NoNC.xlsx"
    without_nc.parent.mkdir(parents=True)
    table[table["NC"] != 1].to_excel(without_nc, index=False)
    out = tmp_path / "no_nc.csv"
    images = str(chosen["kit"] / "sicapv2/images")
    assert main(["predict", evaluated["mlflow_run_id"], images, "--table", str(without_nc), "--out", str(out),
                 "--tracking-uri", chosen["uri"]]) == 0
    printed = capsys.readouterr().out.splitlines()
    [accuracy] = [line for line in printed if line.startswith("balanced accuracy ")]
    assert accuracy.endswith("; over 3 of 4 classes; NC has no image in the table)")
    [recall] = [line for line in printed if line.startswith("per-class recall: ")]
    assert recall.startswith("per-class recall: NC no image, G3 ") and "0.0%" not in recall.split(",")[0]
    assert "NC" not in set(pd.read_csv(out)["label"])


def test_predict_out_must_be_a_writable_file_name(chosen, evaluated, tmp_path, capsys, refuse_model_loading):
    image = str(next((chosen["kit"] / "sicapv2/images").iterdir()))
    run = [evaluated["mlflow_run_id"], image, "--tracking-uri", chosen["uri"]]
    assert main(["predict", *run, "--out", str(tmp_path)]) == 2
    line = _one_error(capsys.readouterr().err)
    assert line.endswith(f"--out {tmp_path}: is a folder; give a file name such as {tmp_path / 'predictions.csv'}")
    (tmp_path / "a_file").write_text("")
    assert main(["predict", *run, "--out", str(tmp_path / "a_file" / "p.csv")]) == 2
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in _one_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_predict_an_empty_folder_is_refused_before_loading(chosen, evaluated, tmp_path, capsys, refuse_model_loading):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.csv"
    assert main(["predict", evaluated["mlflow_run_id"], str(tmp_path / "empty"), "--out", str(out),
                 "--tracking-uri", chosen["uri"]]) == 2
    assert f"no images found in {tmp_path / 'empty'}" in _one_error(capsys.readouterr().err)
    assert not out.exists()


def test_predict_with_no_readable_image_exits_2(chosen, evaluated, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"not an image at all")
    out = tmp_path / "p.csv"
    assert main(["predict", evaluated["mlflow_run_id"], str(folder), "--out", str(out), "--tracking-uri", chosen["uri"]]) == 2
    captured = capsys.readouterr()
    assert f"none of the 2 images could be read: first {folder / 'a.png'}: " in _one_error(captured.err)
    assert not out.exists() and "predicted" not in captured.out


def test_a_tampered_adapter_is_named_as_the_user_gave_it(chosen, evaluated, tmp_path, capsys):
    """The adapter is fetched into a temporary folder, gone when the message is read: the message
    names the run id or the models:/ URI given and the file inside the adapter."""
    from urllib.parse import urlparse

    client = MlflowClient(chosen["uri"])
    run_id = evaluated["mlflow_run_id"]
    logged = client.get_logged_model(evaluated["model_uri"].removeprefix("models:/"))
    heads = {run_id: Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / "adapter/head.safetensors",
             MODEL: Path(urlparse(logged.artifact_location).path) / "artifacts/adapter/head.safetensors"}
    image = str(next((chosen["kit"] / "sicapv2/images").iterdir()))
    for given, head in heads.items():
        kept = head.read_bytes()
        head.write_bytes(kept[:-8])
        try:
            code = main(["predict", given, image, "--out", str(tmp_path / "p.csv"), "--tracking-uri", chosen["uri"]])
        finally:
            head.write_bytes(kept)
        line = _one_error(capsys.readouterr().err)
        assert code == 2 and "hpo_peft_" not in line and str(tmp_path) not in line
        shown = f"run {given}" if given == run_id else given
        assert f"{shown}: adapter/head.safetensors: checksum mismatch" in line


def test_register_keeps_one_version_per_run_and_best_on_the_better_trial(chosen, evaluated, capsys):
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.tracking.selection import selection_key

    client = MlflowClient(chosen["uri"])
    ranked = sorted((t for t in chosen["study"].trials if t.state.name == "COMPLETE"), key=selection_key)
    best, second = (t.user_attrs[RUN_ID_ATTR] for t in ranked[:2])
    best_version = client.get_model_version_by_alias("demo-chosen", "best")
    assert best_version.run_id == best
    evaluate = ["evaluate", str(chosen["path"]), *chosen["options"], "--register", "demo-chosen"]
    try:
        for attempt in range(2):  # the same run twice: one version
            assert main([*evaluate, "--run-id", second]) == 0
            printed = capsys.readouterr().out
            notes = [line for line in printed.splitlines() if line.startswith("alias 'best' stays on version")]
            assert len(notes) == 1 and f"(run {best}, selection score " in notes[0]
            assert notes[0].endswith("; --force-alias moves it")
            assert ("registered before: no new version" in printed) == (attempt == 1)
            assert client.get_model_version_by_alias("demo-chosen", "best").version == best_version.version
        versions = client.search_model_versions("name = 'demo-chosen'")
        assert sorted(v.run_id for v in versions) == sorted([best, second])

        assert main([*evaluate, "--run-id", second, "--force-alias", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["alias_moved"] is True and result["new_version"] is False
        assert result["alias_note"].startswith(f"alias 'best' moved by --force-alias to version {result['registered_version']}")
        assert client.get_model_version_by_alias("demo-chosen", "best").run_id == second
        assert len(client.search_model_versions("name = 'demo-chosen'")) == 2
    finally:
        client.set_registered_model_alias("demo-chosen", "best", best_version.version)


def test_a_saved_adapter_has_the_users_umask_modes(demo_workspace, tmp_path):
    """safetensors writes 0600: an adapter others could not read."""
    import stat

    from hpo_peft.fewshot.artifacts import save_adapter
    from hpo_peft.methods import get_method, method_config
    from hpo_peft.models.classifier import build_classifier

    base = demo_workspace.base
    classifier = get_method("lora").prepare(build_classifier(base, demo_workspace.prototypes), method_config("lora", {}))
    previous = os.umask(0o022)
    try:
        folder = save_adapter(tmp_path / "adapter", classifier, base, "lora", {}, demo_workspace.config)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert "peft_adapter/adapter_model.safetensors" in modes and "head.safetensors" in modes
    assert modes == {name: 0o755 if (folder / name).is_dir() else 0o644 for name in modes}
