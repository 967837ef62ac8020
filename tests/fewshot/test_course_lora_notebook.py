"""`protocol: course` LoRA is the course notebook's own LoRA wrapper, draw for draw (issue #30).

The notebook's cells (`_LoRALayer`, `LoRAWrapper`, its PLIP wrapper and `ZSLinearProbe` head) are
written out again here from the notebook's text and applied to a tiny random HF CLIP vision tower;
the package's course LoRA (`Method.prepare_as_notebook`) is applied to a copy of the same tower from the
same random state. Every A must be the same tensor, every B zero, the random state afterwards the
same (no extra draw), and, with the same non-zero B in both, the outputs equal (scale 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hpo_peft.fewshot.course import COURSE_SEED
from hpo_peft.methods import get_method, method_config
from hpo_peft.models.classifier import ImageClassifier, ZeroShotHead
from hpo_peft.models.hf_clip import ImageEncoder

RANK, LAYERS, WIDTH, CLASSES = 4, 2, 64, 3
PROJECTIONS = ("k_proj", "v_proj", "q_proj")  # the notebook's order within each attention block


# --------------------------------------------------------------------------------------
# The notebook's cells, as written there (its device moves left out: everything is on the CPU)
# --------------------------------------------------------------------------------------


class PLIPWrapper(torch.nn.Module):
    def __init__(self, encoder, proj_layer):
        super().__init__()
        self.encoder = encoder
        self.proj_layer = proj_layer

    def forward(self, inputs):
        features = self.encoder(**inputs).pooler_output
        projected_features = self.proj_layer(features)
        return projected_features / projected_features.norm(dim=-1, keepdim=True)


class ZSLinearProbe(torch.nn.Module):
    def __init__(self, zero_shot_prot, logit_scale):
        super().__init__()
        self.logit_scale = logit_scale
        self.logit_scale.requires_grad = False
        self.prototypes = torch.nn.Parameter(zero_shot_prot.clone())

    def forward(self, features):
        prototypes_norm = self.prototypes / self.prototypes.norm(dim=-1, keepdim=True)
        return features @ prototypes_norm.t() * self.logit_scale.exp()


class _LoRALayer(torch.nn.Module):
    def __init__(self, w, w_a, w_b):
        super().__init__()
        self.w = w
        self.w_a = w_a
        self.w_b = w_b

    def forward(self, x):
        return self.w(x) + self.w_b(self.w_a(x))


class LoRAWrapper(torch.nn.Module):
    def __init__(self, vit_model, r=4):
        super().__init__()
        self.ViTbase = vit_model
        self.r = r
        self.w_As = []
        self.w_Bs = []
        for layer in list(list(self.ViTbase.encoder.children())[2].modules()):
            if layer._get_name() == "CLIPAttention":
                for projection in PROJECTIONS:  # the notebook's three copies of this block, k then v then q
                    base = getattr(layer, projection)
                    w_a_linear_qkv = torch.nn.Linear(base.in_features, r, bias=False)
                    w_b_linear_qkv = torch.nn.Linear(r, base.in_features, bias=False)
                    torch.nn.init.zeros_(w_b_linear_qkv.weight)
                    self.w_As.append(w_a_linear_qkv), self.w_Bs.append(w_b_linear_qkv)
                    setattr(layer, projection, _LoRALayer(base, w_a_linear_qkv, w_b_linear_qkv))

    def forward(self, x):
        return self.ViTbase(x)


# --------------------------------------------------------------------------------------
# The two models from one tiny tower
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                              num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32)
    model = CLIPVisionModelWithProjection(config).eval()
    prototypes = torch.randn(CLASSES, 32)
    return model, prototypes / prototypes.norm(dim=-1, keepdim=True), torch.tensor(2.6592)


def notebook_lora(tower):
    """The notebook's model (its PLIP wrapper then the head), LoRA added after `torch.manual_seed(42)`."""
    model, prototypes, logit_scale = tower
    notebook = torch.nn.Sequential(PLIPWrapper(copy.deepcopy(model.vision_model), copy.deepcopy(model.visual_projection)),
                                   ZSLinearProbe(prototypes, logit_scale.clone())).eval().to(torch.float32)
    torch.manual_seed(COURSE_SEED)
    notebook[0] = LoRAWrapper(notebook[0], r=RANK)
    return notebook, torch.get_rng_state()


def package_lora(tower, options=None):
    """The package's classifier with the course protocol's LoRA, after `torch.manual_seed(42)`."""
    model, prototypes, logit_scale = tower
    classifier = ImageClassifier(ImageEncoder(copy.deepcopy(model.vision_model), copy.deepcopy(model.visual_projection)),
                                 ZeroShotHead(prototypes, logit_scale)).requires_grad_(False).eval()
    torch.manual_seed(COURSE_SEED)
    prepared = get_method("lora").prepare_as_notebook(classifier, method_config("lora", options or {"rank": RANK, "b_init": "zeros"}))
    return prepared.float(), torch.get_rng_state()


def package_projections(classifier) -> list[torch.nn.Module]:
    """The package's adapted projections in the notebook's order: blocks in turn, k, v, q in each."""
    modules = dict(classifier.encoder.named_modules())
    found = []
    for index in range(LAYERS):
        for projection in PROJECTIONS:
            [name] = [n for n in modules if n.endswith(f"vision_model.encoder.layers.{index}.self_attn.{projection}")]
            found.append(modules[name])
    return found


def pixels(count: int = 5) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_the_notebooks_wrapper_finds_every_attention_block(tower):
    notebook, _ = notebook_lora(tower)
    assert len(notebook[0].w_As) == len(notebook[0].w_Bs) == 3 * LAYERS
    assert notebook[0].w_As[0].weight.shape == (RANK, WIDTH) and notebook[0].w_Bs[0].weight.shape == (WIDTH, RANK)


def test_course_lora_draws_the_notebooks_a_and_zero_b_from_the_same_random_state(tower):
    notebook, notebook_state = notebook_lora(tower)
    classifier, package_state = package_lora(tower)
    projections = package_projections(classifier)
    assert len(projections) == len(notebook[0].w_As)
    for module, a, b in zip(projections, notebook[0].w_As, notebook[0].w_Bs):
        assert torch.equal(module.lora_A["default"].weight, a.weight)
        assert torch.equal(module.lora_B["default"].weight, b.weight)
        assert not b.weight.any()
        assert module.scaling["default"] == 1
    assert torch.equal(package_state, notebook_state)  # the same number of draws: the next method draws alike


def test_course_lora_computes_the_notebooks_forward(tower):
    notebook, _ = notebook_lora(tower)
    classifier, _ = package_lora(tower)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(classifier(x), notebook({"pixel_values": x}))  # B = 0: the base model's outputs
        noise = torch.Generator().manual_seed(3)
        for module, b in zip(package_projections(classifier), notebook[0].w_Bs):
            value = torch.randn(b.weight.shape, generator=noise)
            b.weight.copy_(value)
            module.lora_B["default"].weight.copy_(value)
        assert torch.equal(classifier.encoder(x), notebook[0]({"pixel_values": x}))
        assert torch.equal(classifier(x), notebook({"pixel_values": x}))
        assert not torch.equal(classifier(x), package_lora(tower)[0](x))  # the adapters do act


def test_course_dora_starts_as_the_base_model(tower):
    classifier, _ = package_lora(tower, {"rank": RANK, "b_init": "zeros", "use_dora": True})
    plain, _ = package_lora(tower)
    x = pixels()
    with torch.no_grad():
        assert torch.allclose(classifier(x), plain(x), atol=1e-5)
    for module, plain_module in zip(package_projections(classifier), package_projections(plain)):
        assert not module.lora_B["default"].weight.any()
        assert torch.equal(module.lora_A["default"].weight, plain_module.lora_A["default"].weight)
        assert torch.equal(module.lora_magnitude_vector["default"].weight, module.get_base_layer().weight.norm(dim=1))


def test_the_study_protocol_keeps_peft_s_own_init(tower):
    model, prototypes, logit_scale = tower
    classifier = ImageClassifier(ImageEncoder(copy.deepcopy(model.vision_model), copy.deepcopy(model.visual_projection)),
                                 ZeroShotHead(prototypes, logit_scale)).requires_grad_(False).eval()
    torch.manual_seed(COURSE_SEED)
    study = get_method("lora").prepare(classifier, method_config("lora", {"rank": RANK, "b_init": "zeros"}))
    study_state = torch.get_rng_state()
    notebook, notebook_state = notebook_lora(tower)
    assert not torch.equal(study_state, notebook_state)  # peft's Kaiming draw of A comes on top
    assert not torch.equal(package_projections(study)[0].lora_A["default"].weight, notebook[0].w_As[0].weight)
