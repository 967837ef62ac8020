"""Loading a CLIP-format model, its encoders, prompt-ensemble prototypes and the zero-shot head.

`ImageClassifier` = `ImageEncoder` (vision tower + projection, L2-normalised) + `ZeroShotHead`
(cosine against trainable class weights, scaled by the model's frozen logit scale). Methods decide
which of its parameters train; this module does not know which.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoProcessor

from hpo_peft.config import ModelConfig, PromptConfig
from hpo_peft.data import Preprocessing
from hpo_peft.errors import UserError


class ImageEncoder(nn.Module):
    """vision_model(pixel_values).pooler_output -> visual_projection -> L2-normalise."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        features = self.visual_projection(pooled)
        return features / features.norm(dim=-1, keepdim=True)


class ZeroShotHead(nn.Module):
    """logits = x . normalise(W)^T . exp(s); W starts at the text prototypes, s is frozen."""

    def __init__(self, prototypes: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(prototypes.detach().clone().float())
        self.register_buffer("logit_scale", logit_scale.detach().clone().float().reshape(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.weight / self.weight.norm(dim=-1, keepdim=True)
        return features @ weight.t().to(features.dtype) * self.logit_scale.exp()


class ImageClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: ZeroShotHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixel_values))


@dataclass
class BaseModel:
    """A loaded CLIP-format model: what every trial starts from (copied, never trained in place)."""

    name_or_path: str
    revision: str | None
    clip: nn.Module
    processor: object
    preprocessing: Preprocessing

    def image_encoder(self) -> ImageEncoder:
        return ImageEncoder(self.clip.vision_model, self.clip.visual_projection)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach()

    def fingerprint(self) -> str:
        """A cheap identity of the weights: two models differ here if their projections differ."""
        digest = hashlib.sha256()
        for tensor in (self.clip.visual_projection.weight, self.clip.logit_scale):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def load_base_model(config: ModelConfig) -> BaseModel:
    """Load model and processor by hub id or local folder, through `AutoModel`/`AutoProcessor`."""
    source = config.name_or_path
    try:
        processor = AutoProcessor.from_pretrained(source, revision=config.revision)
        clip = AutoModel.from_pretrained(source, revision=config.revision)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # one line
        hint = (
            f"model {source!r} (revision {config.revision or 'default'}) could not be loaded: {reason} "
            "Without internet, download it once elsewhere (e.g. `huggingface-cli download vinid/plip "
            "--local-dir DIR`) and set model.name_or_path to that folder."
        )
        raise UserError(hint) from None
    for attribute in ("vision_model", "visual_projection", "text_model", "text_projection", "logit_scale"):
        if not hasattr(clip, attribute):
            raise UserError(f"model {source!r} is not CLIP-format: it has no {attribute!r}")
    clip.eval().requires_grad_(False)
    return BaseModel(source, config.revision, clip, processor, preprocessing_of(processor))


def preprocessing_of(processor) -> Preprocessing:
    """The course's pre-processing: the whole patch resized to the model's input size (no centre
    crop), then the processor's mean and std."""
    image_processor = processor.image_processor
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    height = crop.get("height") or size.get("height") or size.get("shortest_edge")
    width = crop.get("width") or size.get("width") or size.get("shortest_edge")
    resample = getattr(image_processor, "resample", None)
    return Preprocessing(
        height=int(height),
        width=int(width),
        mean=tuple(float(v) for v in image_processor.image_mean),
        std=tuple(float(v) for v in image_processor.image_std),
        resample=int(resample) if resample is not None else 3,
    )


def prompt_texts(prompts: PromptConfig, categories: list[str]) -> dict[str, list[str]]:
    """Every template x description pair, per class."""
    return {
        category: [t.replace("[CLS]", d) for d in prompts.descriptions[category] for t in prompts.templates]
        for category in categories
    }


@torch.no_grad()
def text_prototypes(base: BaseModel, prompts: PromptConfig, categories: list[str]) -> torch.Tensor:
    """C x D prototypes: mean of the normalised prompt embeddings of each class, renormalised."""
    clip, tokenizer = base.clip, base.processor.tokenizer
    rows = []
    for texts in prompt_texts(prompts, categories).values():
        device = next(clip.text_model.parameters()).device  # the image side may live elsewhere
        tokens = tokenizer(texts, max_length=77, padding=True, truncation=True, return_tensors="pt").to(device)
        pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        embeddings = clip.text_projection(pooled)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows).float().cpu()


def build_classifier(base: BaseModel, prototypes: torch.Tensor) -> ImageClassifier:
    """A fresh, independent copy of the image side with the zero-shot head, all frozen."""
    encoder = copy.deepcopy(base.image_encoder())
    head = ZeroShotHead(prototypes, base.logit_scale).to(next(encoder.parameters()).device)
    return ImageClassifier(encoder, head).requires_grad_(False).eval()


def encoder_is_frozen(classifier: ImageClassifier) -> bool:
    """True when only the head trains: its inputs are then fixed features that can be cached."""
    return not any(p.requires_grad for p in classifier.encoder.parameters())


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
