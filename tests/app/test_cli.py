"""The `trial` command, and bad input: a clear message naming file, row or key, exit 2, nothing written."""

import json
import shutil

import pandas as pd
import pytest

from hpo_peft.app.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_trial_prints_counts_epochs_and_accuracies(write_config, tmp_path, capsys):
    config = write_config(train={"max_epochs": 3, "patience": None})
    code, out, err = run(capsys, "trial", config, "--method", "lora", "--set", "methods.lora.rank=2", "--save", tmp_path / "adapter")
    assert code == 0, err
    assert "trainable parameters: 1,664" in out  # 3 modules x 2 layers x r(64 + 64) + 4 x 32 head, r = 2
    assert out.count("train loss") == 3
    assert "epochs:" not in err  # in a log the printed epochs are the progress: no epoch bar between them
    assert "Loading weights" not in err  # nor transformers' bars
    assert "validation balanced accuracy" in out and "test balanced accuracy" in out
    assert "true\\pred" in out
    metadata = json.loads((tmp_path / "adapter" / "hpo_peft_adapter.json").read_text())
    # what the trial trained with, as a study's adapter records it: predict runs it in the same precision
    assert metadata["train"]["max_epochs"] == 3 and metadata["train"]["precision"] == "fp32"
    assert metadata["data"] == {"shots": 16, "seed": 1, "validation": "holdout", "labels_per_class": 32, "refit": False}


def test_trial_json_output(write_config, capsys):
    code, out, _ = run(capsys, "trial", write_config(train={"max_epochs": 2}), "--method", "bias", "--json")
    result = json.loads(out)
    assert code == 0 and result["method"] == "bias"
    assert len(result["training"]["history"]) == 2
    assert sum(map(sum, result["test"]["confusion_matrix"])) == 4 * 24


@pytest.fixture
def broken_kit(demo_kit, tmp_path):
    root = tmp_path / "sicapv2"
    shutil.copytree(demo_kit / "sicapv2", root)
    return root


def _drop_column(root):
    path = root / "partition/Test/Train.xlsx"
    pd.read_excel(path).drop(columns=["G4"]).to_excel(path, index=False)


def _remove_first_nc_image(root):
    table = pd.read_excel(root / "partition/Test/Train.xlsx")
    for name in table[table.NC.eq(1) & table[["G3", "G4", "G5"]].sum(axis=1).eq(0)].image_name:
        (root / "images" / name).unlink()


def _corrupt_all_images(root):
    for image in (root / "images").glob("*.jpg"):
        image.write_bytes(b"\xff\xd8\xff not really a jpeg")


@pytest.mark.parametrize(
    "damage, overrides, expected",
    [
        (lambda root: shutil.rmtree(root), [], "dataset root not found"),
        (lambda root: (root / "partition/Test/Train.xlsx").unlink(), [], "Train.xlsx: partition table not found"),
        (_drop_column, [], "missing column(s) ['G4']"),
        (_remove_first_nc_image, [], "image not found (row"),
        (_corrupt_all_images, [], "cannot decode image (row"),
        (lambda root: None, ["data.shots=40"], "has 48 usable rows, but shots + val_shots = 40 + 16 = 56"),
        (lambda root: None, ["method.name=lora2"], "unknown method 'lora2'"),
        (lambda root: None, ["train.lerning_rate=0.1"], "train.lerning_rate: unknown key"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(write_config, broken_kit, tmp_path, capsys, damage, overrides, expected):
    config = write_config(data={"root": str(broken_kit)})
    damage(broken_kit)
    adapter = tmp_path / "adapter"
    sets = [x for o in overrides for x in ("--set", o)]
    code, out, err = run(capsys, "trial", config, *sets, "--save", adapter)
    assert code == 2
    assert expected in err
    message = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hpo-peft: error: ")]
    assert len(message) == 1 and expected in message[0], repr(err[-600:])
    assert "Traceback" not in err
    assert not adapter.exists()


def test_a_demo_kit_built_into_a_log_says_so_in_one_line_without_bars(tmp_path, capsys, monkeypatch):
    from hpo_peft import demo_kit

    def stop(*args):  # the images come first: enough to see what the build writes to a log
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_kit.tables, "write_dataset", stop)
    with pytest.raises(KeyboardInterrupt):
        demo_kit.build_demo_kit(tmp_path / "kit")
    err = capsys.readouterr().err
    assert err == f"demo kit: building {tmp_path / 'kit'} (images, then the tiny model's pre-training; under a minute)\n"
    assert not (tmp_path / "kit").exists() and list(tmp_path.iterdir()) == []  # an interrupted build leaves nothing


def test_demo_kit_command_passes_its_options(monkeypatch, tmp_path, capsys):
    from hpo_peft import demo_kit

    calls = []
    monkeypatch.setattr(demo_kit, "build_demo_kit", lambda out, force=False: calls.append((out, force)) or out)
    assert main(["demo-kit", "--out", str(tmp_path / "kit"), "--force"]) == 0
    assert main(["demo-kit"]) == 0
    assert calls == [(tmp_path / "kit", True), (demo_kit.DEFAULT_DIR, False)]
    assert str(tmp_path / "kit") in capsys.readouterr().out


def test_a_model_that_cannot_be_loaded_says_how_to_point_at_a_local_copy(write_config, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    code, _, err = run(capsys, "trial", write_config(model={"name_or_path": str(empty)}))
    assert code == 2
    message = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hpo-peft: error: ")]
    assert len(message) == 1
    assert f"model '{empty}'" in message[0] and "could not be loaded" in message[0]
    assert "set model.name_or_path to that folder" in message[0]
