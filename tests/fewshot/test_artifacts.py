"""The adapter folder: checksums, base-model identity and categories are enforced on load."""

import copy
import json

import pytest
import torch

from hpo_peft.fewshot.artifacts import METADATA_FILE, load_adapter, save_adapter
from hpo_peft.core.config import TrainConfig
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.trial import run_trial


@pytest.fixture(scope="module")
def saved(demo_workspace, tmp_path_factory):
    """A trained LoRA adapter and a trained bias adapter, saved once."""
    folders = {}
    for method, options in [("lora", {"rank": 2}), ("bias", {})]:
        outcome = run_trial(demo_workspace, method, options, TrainConfig(max_epochs=2, learning_rate=0.003), progress=False)
        folders[method] = save_adapter(tmp_path_factory.mktemp(method) / "adapter", outcome.classifier, demo_workspace.base,
                                       method, outcome.method_options, demo_workspace.config)
        folders[method + "_outcome"] = outcome
    return folders


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    def make(method):
        return shutil.copytree(saved[method], tmp_path / method)

    return make


@pytest.mark.parametrize("method", ["lora", "bias"])
@pytest.mark.slow
def test_round_trip_reproduces_the_trained_model(saved, demo_workspace, method):
    loaded, metadata = load_adapter(saved[method], demo_workspace.base, demo_workspace.config.data.categories)
    pixels = demo_workspace.base.preprocessing.normalize(demo_workspace.data.val.images)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), saved[method + "_outcome"].classifier(pixels))
    assert metadata["base_model"]["name_or_path"] == demo_workspace.base.name_or_path
    assert metadata["categories"] == ["NC", "G3", "G4", "G5"]
    assert metadata["preprocessing"]["height"] == 64 and set(metadata["files"])
    if method == "lora":  # peft's own config names the base model too
        peft_config = json.loads((saved[method] / "peft_adapter" / "adapter_config.json").read_text())
        assert peft_config["base_model_name_or_path"] == demo_workspace.base.name_or_path
        assert peft_config["r"] == 2 and peft_config["lora_alpha"] == 2


def _truncate(folder):
    target = folder / "peft_adapter" / "adapter_model.safetensors"
    target.write_bytes(target.read_bytes()[:100])


def _alter(folder):
    target = folder / "head.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "checksum mismatch"),
        (_alter, "head.safetensors: checksum mismatch"),
        (lambda f: (f / "head.safetensors").unlink(), "head.safetensors: adapter file missing"),
        (lambda f: (f / METADATA_FILE).unlink(), "not an hpo-peft adapter"),
        (lambda f: (f / METADATA_FILE).write_text("{not json"), "metadata is not valid JSON"),
    ],
)
def test_tampered_adapters_are_refused(copy_of, demo_workspace, damage, message):
    folder = copy_of("lora")
    damage(folder)
    with pytest.raises(UserError, match=message):
        load_adapter(folder, demo_workspace.base)


def test_an_adapter_for_another_base_model_is_refused(saved, demo_workspace):
    other = copy.copy(demo_workspace.base)
    other.clip = copy.deepcopy(demo_workspace.base.clip)
    with torch.no_grad():
        other.clip.visual_projection.weight.mul_(1.01)
    with pytest.raises(UserError, match="adapter was built for base model"):
        load_adapter(saved["bias"], other)


def test_an_adapter_for_other_categories_is_refused(saved, demo_workspace):
    with pytest.raises(UserError, match=r"adapter categories \['NC', 'G3', 'G4', 'G5'\] differ"):
        load_adapter(saved["bias"], demo_workspace.base, ["NC", "G3", "G4", "G5", "G4C"])
    with pytest.raises(UserError, match="differ"):
        load_adapter(saved["bias"], demo_workspace.base, ["G3", "NC", "G4", "G5"])


def test_metadata_edits_do_not_bypass_the_checks(copy_of, demo_workspace):
    folder = copy_of("bias")
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["files"]["head.safetensors"] = "0" * 64
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_adapter(folder, demo_workspace.base)


def test_an_altered_metadata_value_is_refused(copy_of, demo_workspace):
    folder = copy_of("lora")
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["method"]["config"]["rank"] = 8  # e.g. CLIP-Adapter's alpha, a prompt, the categories
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    with pytest.raises(UserError, match="checksum mismatch; the metadata was altered"):
        load_adapter(folder, demo_workspace.base)


def test_a_vision_tower_changed_in_one_weight_is_refused(saved, demo_workspace):
    other = copy.copy(demo_workspace.base)
    other.clip = copy.deepcopy(demo_workspace.base.clip)
    with torch.no_grad():  # one weight deep in the tower; projection and logit scale untouched
        other.clip.vision_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    with pytest.raises(UserError, match="vision tower, projection or logit scale weights differ"):
        load_adapter(saved["bias"], other)


def test_another_revision_or_preprocessing_is_refused(saved, demo_workspace):
    import dataclasses

    other = copy.copy(demo_workspace.base)
    other.revision = "v2"
    with pytest.raises(UserError, match="built for revision None of its base model, this one is 'v2'"):
        load_adapter(saved["bias"], other)
    other = copy.copy(demo_workspace.base)
    other.preprocessing = dataclasses.replace(demo_workspace.base.preprocessing, height=96, width=96)
    with pytest.raises(UserError, match=r"other pre-processing \(height, width differ"):
        load_adapter(saved["bias"], other)
