"""A trial's settings are decided once (fewshot/settings.py): resolved at the trial's start and
handed to training, features and evaluation; a saved adapter gives them back to evaluate and predict."""

from __future__ import annotations

import pytest
import torch
import yaml

from hpo_peft.core import runtime
from hpo_peft.core.config import StudyConfig, TrainConfig
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.settings import TrialSettings, merged_train
from hpo_peft.fewshot.trial import open_workspace, run_trial
from conftest import demo_config_dict

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kfold_workspace(demo_kit):
    raw = demo_config_dict(demo_kit)
    raw["data"].update({"shots": 8, "validation": "kfold"})
    return open_workspace(StudyConfig.model_validate(raw))


@pytest.mark.parametrize("method", ["bias", "clip_adapter", "zero_shot"])
def test_a_trial_resolves_its_device_and_autocast_once(kfold_workspace, monkeypatch, method):
    """4 folds and a refit (or 4 scored folds and the kept head) read one resolution: the trial's."""
    calls = []
    resolve = runtime.resolve_device
    monkeypatch.setattr(runtime, "resolve_device", lambda name="auto": calls.append(name) or resolve(name))
    train = TrainConfig(max_epochs=2, patience=None, learning_rate=0.003, precision="fp32")
    outcome = run_trial(kfold_workspace, method, {}, train, progress=False)
    assert calls == ["auto"]
    assert outcome.settings.placement == runtime.Placement(torch.device("cpu"), None)
    assert outcome.train_config is outcome.settings.train and outcome.method == method


def test_the_trial_autocast_reaches_training_and_features(kfold_workspace, monkeypatch):
    """A trial's own precision (method_train.<m>.precision) is what its runs and features compute in."""
    seen = []
    original = kfold_workspace.features.__class__.__call__
    monkeypatch.setattr(kfold_workspace.features.__class__, "__call__",
                        lambda self, data, dtype=None: seen.append(dtype) or original(self, data, dtype))
    train = TrainConfig(max_epochs=1, patience=None, learning_rate=0.003, precision="bf16")
    outcome = run_trial(kfold_workspace, "linear_probe", {}, train, progress=False)
    assert outcome.settings.placement.dtype is torch.bfloat16
    assert seen and set(seen) == {torch.bfloat16}


def test_an_option_the_loaded_family_cannot_run_is_one_line_before_training(demo_kit, monkeypatch):
    """Checked against the workspace's loaded family (open_clip fuses q, k and v): a UserError naming
    the key, raised before any classifier is built."""
    raw = yaml.safe_load((ROOT / "studies" / "demo_open_clip.yaml").read_text())
    raw["demo_kit"] = None
    raw["data"]["root"] = str(demo_kit / "sicapv2")
    raw["model"]["name_or_path"] = str(demo_kit / "open_clip_model")
    workspace = open_workspace(StudyConfig.model_validate(raw))
    built = []
    monkeypatch.setattr("hpo_peft.fewshot.trial.build_classifier", lambda *a, **k: built.append(a))
    with pytest.raises(UserError, match=r"^methods\.lora\.dropout: LoRA dropout is not available"):
        run_trial(workspace, "lora", {"dropout": 0.1}, TrainConfig(max_epochs=1), progress=False)
    assert built == []
    with pytest.raises(UserError, match=r"methods\.lora\.rank"):
        workspace.settings("lora", {"rank": 0}, TrainConfig())
    assert workspace.settings("lora", {"rank": 2}, TrainConfig()).options.rank == 2


def test_saved_settings_are_the_ones_the_adapter_trained_with():
    metadata = {"method": {"name": "lora", "config": {"rank": 8}},
                "train": TrainConfig(precision="bf16", device="cpu", eval_batch_size=7).model_dump()}
    settings = TrialSettings.saved(metadata, device="cpu")
    assert settings.placement == runtime.Placement(torch.device("cpu"), torch.bfloat16)
    assert settings.options.rank == 8 and settings.train.eval_batch_size == 7
    assert TrialSettings.saved(metadata, "cpu", precision="fp32").placement.dtype is None  # predict --precision
    old = {"method": {"name": "bias", "config": {}}}  # an adapter saved before the record: fp32
    assert TrialSettings.saved(old).placement.dtype is None


def test_evaluate_scores_a_stored_trial_in_the_precision_it_trained_in(monkeypatch, demo_kit):
    """Not the study's `train.precision`: a trial with `method_train.<m>.precision: bf16` in an fp32
    study is evaluated under bf16, as it trained and as predict runs it."""
    from hpo_peft.fewshot import predict
    from hpo_peft.tracking import scoring

    config = StudyConfig.model_validate(demo_config_dict(demo_kit))
    assert config.train.precision != "bf16"
    saved = {"method": {"name": "bias", "config": {}}, "categories": list(config.data.categories),
             "train": merged_train(config, "bias", precision="bf16").model_dump()}
    built = {}

    class Classifier(torch.nn.Linear):
        pass

    monkeypatch.setattr(predict, "read_metadata", lambda *a, **k: saved)
    monkeypatch.setattr(predict, "load_adapter", lambda *a, **k: (Classifier(1, 1), saved))
    real = scoring.load_predictor
    monkeypatch.setattr(scoring, "load_predictor", lambda *a, **k: built.setdefault("predictor", real(*a, **k)))
    monkeypatch.setattr(scoring, "compute_metrics", lambda *a: None)
    monkeypatch.setattr(scoring, "log_test_result", lambda *a: None)

    class Tracker:
        def download_adapter(self, run_id, folder):
            return folder

    class Base:
        preprocessing = None

    class Test:
        images, labels = torch.zeros(0, 3, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)

    scoring.evaluate_run(Tracker(), "run", Base(), Test(), config)
    assert built["predictor"].amp_dtype is torch.bfloat16
