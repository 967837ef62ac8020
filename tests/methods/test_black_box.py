"""Black-box adapters over frozen features (REFERENCE.md) and the feature cache."""

import pytest
import torch

from hpo_peft.fewshot.artifacts import load_adapter, save_adapter
from hpo_peft.core.config import TrainConfig
from hpo_peft.methods import METHODS, method_config
from hpo_peft.methods.black_box import CLAPHead, CLIPAdapterHead
from hpo_peft.models.classifier import ZeroShotHead, build_classifier, count_trainable
from hpo_peft.models.hf_clip import ImageEncoder
from hpo_peft.fewshot.trial import run_trial

BLACK_BOX = ["linear_probe", "zs_linear_probe", "clip_adapter", "clap"]


def zero_shot_head(classes=3, dim=4, scale=2.0):
    prototypes = torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return ZeroShotHead(prototypes, torch.tensor(scale).log())


def test_clap_multipliers_follow_their_definition():
    head = CLAPHead(zero_shot_head())
    features = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    head.initialize_from_shots(features, labels)
    t = head.anchors / head.anchors.norm(dim=-1, keepdim=True)
    probs = torch.softmax(features @ t.t() * 2.0, dim=-1)
    expected = torch.stack([probs[labels == c, c].mean() for c in range(3)])
    assert torch.allclose(head.multipliers, expected)
    assert head.penalty().item() == 0.0  # W starts at the prototypes
    with torch.no_grad():
        head.weight[1] += 1.0
    assert torch.allclose(head.penalty(), expected[1] * 4 / 3)  # ||(1,1,1,1)||^2 = 4, mean over 3 classes
    assert not head.anchors.requires_grad and not head.multipliers.requires_grad


def test_clip_adapter_with_alpha_zero_and_zs_probe_predict_as_zero_shot(demo_workspace):
    zero_shot = build_classifier(demo_workspace.base, demo_workspace.prototypes)
    pixels = demo_workspace.base.preprocessing.normalize(demo_workspace.data.val.images.to(demo_workspace.prototypes.device))
    with torch.no_grad():
        expected = zero_shot(pixels)
        for name, options in [("clip_adapter", {"alpha": 0.0}), ("zs_linear_probe", {})]:
            model = METHODS[name].prepare(build_classifier(demo_workspace.base, demo_workspace.prototypes), method_config(name, options))
            assert torch.allclose(model(pixels), expected, atol=1e-6)
        adapter = METHODS["clip_adapter"].prepare(build_classifier(demo_workspace.base, demo_workspace.prototypes), method_config("clip_adapter", {}))
        assert not torch.allclose(adapter(pixels), expected, atol=1e-4)  # alpha = 0.5 changes features


def test_black_box_trainable_parameters(demo_workspace):
    counts = {}
    for name in BLACK_BOX:
        model = METHODS[name].prepare(build_classifier(demo_workspace.base, demo_workspace.prototypes), method_config(name, {}))
        assert not any(p.requires_grad for p in model.encoder.parameters())
        counts[name] = count_trainable(model)
    assert counts == {"linear_probe": 4 * 32, "zs_linear_probe": 4 * 32, "clip_adapter": 32 * 4 * 2, "clap": 4 * 32}
    assert isinstance(METHODS["clip_adapter"].prepare(build_classifier(demo_workspace.base, demo_workspace.prototypes),
                                                      method_config("clip_adapter", {})).head, CLIPAdapterHead)


def test_feature_cache_runs_the_backbone_once_per_process(demo_workspace, monkeypatch):
    from hpo_peft.fewshot import features

    monkeypatch.setattr(features, "_CACHE", {})
    calls = []
    original = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, x: calls.append(len(x)) or original(self, x))
    config = TrainConfig(optimizer="sgd", learning_rate=0.01, max_epochs=5, patience=None)
    for name in [*BLACK_BOX, "zero_shot"]:
        run_trial(demo_workspace, name, {}, config, progress=False)
    assert calls == [64, 64]  # the training shots and the validation shots, once each


@pytest.mark.parametrize("name", BLACK_BOX)
def test_black_box_methods_learn_and_round_trip_through_the_adapter_folder(demo_workspace, tmp_path, name):
    config = TrainConfig(optimizer="sgd", learning_rate=0.5, momentum=0.9, max_epochs=40, patience=10)
    outcome = run_trial(demo_workspace, name, {}, config, progress=False)
    assert outcome.training.best.val_balanced_accuracy > 40.0  # the kept epoch (the score averages its neighbours in)
    folder = save_adapter(tmp_path / "a", outcome.classifier, demo_workspace.base, name, outcome.method_options,
                          demo_workspace.config)
    loaded, metadata = load_adapter(folder, demo_workspace.base)
    pixels = demo_workspace.base.preprocessing.normalize(demo_workspace.data.val.images.to(demo_workspace.prototypes.device))
    with torch.no_grad():
        assert torch.allclose(loaded(pixels), outcome.classifier(pixels), atol=1e-5)
    assert metadata["method"]["name"] == name


def test_feature_cache_on_disk_serves_a_later_process(demo_workspace, monkeypatch, tmp_path):
    from hpo_peft.fewshot import features

    calls = []
    original = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, x: calls.append(len(x)) or original(self, x))

    def fresh_cache():
        monkeypatch.setattr(features, "_CACHE", {})  # as in a new process
        return features.FeatureCache(demo_workspace.base.image_encoder(), "demo", demo_workspace.base.preprocessing,
                                     directory=tmp_path / "cache")

    first = fresh_cache()(demo_workspace.data.train, None)
    assert calls == [64] and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    second = fresh_cache()(demo_workspace.data.train, None)
    assert calls == [64]  # read from disk, no backbone forward
    assert torch.equal(first, second)


def test_a_methods_own_precision_reaches_its_frozen_features(demo_workspace):
    """`method_train.<m>.precision` is applied, not only logged: a black-box trial in bf16 reads
    features the frozen encoder computed under bf16 autocast, beside the study's fp32 ones."""
    from hpo_peft.fewshot import features

    config = TrainConfig(max_epochs=1, precision="bf16", optimizer="sgd", learning_rate=0.5)
    outcome = run_trial(demo_workspace, "linear_probe", {}, config, progress=False)
    assert outcome.train_config.precision == "bf16"
    dtypes = {key[-1] for key in features._CACHE if key[0] == demo_workspace.features.identity}
    assert str(torch.bfloat16) in dtypes
    bf16 = demo_workspace.features(demo_workspace.data.train, torch.bfloat16)
    fp32 = demo_workspace.features(demo_workspace.data.train, None)
    assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.05)
