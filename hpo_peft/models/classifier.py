"""The classifier every method trains: a base model's image encoder, prompt-ensemble prototypes
and the zero-shot head. Loading, and each family's encoders, live in `hpo_peft/models/`.

`ImageClassifier` = the family's image encoder (to the joint space, L2-normalised) + `ZeroShotHead`
(cosine against trainable class weights, scaled by the model's frozen logit scale). Methods decide
which of its parameters train; this module does not know which.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hpo_peft.core.config import PromptConfig
from hpo_peft.models import BaseVLM, load_base_model

__all__ = ["BaseVLM", "ImageClassifier", "ZeroShotHead", "build_classifier", "class_names", "count_trainable",
           "encoder_is_frozen", "load_base_model", "prompt_texts", "text_prototypes"]


class ZeroShotHead(nn.Module):
    """logits = x . normalise(W)^T . exp(s); W starts at the text prototypes, s is frozen.

    Always computed in fp32, whatever the encoder's precision (autocast is off inside): bf16
    logits near 25 come in steps of 0.125, so close classes would tie and the arg-max would pick
    the lower class index."""

    def __init__(self, prototypes: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(prototypes.detach().clone().float())
        self.register_buffer("logit_scale", logit_scale.detach().clone().float().reshape(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            weight = self.weight.float()
            weight = weight / weight.norm(dim=-1, keepdim=True)
            return features @ weight.t() * self.logit_scale.float().exp()

    def initialize_from_shots(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Called with the training shots' features before training; heads that start from them
        (CLAP's class multipliers) override it."""

    def penalty(self) -> torch.Tensor | None:
        """A term added to the training loss; CLAP's pull towards the prototypes overrides it."""
        return None

    def schedule(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        """The learning-rate scheduler training this head steps once per batch (None: constant);
        heads whose paper schedules the rate (Tip-Adapter-F, CoOp) override it."""
        return None


class ImageClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: ZeroShotHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixel_values))


def prompt_texts(prompts: PromptConfig, categories: list[str]) -> dict[str, list[str]]:
    """Every template x description pair, per class; a class without a description is described by
    its own name, and unset templates or descriptions are the defaults for these classes
    (`PromptConfig.for_classes`)."""
    prompts = prompts.for_classes(categories) if prompts.templates is None or prompts.descriptions is None else prompts
    return {
        category: [t.replace("[CLS]", d) for d in prompts.descriptions.get(category, [category]) for t in prompts.templates]
        for category in categories
    }


@torch.no_grad()
def text_prototypes(base: BaseVLM, prompts: PromptConfig, categories: list[str]) -> torch.Tensor:
    """C x D prototypes: mean of the normalised prompt embeddings of each class, renormalised."""
    rows = []
    for texts in prompt_texts(prompts, categories).values():
        embeddings = base.family.encode_text(base, texts).float()  # on the text tower's device
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows).float().cpu()


def class_names(prompts: PromptConfig, categories: list[str]) -> list[str]:
    """Each class's name in a learned prompt (CoOp's [CLS]): its first description, else its own name."""
    prompts = prompts.for_classes(categories) if prompts.templates is None or prompts.descriptions is None else prompts
    return [prompts.descriptions.get(category, [category])[0] for category in categories]


def build_classifier(base: BaseVLM, prototypes: torch.Tensor, names: list[str] | None = None) -> ImageClassifier:
    """A fresh, independent copy of the image side with the zero-shot head, all frozen. The base
    model (shared, never trained) and the class names (`class_names`) go along for the methods that
    learn on the text side (prompt learning), which refuse without them."""
    encoder = copy.deepcopy(base.image_encoder())
    head = ZeroShotHead(prototypes, base.logit_scale).to(next(encoder.parameters()).device)
    classifier = ImageClassifier(encoder, head).requires_grad_(False).eval()
    classifier.base, classifier.class_names = base, names
    return classifier


def encoder_is_frozen(classifier: ImageClassifier) -> bool:
    """True when only the head trains: its inputs are then fixed features that can be cached."""
    return not any(p.requires_grad for p in classifier.encoder.parameters())


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
