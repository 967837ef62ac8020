"""What every model family gives the rest of the package (the family interface).

A family loads a model and states, for it: the image encoder to the joint space, the text
encoder, the logit scale, the pre-processing, the tokenizer, and the parameter names each PEFT
method needs (`ModuleNames`). Nothing outside `hpo_peft/models/` knows which family it has.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from hpo_peft.core.config import ModelConfig
from hpo_peft.data import Preprocessing
from hpo_peft.core.errors import UserError


@dataclass(frozen=True)
class ModuleNames:
    """Where each PEFT method acts, as regular expressions over the image encoder's parameter names.

    `qkv_linears`: names of separate q/k/v `nn.Linear` modules (HF peft's LoRA targets them);
    `fused_qkv`: parameter names of fused [q; k; v] input projections (3d x d_in), where the
    family has no separate q/k/v modules (LoRA then splits the delta into q, k and v)."""

    block_norms: str  # LayerNorm weight/bias inside every transformer block
    outer_norms: str  # the LayerNorms before and after the blocks
    qkv_linears: tuple[str, ...] = ()
    fused_qkv: str | None = None


class FamilyEncoder(nn.Module):
    """pixel values -> projected image features, L2-normalised in fp32 (whatever the autocast).

    Subclasses hold the family's vision modules under their own names and say where the methods
    act (`module_names`)."""

    module_names: ClassVar[ModuleNames]

    def project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.project(pixel_values)  # bf16 under autocast: the encoder's precision
        with torch.autocast(features.device.type, enabled=False):  # the normalisation is fp32 always
            features = features.float()
            return features / features.norm(dim=-1, keepdim=True)


class Family:
    """One kind of model: how to recognise, load and read it."""

    name: ClassVar[str]
    encoder: ClassVar[type[FamilyEncoder]]  # its image encoder's class: where the methods act, known before loading

    def recognises(self, source: str) -> bool | None:
        """True: this source is surely of this family; None: the family cannot tell."""
        return None

    def load(self, config: ModelConfig) -> "BaseVLM":
        raise NotImplementedError

    def image_encoder(self, model: nn.Module) -> FamilyEncoder:
        """The model's own vision modules (shared, not copied) behind a `FamilyEncoder`."""
        raise NotImplementedError

    def encode_text(self, base: "BaseVLM", texts: list[str]) -> torch.Tensor:
        """Projected (not normalised) text features, N x D."""
        return self.encode_tokens(base, self.tokenize(base, texts))

    def tokenize(self, base: "BaseVLM", texts: list[str]) -> dict[str, torch.Tensor]:
        """The text encoder's inputs (`input_ids` first, N x L), on the text tower's device."""
        raise NotImplementedError

    def encode_tokens(self, base: "BaseVLM", tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """`encode_text` from `tokenize`'s output."""
        raise NotImplementedError

    def token_embedding_owner(self, model: nn.Module) -> nn.Module:
        """The module whose `token_embedding` (ids -> N x L x width) the text encoder calls first:
        prompt learning runs the text encoder from token embeddings through it (`encode_embedded`)."""
        raise UserError(f"model family {self.name} cannot run its text encoder from token embeddings, which "
                        "prompt learning (coop, kgcoop) needs; choose another method")

    def embed_tokens(self, base: "BaseVLM", tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The token embeddings of `tokens["input_ids"]`, N x L x width."""
        return self.token_embedding_owner(base.clip).token_embedding(tokens["input_ids"])

    def encode_embedded(self, base: "BaseVLM", tokens: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
        """`encode_tokens`, with `embeddings` (N x L x width) in place of the token embedding of
        `tokens["input_ids"]`: the family's own text encoder (its masks and pooling read the ids), so
        the embeddings of the ids themselves give `encode_tokens` exactly."""
        owner = self.token_embedding_owner(base.clip)
        lookup = owner.token_embedding
        owner.token_embedding = GivenEmbeddings(embeddings)
        try:
            return self.encode_tokens(base, tokens)
        finally:
            owner.token_embedding = lookup

    def logit_scale(self, model: nn.Module) -> torch.Tensor:
        return model.logit_scale.detach()

    def text_device(self, model: nn.Module) -> torch.device:
        raise NotImplementedError

    def identity_tensors(self, model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        """Every weight an adapter depends on: the image encoder and the logit scale."""
        yield from self.image_encoder(model).state_dict().items()
        yield "logit_scale", model.logit_scale


class GivenEmbeddings(nn.Module):
    """Stands in for a token-embedding lookup: the given embeddings of the first L tokens (a family
    may drop the last place, e.g. CONCH's for its CLS token)."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[:, :ids.shape[1]].to(self.embeddings.dtype)


@dataclass
class BaseVLM:
    """A loaded model of some family: what every trial starts from (copied, never trained in place)."""

    name_or_path: str
    revision: str | None
    clip: nn.Module
    processor: Any  # the family's tokenizer (HF: the processor)
    preprocessing: Preprocessing
    family: Family

    def image_encoder(self) -> FamilyEncoder:
        return self.family.image_encoder(self.clip)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.family.logit_scale(self.clip)

    def fingerprint(self) -> str:
        """The identity of every weight an adapter depends on (the whole image side and the logit
        scale), hashed tensor by tensor (name, shape, fp32 values), so a change of one weight
        shows and the file layout does not matter. Computed once per model."""
        if self.clip not in _FINGERPRINTS:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.family.identity_tensors(self.clip), key=lambda item: item[0]):
                digest.update(f"{name}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            _FINGERPRINTS[self.clip] = digest.hexdigest()[:16]
        return _FINGERPRINTS[self.clip]


    def text_fingerprint(self) -> str:
        """The identity of every weight of the whole model, text tower included (what a prompt
        learned on its text encoder depends on), as `fingerprint`. Computed once per model."""
        if self.clip not in _TEXT_FINGERPRINTS:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.clip.state_dict().items(), key=lambda item: item[0]):
                digest.update(f"{name}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            _TEXT_FINGERPRINTS[self.clip] = digest.hexdigest()[:16]
        return _TEXT_FINGERPRINTS[self.clip]


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()  # base models never train in place
_TEXT_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's codes, as `Preprocessing.resample` holds them
