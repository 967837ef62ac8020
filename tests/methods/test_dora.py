"""DoRA as a LoRA option (`methods.lora.use_dora`): HF peft's for the HF CLIP family, the same
decomposition in the fused q/k/v path (open_clip, CONCH); counts, start, save/load, search, a trial."""

import optuna
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hpo_peft.fewshot.artifacts import load_adapter, save_adapter
from hpo_peft.core.config import ModelConfig, StudyConfig
from hpo_peft.methods import METHODS, method_config
from hpo_peft.methods.fused_lora import QKVLoRA
from hpo_peft.models.classifier import build_classifier, count_trainable, load_base_model
from hpo_peft.models.conch import conch_architecture
from hpo_peft.study.search_space import sample_plan
from tests.conftest import demo_config_dict


@pytest.fixture(scope="module")
def bases(demo_kit):
    return {"hf_clip": load_base_model(ModelConfig(name_or_path=str(demo_kit / "model"))),
            "open_clip": load_base_model(ModelConfig(name_or_path=str(demo_kit / "open_clip_model"))),
            "conch": conch_architecture(image_size=32, width=32, layers=2, heads=2, patch_size=16, embed_dim=16,
                                        pooler_heads=2, text_width=32, text_layers=1, text_heads=2)}


def _prepared(base, dora, **options):
    pixels = torch.randn(2, 3, base.preprocessing.height, base.preprocessing.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prototypes = torch.randn(4, base.image_encoder()(pixels).shape[1], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    classifier = METHODS["lora"].prepare(build_classifier(base, prototypes),
                                         method_config("lora", {"rank": 2, "use_dora": dora, **options}))
    return classifier, pixels, build_classifier(base, prototypes)


@pytest.mark.parametrize("family", ["hf_clip", "open_clip", "conch"])
def test_dora_is_lora_plus_one_magnitude_per_output_row_and_starts_at_the_base_model(bases, family):
    lora, pixels, plain = _prepared(bases[family], False)
    dora, _, _ = _prepared(bases[family], True)
    magnitudes = {n: p for n, p in dora.encoder.named_parameters() if p.requires_grad and "magnitude" in n}
    a_matrices = [p for n, p in dora.encoder.named_parameters() if "lora_A" in n]
    assert magnitudes and len(magnitudes) == len(a_matrices)  # one per adapted projection: q, k, v of every block
    assert all(p.dim() == 1 and p.numel() == a.shape[1] for p, a in zip(magnitudes.values(), a_matrices))  # d_out = d_in
    assert count_trainable(dora) == count_trainable(lora) + sum(p.numel() for p in magnitudes.values())
    with torch.no_grad():
        assert torch.allclose(dora(pixels), plain(pixels), atol=1e-5)  # B = 0: m = ||W||, W' = W


def test_fused_dora_computes_what_peft_does_forward_and_backward():
    """Separate q/k/v Linear layers under peft's DoRA against one fused weight under QKVLoRA with the
    same A, B and (changed) magnitudes: the same outputs and the same gradients."""
    torch.manual_seed(0)
    d, rank = 6, 2

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    separate = get_peft_model(Attention(), LoraConfig(r=rank, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                      init_lora_weights=False, use_dora=True))
    fused = torch.cat([getattr(separate.base_model.model, f"{t}_proj").base_layer.weight for t in "qkv"]).detach()
    qkv = QKVLoRA(fused, rank, 2.0, random_b=True, targets=("q_proj", "k_proj", "v_proj"), dora=True)
    with torch.no_grad():
        for t in "qkv":
            layer = getattr(separate.base_model.model, f"{t}_proj")
            getattr(qkv, f"lora_A_{t}").copy_(layer.lora_A["default"].weight)
            getattr(qkv, f"lora_B_{t}").copy_(layer.lora_B["default"].weight)
            # peft's start, as ours: m = ||W + s B A|| per output row
            assert torch.allclose(qkv.adapted(fused, f"{t}_proj").norm(dim=1), layer.lora_magnitude_vector["default"].weight)
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
            getattr(qkv, f"lora_magnitude_{t}").copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(5, d)
    expected, got = separate(x), x @ qkv(fused).t()
    assert torch.allclose(got, expected, atol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    for t in "qkv":
        layer = getattr(separate.base_model.model, f"{t}_proj")
        for ours, theirs in [("lora_A", layer.lora_A["default"].weight), ("lora_B", layer.lora_B["default"].weight),
                             ("lora_magnitude", layer.lora_magnitude_vector["default"].weight)]:
            assert torch.allclose(getattr(qkv, f"{ours}_{t}").grad, theirs.grad, atol=1e-4), (ours, t)


@pytest.mark.parametrize("family", ["hf_clip", "open_clip"])
def test_a_dora_adapter_loads_exactly(bases, demo_kit, tmp_path, family):
    base = bases[family]
    dora, pixels, _ = _prepared(base, True, b_init="random")
    with torch.no_grad():
        for name, p in dora.encoder.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))  # trained away from the row norms
    config = StudyConfig.model_validate(demo_config_dict(demo_kit))
    options = method_config("lora", {"rank": 2, "use_dora": True, "b_init": "random"}).model_dump()
    folder = save_adapter(tmp_path / family, dora, base, "lora", options, config)
    loaded, metadata = load_adapter(folder, base)
    assert metadata["method"]["config"]["use_dora"] is True
    with torch.no_grad():
        assert torch.equal(loaded(pixels), dora(pixels))


def test_use_dora_is_a_searchable_categorical(demo_kit):
    raw = demo_config_dict(demo_kit, {"params": {"method": "lora"}, "methods": {"lora": {"use_dora": {"choices": [False, True]}}}})
    config = StudyConfig.model_validate(raw)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {sample_plan(study.ask(), config).method_options["use_dora"] for _ in range(12)}
    assert drawn == {False, True}


def test_trial_command_with_dora(write_config, capsys):
    from hpo_peft.app.cli import main

    config = write_config(train={"device": "cpu", "max_epochs": 1})
    code = main(["trial", str(config), "--method", "lora", "--set", "methods.lora.use_dora=true"])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "test balanced accuracy" in out
