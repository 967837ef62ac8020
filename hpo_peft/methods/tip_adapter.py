"""Tip-Adapter (Zhang et al., ECCV 2022) and Tip-Adapter-F: a cache model over the training shots'
frozen, L2-normalised features, beside the zero-shot head (black-box: the encoder never trains,
features are cached as for the other black-box adapters, `black_box.FeatureMethod`).

Keys F (N*K x D): the shots' features; values L (N*K x N): their one-hot labels. For a feature f,
affinity A = f F^T, cache logits = exp(-beta (1 - A)) L, and

    logits = exp(s) f normalise(W)^T + alpha * cache logits

with W the (frozen) text prototypes and exp(s) the model's logit scale (100 for CLIP and PLIP, the
paper's constant): alpha = 0 is exactly the zero-shot head.
- `tip_adapter` trains nothing: a trial is zero epochs, its score the validation score with the
  cache built from the trial's training shots (each fold's, for kfold); the adapter kept caches
  every shot the trial may learn from. alpha and beta are its only hyper-parameters: the study
  searches them (`search.methods.tip_adapter.alpha`, `.beta`; the paper's start is 1 and 1, its
  grid [0, 50]).
- `tip_adapter_f` trains the keys F (N*K x D parameters), initialised to the features; the
  paper's AdamW (lr 1e-3, eps 1e-4), cosine schedule over every step, 20 epochs, batch 256 are its
  defaults (`config.PAPER_TRAIN`, under `method_train`).
The cache is part of the head (`head.safetensors`): its size follows the shots, so loading resizes
it to the saved one.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from hpo_peft.core.errors import UserError
from hpo_peft.methods.base import MethodConfig
from hpo_peft.methods.black_box import FeatureMethod
from hpo_peft.methods.schedules import cosine_schedule
from hpo_peft.models.classifier import ZeroShotHead


class TipAdapterConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0)  # weight of the cache logits (0: zero-shot)
    beta: float = Field(1.0, ge=0)  # sharpness of the affinities


class TipAdapterFConfig(TipAdapterConfig):
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: over every step of the run, as the paper
    eps: float = Field(1e-4, gt=0)  # Adam(W)'s epsilon (the paper's 1e-4, not PyTorch's 1e-8)


class TipAdapterHead(ZeroShotHead):
    def __init__(self, zero_shot: ZeroShotHead, config: TipAdapterConfig, train_keys: bool):
        super().__init__(zero_shot.weight, zero_shot.logit_scale)
        self.weight.requires_grad_(False)
        self.config = config
        classes, dim = self.weight.shape
        self.keys = nn.Parameter(torch.zeros(0, dim, device=self.weight.device), requires_grad=train_keys)
        self.register_buffer("values", torch.zeros(0, classes, device=self.weight.device))

    @torch.no_grad()
    def initialize_from_shots(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The cache: keys the shots' features, values their one-hot labels. The keys parameter is
        resized in place, so an optimizer built before this call trains it."""
        self.keys.data = features.detach().float().clone().to(self.weight.device)
        self.values = F.one_hot(labels.to(self.weight.device).long(), self.weight.shape[0]).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not len(self.keys):
            raise UserError("tip_adapter: the cache holds no training shots (this protocol builds no cache; "
                            "use protocol: study)")
        zero_shot = super().forward(features)
        with torch.autocast(features.device.type, enabled=False):
            affinity = features.float() @ self.keys.float().t()
            cache = torch.exp(-self.config.beta * (1 - affinity)) @ self.values
            return zero_shot + self.config.alpha * cache

    def schedule(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        if not isinstance(self.config, TipAdapterFConfig):
            return None
        for group in optimizer.param_groups:
            if "eps" in group:
                group["eps"] = self.config.eps
        return cosine_schedule(optimizer, steps_per_epoch, epochs) if self.config.schedule == "cosine" else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The saved cache's size (the shots it was built from), then the values."""
        if (keys := state_dict.get(prefix + "keys")) is not None:
            self.keys.data = torch.empty_like(keys, device=self.weight.device)
        if (values := state_dict.get(prefix + "values")) is not None:
            self.values = torch.empty_like(values, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TipAdapter(FeatureMethod):
    name = "tip_adapter"
    Config = TipAdapterConfig
    trains = False

    def make_head(self, zero_shot, config: TipAdapterConfig):
        return TipAdapterHead(zero_shot, config, train_keys=False)


class TipAdapterF(FeatureMethod):
    name = "tip_adapter_f"
    Config = TipAdapterFConfig

    def make_head(self, zero_shot, config: TipAdapterFConfig):
        return TipAdapterHead(zero_shot, config, train_keys=True)
