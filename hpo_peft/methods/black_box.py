"""Black-box adapters: the backbone stays frozen and only a head over its L2-normalised image
features trains, so the trainer can work on cached features (see `features.py`).

Each adapter is a `ZeroShotHead` variant (same cosine head, same frozen logit scale):
- linear probe: W Kaiming-normal initialised;
- zero-shot linear probe: W initialised to the text prototypes;
- CLIP-Adapter: prototypes fixed, f' = (1 - a) f + a g(f), g = ReLU(Linear(D->h)) ReLU(Linear(h->D)),
  no biases, f' renormalised;
- CLAP: W initialised to the prototypes t, loss = CE + mean_c lambda_c ||W_c - t_c||^2 with
  lambda_c the mean zero-shot softmax probability of class c over the training shots of class c.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from hpo_peft.methods.base import Method, MethodConfig
from hpo_peft.models.classifier import ImageClassifier, ZeroShotHead


class LinearProbeHead(ZeroShotHead):
    def __init__(self, zero_shot: ZeroShotHead):
        super().__init__(zero_shot.weight, zero_shot.logit_scale)
        nn.init.kaiming_normal_(self.weight)


class CLIPAdapterHead(ZeroShotHead):
    def __init__(self, zero_shot: ZeroShotHead, alpha: float, hidden: int):
        super().__init__(zero_shot.weight, zero_shot.logit_scale)
        self.weight.requires_grad_(False)
        dim = self.weight.shape[1]
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.ReLU())
        self.alpha = alpha

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        adapted = (1 - self.alpha) * features + self.alpha * self.adapter(features)
        return super().forward(adapted / adapted.norm(dim=-1, keepdim=True))


class CLAPHead(ZeroShotHead):
    def __init__(self, zero_shot: ZeroShotHead):
        super().__init__(zero_shot.weight, zero_shot.logit_scale)
        self.register_buffer("anchors", zero_shot.weight.detach().clone())
        self.register_buffer("multipliers", torch.zeros(self.weight.shape[0]))

    @torch.no_grad()
    def initialize_from_shots(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """lambda_c = mean zero-shot softmax probability of class c over the shots of class c."""
        weight = self.anchors / self.anchors.norm(dim=-1, keepdim=True)
        probs = (features.float() @ weight.t() * self.logit_scale.exp()).softmax(dim=-1)
        for c in range(len(self.multipliers)):
            self.multipliers[c] = probs[labels == c, c].mean()

    def penalty(self) -> torch.Tensor:
        return (self.multipliers * (self.weight - self.anchors).pow(2).sum(dim=-1)).mean()


class FeatureMethod(Method):
    """Trains a head over frozen features; saves nothing of the encoder (the head has it all)."""

    trains_encoder = False

    def make_head(self, zero_shot: ZeroShotHead, config: MethodConfig) -> ZeroShotHead:
        raise NotImplementedError

    def prepare(self, classifier: ImageClassifier, config: MethodConfig) -> ImageClassifier:
        classifier.requires_grad_(False)
        head = self.make_head(classifier.head, config)
        classifier.head = head.to(classifier.head.weight.device)
        return classifier


class LinearProbe(FeatureMethod):
    name = "linear_probe"

    def make_head(self, zero_shot, config):
        return LinearProbeHead(zero_shot)


class ZeroShotLinearProbe(FeatureMethod):
    name = "zs_linear_probe"

    def make_head(self, zero_shot, config):
        return ZeroShotHead(zero_shot.weight, zero_shot.logit_scale)


class CLIPAdapterConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0, le=1)
    hidden: int = Field(4, ge=1)


class CLIPAdapter(FeatureMethod):
    name = "clip_adapter"
    Config = CLIPAdapterConfig

    def make_head(self, zero_shot, config: CLIPAdapterConfig):
        return CLIPAdapterHead(zero_shot, config.alpha, config.hidden)


class CLAP(FeatureMethod):
    name = "clap"

    def make_head(self, zero_shot, config):
        return CLAPHead(zero_shot)
