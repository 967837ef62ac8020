"""LoRA on q, k and v separately where a family fuses them into one input projection
(open_clip's `attn.in_proj_weight`, timm's `attn.qkv.weight`, both (3d x d_in)).

A parametrization replaces the fused weight W by W + (alpha / r) [B_q A_q; B_k A_k; B_v A_v]:
the same output as LoRA on separate q/k/v projections (W x + s B(A x) = (W + s B A) x), with
A (r x d_in) and B (d x r) per projection, initialised as HF peft does (A Kaiming-uniform as
`nn.Linear`; B zeros, or `nn.Linear`'s init with `b_init: random`). With B = 0 the weight is W
exactly. Only the A and B matrices train; the original weight stays frozen under
`parametrizations.<name>.original`. The deltas are saved as `encoder_parameters.safetensors`.

DoRA (Liu et al., ICML 2024; `use_dora`), as HF peft computes it: each adapted projection's rows
become m * (W + s B A) / ||W + s B A||, the norm taken per output row and detached from the graph
(the paper's section 4.3, peft's `DoraLinearLayer`), the magnitude m (one per output row, d per
projection) trainable and initialised to ||W + s B A|| at the start, so the model starts unchanged.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from hpo_peft.core.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # the slices of the fused weight, in order


class QKVLoRA(nn.Module):
    """W (3d x d_in) -> W + scale * cat(B_q A_q, B_k A_k, B_v A_v) over the projections chosen."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, random_b: bool, targets: tuple[str, ...],
                 dora: bool = False):
        super().__init__()
        fused, d_in = weight.shape
        self.d, self.scale, self.targets, self.dora = fused // 3, scale, targets, dora
        for target in targets:
            a = nn.Parameter(torch.empty(rank, d_in, dtype=weight.dtype, device=weight.device))
            b = nn.Parameter(torch.zeros(self.d, rank, dtype=weight.dtype, device=weight.device))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if random_b:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            self.register_parameter(f"lora_A_{target[0]}", a)
            self.register_parameter(f"lora_B_{target[0]}", b)
        if dora:
            with torch.no_grad():
                for target in targets:
                    rows = self.adapted(weight, target)
                    self.register_parameter(f"lora_magnitude_{target[0]}", nn.Parameter(rows.norm(dim=1)))

    def adapted(self, weight: torch.Tensor, target: str) -> torch.Tensor:
        """W + s B A for one projection's rows of the fused weight."""
        index = PROJECTIONS.index(target)
        a, b = getattr(self, f"lora_A_{target[0]}"), getattr(self, f"lora_B_{target[0]}")
        return weight[index * self.d:(index + 1) * self.d] + ((b @ a) * self.scale).to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dora:
            blocks = []
            for index, target in enumerate(PROJECTIONS):
                if target not in self.targets:
                    blocks.append(weight[index * self.d:(index + 1) * self.d])
                    continue
                rows = self.adapted(weight, target)
                magnitude = getattr(self, f"lora_magnitude_{target[0]}")
                blocks.append((magnitude / rows.norm(dim=1).detach()).to(weight.dtype)[:, None] * rows)
            return torch.cat(blocks)
        blocks = []
        for target in PROJECTIONS:
            if target in self.targets:
                a, b = getattr(self, f"lora_A_{target[0]}"), getattr(self, f"lora_B_{target[0]}")
                blocks.append((b @ a) * self.scale)
            else:
                blocks.append(weight.new_zeros(self.d, weight.shape[1]))
        return weight + torch.cat(blocks).to(weight.dtype)


def check_fused_options(target_modules: list[str], dropout: float, key: str = "methods.lora") -> None:
    """What a family whose attention fuses q, k and v cannot do with LoRA: other targets, dropout."""
    unknown = sorted(set(target_modules) - set(PROJECTIONS))
    if unknown:
        raise UserError(f"{key}.target_modules: {unknown} cannot be targeted on this model family, whose "
                        f"attention fuses q, k and v; choose among {list(PROJECTIONS)}")
    if dropout:
        raise UserError(f"{key}.dropout: LoRA dropout is not available where q, k and v are fused "
                        "(the delta is added to the weight); set it to 0")


def add_fused_lora(encoder: nn.Module, pattern: str, rank: int, alpha: float, random_b: bool,
                   target_modules: list[str], dropout: float, dora: bool = False) -> int:
    """Parametrize every fused q/k/v weight whose name matches `pattern`; returns how many."""
    check_fused_options(target_modules, dropout)
    targets = tuple(t for t in PROJECTIONS if t in target_modules)
    found = [name for name, _ in encoder.named_parameters() if re.search(pattern, name)]
    for name in found:
        owner_name, _, attribute = name.rpartition(".")
        owner = encoder.get_submodule(owner_name)
        lora = QKVLoRA(getattr(owner, attribute), rank, alpha / rank, random_b, targets, dora)
        parametrize.register_parametrization(owner, attribute, lora)
    if not found:
        raise UserError("methods.lora: this model has no fused q/k/v projection to adapt")
    return len(found)
