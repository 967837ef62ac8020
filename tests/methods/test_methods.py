"""Methods against REFERENCE.md: trainable counts on the full PLIP architecture (CLIPConfig(),
random weights, no download), LoRA's B-init, and which parameters a training step touches."""

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers import CLIPConfig, CLIPModel

from hpo_peft.methods import METHODS, method_config
from hpo_peft.models.classifier import ImageClassifier, ZeroShotHead, count_trainable
from hpo_peft.models.hf_clip import ImageEncoder

HEAD = 4 * 512


@pytest.fixture(scope="module")
def plip_architecture():
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig()).eval()


@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def classifier_of(clip, classes=4):
    prototypes = torch.nn.functional.normalize(torch.randn(classes, clip.config.projection_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    encoder = copy.deepcopy(ImageEncoder(clip.vision_model, clip.visual_projection))
    return ImageClassifier(encoder, ZeroShotHead(prototypes, clip.logit_scale)).requires_grad_(False).eval()


def prepared(clip, name, **options):
    return METHODS[name].prepare(classifier_of(clip), method_config(name, options))


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("zero_shot", {}, 0),
        ("affine_ln", {}, 36_864 + HEAD),
        ("affine_ln", {"include_pre_post": True}, 39_936 + HEAD),
        ("bias", {}, 102_912 + HEAD),
        ("lora", {"rank": 1}, 55_296 + HEAD),
        ("lora", {"rank": 4}, 221_184 + HEAD),
        ("lora", {"rank": 16}, 55_296 * 16 + HEAD),
        ("full", {}, 87_849_216 + HEAD),
    ],
)
def test_trainable_counts_match_reference(plip_architecture, name, options, expected):
    assert count_trainable(prepared(plip_architecture, name, **options)) == expected


def test_lora_zero_b_equals_base_model_random_b_does_not(plip_architecture):
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = classifier_of(plip_architecture)(pixels)
        zeros = prepared(plip_architecture, "lora", rank=4, b_init="zeros")(pixels)
        random = prepared(plip_architecture, "lora", rank=4, b_init="random")(pixels)
    assert torch.equal(zeros, base)
    assert not torch.allclose(random, base, atol=1e-4)


def test_lora_is_scale_one_on_qkv_without_dropout(plip_architecture):
    model = prepared(plip_architecture, "lora", rank=8)
    layer = model.encoder.base_model.model.vision_model.encoder.layers[0].self_attn
    for projection in (layer.q_proj, layer.k_proj, layer.v_proj):
        assert projection.scaling["default"] == 1.0
        assert projection.lora_A["default"].weight.shape == (8, 768)
        assert projection.lora_B["default"].weight.shape == (768, 8)
        assert isinstance(projection.lora_dropout["default"], torch.nn.Identity)
    assert not hasattr(layer.out_proj, "lora_A")


@pytest.mark.parametrize("name, options", [("affine_ln", {}), ("bias", {}), ("lora", {"rank": 2}), ("lora", {"rank": 2, "b_init": "random"}), ("full", {})])
def test_a_training_step_changes_only_the_intended_parameters(small_clip, name, options):
    model = prepared(small_clip, name, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % 4
    model.train()
    for _ in range(2):  # with B = 0, A gets no gradient on the first step
        optimizer.zero_grad()
        F.cross_entropy(model(pixels), labels).backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert "head.weight" in changed
    assert torch.equal(model.head.logit_scale, small_clip.logit_scale.detach())


def test_zero_shot_head_is_cosine_times_frozen_scale(small_clip):
    model = classifier_of(small_clip)
    features = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    weight = model.head.weight
    expected = features @ (weight / weight.norm(dim=-1, keepdim=True)).t() * small_clip.logit_scale.exp()
    assert torch.allclose(model.head(features), expected)
    assert not model.head.logit_scale.requires_grad
