"""Tip-Adapter and Tip-Adapter-F (REFERENCE.md, "Methods the benchmark adds"): the cache model's
definition, zero-shot at alpha = 0, N*K x D trained keys, the paper's defaults, save/load, a trial."""

import math

import pytest
import torch
from torch.nn import functional as F

from hpo_peft.fewshot.artifacts import load_adapter, save_adapter
from hpo_peft.core.config import StudyConfig, TrainConfig
from hpo_peft.methods import METHODS, method_config
from hpo_peft.methods.schedules import cosine_schedule
from hpo_peft.methods.tip_adapter import TipAdapterHead
from hpo_peft.models.classifier import ZeroShotHead, build_classifier, count_trainable
from hpo_peft.fewshot.trial import run_trial
from tests.conftest import demo_config_dict


def shots(classes=3, per_class=2, dim=8, seed=1):
    features = F.normalize(torch.randn(classes * per_class, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return features, torch.arange(classes).repeat_interleave(per_class)


def test_the_cache_logits_follow_the_paper_and_alpha_zero_is_zero_shot():
    prototypes = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    zero_shot = ZeroShotHead(prototypes, torch.tensor(100.0).log())
    keys, labels = shots()
    test = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    for alpha, beta in [(0.0, 3.0), (2.0, 5.5)]:
        head = TipAdapterHead(zero_shot, method_config("tip_adapter", {"alpha": alpha, "beta": beta}), train_keys=False)
        head.initialize_from_shots(keys, labels)
        expected = 100 * test @ prototypes.t() + alpha * torch.exp(-beta * (1 - test @ keys.t())) @ F.one_hot(labels, 3).float()
        assert torch.allclose(head(test), expected, atol=1e-4)
        if alpha == 0:
            assert torch.equal(head(test), zero_shot(test))
    assert count_trainable(head) == 0


def test_tip_adapter_f_trains_n_times_k_by_d_keys_and_round_trips(demo_workspace, tmp_path):
    ws = demo_workspace
    prepared = METHODS["tip_adapter_f"].prepare(build_classifier(ws.base, ws.prototypes), method_config("tip_adapter_f", {}))
    assert not any(p.requires_grad for p in prepared.encoder.parameters())
    outcome = run_trial(ws, "tip_adapter_f", {"beta": 2.0}, TrainConfig(optimizer="adamw", max_epochs=3, patience=None),
                        progress=False)
    n_k, dim = len(ws.data.train.labels), ws.prototypes.shape[1]
    assert outcome.trainable_parameters == n_k * dim == 4 * 16 * 32
    assert [n for n, p in outcome.classifier.named_parameters() if p.requires_grad] == ["head.keys"]
    features = ws.features(ws.data.train, outcome.settings.placement.dtype)
    assert not torch.allclose(outcome.classifier.head.keys, features)  # trained away from the shots' features
    folder = save_adapter(tmp_path / "f", outcome.classifier, ws.base, "tip_adapter_f", outcome.method_options, ws.config)
    loaded, metadata = load_adapter(folder, ws.base)
    pixels = ws.base.preprocessing.normalize(ws.data.val.images.to(ws.prototypes.device))
    with torch.no_grad():
        assert torch.equal(loaded(pixels), outcome.classifier(pixels))
    assert metadata["method"]["config"]["beta"] == 2.0


def test_tip_adapter_is_a_zero_epoch_trial_scored_on_validation(demo_workspace, tmp_path):
    ws = demo_workspace
    config = TrainConfig(max_epochs=5, patience=None)
    zero_shot = run_trial(ws, "zero_shot", {}, config, progress=False)
    same = run_trial(ws, "tip_adapter", {"alpha": 0.0}, config, progress=False)
    cached = run_trial(ws, "tip_adapter", {"alpha": 3.0, "beta": 4.0}, config, progress=False)
    assert same.validation.balanced_accuracy == zero_shot.validation.balanced_accuracy
    assert cached.training.history == [] and cached.trainable_parameters == 0
    head = cached.classifier.head
    assert torch.equal(head.keys, ws.features(ws.data.train, cached.settings.placement.dtype)) and head.values.shape == (64, 4)
    folder = save_adapter(tmp_path / "t", cached.classifier, ws.base, "tip_adapter", cached.method_options, ws.config)
    loaded, _ = load_adapter(folder, ws.base)
    pixels = ws.base.preprocessing.normalize(ws.data.val.images.to(ws.prototypes.device))
    with torch.no_grad():
        logits = loaded(pixels)
        assert torch.equal(logits, cached.classifier(pixels))
    assert 100 * (logits.argmax(1).cpu() == ws.data.val.labels).float().mean() > 0


def test_paper_settings_are_the_defaults_and_the_schedule_is_cosine(demo_kit):
    raw = demo_config_dict(demo_kit)
    raw["search"]["params"]["method"] = {"choices": ["tip_adapter_f", "lora"]}
    raw["method_train"] = {"tip_adapter_f": {"max_epochs": 7}}
    config = StudyConfig.model_validate(raw)
    assert config.method_train["tip_adapter_f"] == {"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.01,
                                                    "max_epochs": 7, "batch_size": 256}
    assert "lora" not in config.method_train and config.train_for("tip_adapter").optimizer == config.train.optimizer
    untouched = StudyConfig.model_validate(demo_config_dict(demo_kit))  # a config naming none keeps its method_train
    assert set(untouched.method_train) == {"linear_probe"} and untouched.train_for("tip_adapter_f").batch_size == 256
    head = TipAdapterHead(ZeroShotHead(torch.eye(2), torch.tensor(0.0)), method_config("tip_adapter_f", {}), True)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = head.schedule(optimizer, steps_per_epoch=2, epochs=5)
    assert optimizer.param_groups[0]["eps"] == 1e-4
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(5e-4)
    assert rates[-1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 9 / 10)) / 2)
    warm = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    schedule = cosine_schedule(warm, 3, 4, per_epoch=True, warmup_epochs=1, warmup_lr=1e-5)
    seen = []
    for _ in range(6):
        seen.append(warm.param_groups[0]["lr"])
        warm.step()
        schedule.step()
    assert seen == pytest.approx([1e-5] * 3 + [0.002] * 3)


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_trial_command_runs_and_saves(write_config, tmp_path, capsys, method):
    from hpo_peft.app.cli import main

    config = write_config(method_train={"tip_adapter_f": {"max_epochs": 2}}, train={"device": "cpu"})
    code = main(["trial", str(config), "--method", method, "--save", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "test balanced accuracy" in out and (tmp_path / "adapter" / "hpo_peft_adapter.json").is_file()
