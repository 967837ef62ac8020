"""Prompt learning: CoOp (Zhou et al., IJCV 2022) and KgCoOp (Yao et al., CVPR 2023), the methods
that adapt the *text* side. The image encoder stays frozen and its features are cached as for the
black-box adapters (`black_box.FeatureMethod`); the text encoder runs every step.

M learnable context vectors, each of the token-embedding width, replace the prompt's words before
each class name: the text encoder runs on [SOS][ctx_1..ctx_M][class name tokens][.][EOS] (the
family's own encoder, from token embeddings: `Family.encode_embedded`), and the class weights are
its normalised outputs, under the zero-shot head's cosine and frozen logit scale. Only the context
trains: M x width parameters shared by all classes, or N x M x width with `class_specific` (CSC).
- init: N(0, 0.02) with `n_ctx` vectors (the benchmark's 16), or the token embeddings of
  `init_text` (e.g. "a histopathology slide showing"; M is then its token count): the class
  weights then start as the text embeddings of "<init_text> <class name>." exactly.
- the class name is the class's first description (`model.class_names`), else its own name.
- KgCoOp adds kg_lambda * mean_c ||w_c - w_c^zs||^2 between the learned and the zero-shot class
  embeddings (here the prompt-ensemble prototypes, normalised); kg_lambda 8.
- the paper's training: SGD lr 0.002 (momentum 0.9, weight decay 5e-4), 200 epochs, batch 32
  (`config.PAPER_TRAIN`), one warm-up epoch at 1e-5, then cosine per epoch (`schedule`).
A family whose text encoder cannot run from token embeddings refuses in one line at `prepare`,
before anything trains. The adapter holds the context (`head.safetensors`) and, in
`prompt_learner.json`, the fingerprint of the whole base model (text tower included) and the
prompts' token ids: it loads only on the model and the class names it learned with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from hpo_peft.core.errors import UserError
from hpo_peft.methods.base import MethodConfig
from hpo_peft.methods.black_box import FeatureMethod
from hpo_peft.methods.schedules import cosine_schedule
from hpo_peft.models.classifier import BaseVLM, ImageClassifier, ZeroShotHead

PROMPT_FILE = "prompt_learner.json"


class CoOpConfig(MethodConfig):
    n_ctx: int = Field(16, ge=1, le=60)  # context vectors of a random start (init_text sets its own count)
    init_text: str | None = None  # e.g. "a histopathology slide showing": start from its token embeddings
    class_specific: bool = False  # CSC: one context per class
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine per epoch after the warm-up, as Dassl
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, gt=0)

    @field_validator("init_text")
    @classmethod
    def _words(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "[CLS]" in value):
            raise ValueError("the words before the class name, e.g. 'a histopathology slide showing' (no [CLS])")
        return value.strip() if value is not None else None


class KgCoOpConfig(CoOpConfig):
    kg_lambda: float = Field(8.0, ge=0)  # weight of the pull towards the zero-shot class embeddings


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class PromptLearnerHead(ZeroShotHead):
    """Class weights from the text encoder on [prefix][ctx][suffix]; `weight` keeps the zero-shot
    prototypes (frozen: KgCoOp's anchors)."""

    def __init__(self, zero_shot: ZeroShotHead, base: BaseVLM, names: list[str], config: CoOpConfig):
        super().__init__(zero_shot.weight, zero_shot.logit_scale)
        self.weight.requires_grad_(False)
        family = base.family
        family.token_embedding_owner(base.clip)  # a family that cannot refuses here
        self.__dict__["base"] = base  # shared and frozen, never part of this module's state
        self.config, self.names = config, list(names)
        words = config.init_text or " ".join(["X"] * config.n_ctx)
        self.texts = [f"{words} {name}." for name in names]
        with torch.no_grad():
            tokens = family.tokenize(base, self.texts)
            alone = family.tokenize(base, [words])["input_ids"][0]
            embedded = family.embed_tokens(base, tokens).float()
        ids = tokens["input_ids"]
        n_ctx = _common_prefix(alone, ids[0]) - 1  # the words' own tokens, after SOS
        if n_ctx < 1 or (config.init_text is None and n_ctx != config.n_ctx) or any(
                _common_prefix(ids[0], row) < 1 + n_ctx for row in ids):
            raise UserError(f"prompt learning: the tokenizer of {base.name_or_path!r} does not split the context "
                            f"{words!r} into tokens before each class name as prompt learning needs")
        context = embedded[0, 1:1 + n_ctx].clone() if config.init_text else torch.empty(
            n_ctx, embedded.shape[-1]).normal_(0, 0.02).to(embedded.device)
        if config.class_specific:
            context = context.unsqueeze(0).repeat(len(names), 1, 1)
        self.ctx = nn.Parameter(context.to(self.weight.device))
        self.register_buffer("prefix", embedded[:, :1].to(self.weight.device), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].to(self.weight.device), persistent=False)
        for key, value in tokens.items():
            self.register_buffer(f"tokens_{key}", value.to(self.weight.device), persistent=False)
        self._cache: tuple | None = None
        self._last: torch.Tensor | None = None

    def class_embeddings(self) -> torch.Tensor:
        """N x D, normalised in fp32: the text encoder on the learned prompts."""
        base = self.base
        device = self.ctx.device
        if base.family.text_device(base.clip) != device:
            base.clip.to(device)  # the shared base's text tower joins the trained context
        context = self.ctx if self.config.class_specific else self.ctx.expand(len(self.names), -1, -1)
        prompts = torch.cat([self.prefix, context.to(self.prefix.dtype), self.suffix], dim=1)
        tokens = {key.removeprefix("tokens_"): value for key, value in self.named_buffers() if key.startswith("tokens_")}
        text = base.family.encode_embedded(base, tokens, prompts)
        with torch.autocast(device.type, enabled=False):
            text = text.float()
            return text / text.norm(dim=-1, keepdim=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        key = (self.ctx._version, self.ctx.data_ptr(), str(self.ctx.device))
        if self.training or self._cache is None or self._cache[0] != key:
            weight = self.class_embeddings()
            self._last = weight if self.training else None
            self._cache = None if self.training else (key, weight.detach())
        else:  # evaluation: the context has not changed, nor have the class weights
            weight = self._cache[1]
        with torch.autocast(features.device.type, enabled=False):
            return features.float() @ weight.t() * self.logit_scale.float().exp()

    def penalty(self) -> torch.Tensor | None:
        lam = getattr(self.config, "kg_lambda", None)
        if lam is None or self._last is None:
            return None
        anchors = self.weight / self.weight.norm(dim=-1, keepdim=True)
        return lam * (self._last - anchors).pow(2).sum(dim=-1).mean()

    def schedule(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        if self.config.schedule == "constant":
            return None
        return cosine_schedule(optimizer, steps_per_epoch, epochs, per_epoch=True,
                               warmup_epochs=self.config.warmup_epochs, warmup_lr=self.config.warmup_lr)

    def identity(self) -> dict:
        """What the learned context depends on beyond itself: the model and the prompts' tokens."""
        return {"text_fingerprint": self.base.text_fingerprint(), "prompts": self.texts,
                "input_ids": self.tokens_input_ids.tolist()}


class CoOp(FeatureMethod):
    name = "coop"
    Config = CoOpConfig

    def prepare(self, classifier: ImageClassifier, config: CoOpConfig) -> ImageClassifier:
        base, names = getattr(classifier, "base", None), getattr(classifier, "class_names", None)
        if base is None or names is None:
            raise UserError(f"method {self.name}: prompt learning needs the class names, which this protocol "
                            "does not give (use protocol: study)")
        classifier.requires_grad_(False)
        classifier.head = PromptLearnerHead(classifier.head, base, names, config)
        return classifier

    def save(self, classifier: ImageClassifier, folder: Path, base_name: str | None = None) -> list[str]:
        (folder / PROMPT_FILE).write_text(json.dumps(classifier.head.identity(), indent=1))
        return [PROMPT_FILE]

    def load(self, classifier: ImageClassifier, config: CoOpConfig, folder: Path) -> ImageClassifier:
        classifier = self.prepare(classifier, config)
        path = folder / PROMPT_FILE
        if not path.is_file():
            raise UserError(f"{path}: the learned prompts' record is missing")
        saved, now = json.loads(path.read_text()), classifier.head.identity()
        if saved.get("text_fingerprint") != now["text_fingerprint"]:
            raise UserError(f"{path}: the prompts were learned on another model (fingerprint of every weight, text "
                            f"tower included: {saved.get('text_fingerprint')} then, {now['text_fingerprint']} now)")
        if saved.get("input_ids") != now["input_ids"]:
            raise UserError(f"{path}: the prompts were learned for {saved.get('prompts')}, this model's tokenizer "
                            f"and the adapter's classes give {now['prompts']}")
        return classifier.requires_grad_(False)


class KgCoOp(CoOp):
    name = "kgcoop"
    Config = KgCoOpConfig
