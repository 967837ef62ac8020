"""LoRA on the attention projections: out = W x + (alpha / r) B(A x), through HF peft where the
family has separate q/k/v modules (HF CLIP), through `fused_lora` where they are fused (open_clip,
CONCH): the family's `ModuleNames` says which.

Defaults follow the course: q/k/v of every attention block, scale 1 (`lora_alpha = r`), no
dropout, B = 0 so the adapted model starts equal to the base model. `b_init: random` keeps
peft's `init_lora_weights=False`, i.e. PyTorch's default `nn.Linear` init for both matrices:
A, B ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in 768 for A, r for B), so the model starts
perturbed. Through peft, the adapter is saved in peft's own format (`PeftModel.from_pretrained`
loads it); fused, as the trained A and B matrices (`encoder_parameters.safetensors`).
`notebook_draws` (`protocol: course`, course.py) draws the adapters as the course notebook's own
LoRA wrapper does: per adapted projection, in the module order (k, v, q of each block in turn, as
HF CLIP defines them), `nn.Linear(d, r)` for A then `nn.Linear(r, d)` for B with PyTorch's default
init and nothing else (peft's `init_lora_weights=False`), then B zeroed (`b_init: zeros`); peft's
own init would draw A once more (Kaiming-uniform) after building both.
`use_dora: true` is DoRA (Liu et al., ICML 2024): W' = m (W + s B A) / ||W + s B A|| per output
row, the magnitudes m trainable (one per output row of each adapted projection, initialised to the
row norms), through peft's `LoraConfig(use_dora=True)`, or the same in the fused path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from pydantic import Field

from hpo_peft.core.errors import UserError
from hpo_peft.methods.base import Method, MethodConfig
from hpo_peft.methods.fused_lora import add_fused_lora, check_fused_options
from hpo_peft.models import ModuleNames
from hpo_peft.models.classifier import ImageClassifier

PEFT_FOLDER = "peft_adapter"


class LoRAConfig(MethodConfig):
    rank: int = Field(4, ge=1)
    b_init: Literal["zeros", "random"] = "zeros"
    alpha: float | None = Field(None, gt=0)  # None: alpha = rank, i.e. scale 1
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"], min_length=1)
    use_dora: bool = False  # DoRA: magnitude and direction apart (peft's `use_dora`; fused_lora.py likewise)


def peft_config(config: LoRAConfig, notebook_draws: bool = False) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        init_lora_weights=config.b_init == "zeros" and not notebook_draws,
        bias="none",
        use_dora=config.use_dora,
    )


class LoRA(Method):
    name = "lora"
    Config = LoRAConfig

    def check_family(self, config: LoRAConfig, names: ModuleNames) -> None:
        if not names.qkv_linears:
            check_fused_options(config.target_modules, config.dropout)

    def prepare_as_notebook(self, classifier: ImageClassifier, config: LoRAConfig) -> ImageClassifier:
        return self.prepare(classifier, config, notebook_draws=True)

    def prepare(self, classifier: ImageClassifier, config: LoRAConfig, notebook_draws: bool = False) -> ImageClassifier:
        """`notebook_draws`: the adapters drawn as the course notebook's wrapper draws them (module
        docstring), where q, k and v are separate modules; a fused family keeps its own draws."""
        classifier = super().prepare(classifier, config)
        names = classifier.encoder.module_names
        if not names.qkv_linears:
            add_fused_lora(classifier.encoder, names.fused_qkv, config.rank,
                           config.alpha if config.alpha is not None else config.rank, config.b_init == "random",
                           config.target_modules, config.dropout, config.use_dora)
            return classifier
        classifier.encoder = get_peft_model(classifier.encoder, peft_config(config, notebook_draws))
        if notebook_draws and config.b_init == "zeros":
            zero_b(classifier.encoder)
        return classifier

    def save(self, classifier: ImageClassifier, folder: Path, base_name: str | None = None) -> list[str]:
        if not isinstance(classifier.encoder, PeftModel):
            return super().save(classifier, folder, base_name)
        # adapter_config.json then names the base model, as peft's own adapters do
        classifier.encoder.peft_config["default"].base_model_name_or_path = base_name
        classifier.encoder.save_pretrained(folder / PEFT_FOLDER)
        return [PEFT_FOLDER]

    def load(self, classifier: ImageClassifier, config: LoRAConfig, folder: Path) -> ImageClassifier:
        if not classifier.encoder.module_names.qkv_linears:
            return super().load(classifier, config, folder)
        if not (folder / PEFT_FOLDER / "adapter_config.json").is_file():
            raise UserError(f"{folder / PEFT_FOLDER}: peft adapter missing")
        classifier.encoder = PeftModel.from_pretrained(classifier.encoder, folder / PEFT_FOLDER)
        return classifier.requires_grad_(False)


@torch.no_grad()
def zero_b(model: PeftModel) -> None:
    """B = 0 in every LoRA layer, after peft built A and B with `nn.Linear`'s init (which draws
    both); DoRA's magnitudes then become the base rows' norms, ||W + s B A|| with B = 0, as peft
    sets them when it zeroes B itself."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, b in module.lora_B.items():
                b.weight.zero_()
                if name in module.lora_magnitude_vector:
                    weight = module.get_base_layer().weight
                    module.lora_magnitude_vector[name].weight.copy_(torch.linalg.norm(weight, dim=1).to(weight.dtype))
