"""Loading a CLIP-format model, its encoders, prompt-ensemble prototypes and the zero-shot head.

`ImageClassifier` = `ImageEncoder` (vision tower + projection, L2-normalised) + `ZeroShotHead`
(cosine against trainable class weights, scaled by the model's frozen logit scale). Methods decide
which of its parameters train; this module does not know which.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
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
        features = self.visual_projection(pooled)  # bf16 under autocast: the encoder's precision
        with torch.autocast(features.device.type, enabled=False):  # the normalisation is fp32 always
            features = features.float()
            return features / features.norm(dim=-1, keepdim=True)


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
        """The identity of every weight an adapter depends on: the whole vision tower, the
        projection and the logit scale, hashed tensor by tensor (name, shape, fp32 values), so a
        change of one weight shows and the file layout does not matter. Computed once per model."""
        if self.clip not in _FINGERPRINTS:
            digest = hashlib.sha256()
            tensors = [*self.clip.vision_model.state_dict().items(),
                       *(("visual_projection." + k, v) for k, v in self.clip.visual_projection.state_dict().items()),
                       ("logit_scale", self.clip.logit_scale)]
            for name, tensor in sorted(tensors, key=lambda item: item[0]):
                digest.update(f"{name}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            _FINGERPRINTS[self.clip] = digest.hexdigest()[:16]
        return _FINGERPRINTS[self.clip]


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()  # base models never train in place


HUB_TIMEOUT_S = 5.0  # one bounded look at the hub when a model is not in the local cache
DOWNLOAD_HINT = "`hf download vinid/plip --local-dir DIR`"


def load_base_model(config: ModelConfig) -> BaseModel:
    """Load model and processor by local folder or hub id, through `AutoModel`/`AutoProcessor`.

    A hub id is read from the local Hugging Face cache first; only if it is not there is the hub
    asked, once and with a short timeout, before the (retrying) download starts: an offline machine
    gets one clear message in seconds instead of minutes of retries."""
    source = config.name_or_path
    if _looks_like_path(source):
        processor, clip = _load_local(source, config.revision)
    else:
        processor, clip = _load_hub(source, config.revision)
    for attribute in ("vision_model", "visual_projection", "text_model", "text_projection", "logit_scale"):
        if not hasattr(clip, attribute):
            raise UserError(f"model.name_or_path: model {source!r} is not CLIP-format: it has no {attribute!r}")
    clip.eval().requires_grad_(False)
    return BaseModel(source, config.revision, clip, processor, preprocessing_of(processor))


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (or anything that exists here) is a path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source or os.path.exists(source)


def _from_pretrained(source: str, revision: str | None, local_only: bool):
    if not local_only:
        return AutoProcessor.from_pretrained(source, revision=revision), AutoModel.from_pretrained(source, revision=revision)
    # transformers does not pass local_files_only on to its adapter look-up, which would go online
    processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=True)
    clip = AutoModel.from_pretrained(
        source, revision=revision, local_files_only=True, adapter_kwargs={"local_files_only": True}
    )
    return processor, clip


def _cannot_load(source: str, revision: str | None, err: Exception) -> UserError:
    reason = " ".join(str(err).split())  # one line
    return UserError(
        f"model.name_or_path: model {source!r} (revision {revision or 'default'}) could not be loaded: {reason} "
        f"Without internet, download it once elsewhere (e.g. {DOWNLOAD_HINT}) "
        "and set model.name_or_path to that folder."
    )


def _damaged(folder: Path, source: str) -> UserError:
    """A weights file that safetensors cannot read, named (sharded checkpoints have several)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - whatever safetensors says, this file is unreadable
            return UserError(f"model.name_or_path: {path} is damaged or truncated; re-download it")
    return UserError(f"model.name_or_path: the weights of {source!r} in {folder} are damaged or truncated; re-download them")


def _load_local(source: str, revision: str | None):
    folder = Path(source).expanduser()
    where = "" if folder.is_absolute() else f" (relative to {Path.cwd()})"
    if not folder.exists():
        raise UserError(
            f"model.name_or_path: folder {source} not found{where}; set it to a folder with a saved model "
            f"(e.g. made by {DOWNLOAD_HINT}) or to a hub id such as vinid/plip"
        )
    if not folder.is_dir():
        raise UserError(
            f"model.name_or_path: {source} is a file, not a model folder; set it to the folder that holds "
            "config.json and the weights"
        )
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model.name_or_path: model {source!r} could not be loaded: the folder has no config.json; "
            f"download the model once (e.g. {DOWNLOAD_HINT}) and set model.name_or_path to that folder."
        )
    try:
        return _from_pretrained(str(folder), revision, local_only=True)
    except (OSError, ValueError) as err:
        raise _cannot_load(source, revision, err) from None
    except SafetensorError:
        raise _damaged(folder, source) from None


def _load_hub(repo_id: str, revision: str | None):
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"model.name_or_path: {repo_id!r} is neither a local folder nor a hub id (owner/name, e.g. vinid/plip)"
        ) from None
    try:
        return _from_pretrained(repo_id, revision, local_only=True)
    except (OSError, ValueError):
        pass  # not (completely) in the local cache
    except SafetensorError:
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        if isinstance(cached, str):
            raise _damaged(Path(cached).parent, repo_id) from None
        raise UserError(f"model.name_or_path: the cached weights of {repo_id!r} are damaged or truncated; re-download them") from None
    advice = (
        f"download it once where there is internet ({DOWNLOAD_HINT}) and set model.name_or_path to DIR, "
        f"or copy a Hugging Face cache that holds it to {constants.HF_HUB_CACHE}"
    )
    if constants.is_offline_mode():
        raise UserError(
            f"model.name_or_path: {repo_id!r} is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set; {advice}"
        )
    problem = _hub_unreachable(repo_id, revision)
    if problem is not None:
        raise UserError(
            f"model.name_or_path: {repo_id!r} is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and could not reach the hub at {constants.ENDPOINT} ({problem}); {advice}"
        )
    try:
        return _from_pretrained(repo_id, revision, local_only=False)
    except (OSError, ValueError) as err:
        raise _cannot_load(repo_id, revision, err) from None


def _hub_unreachable(repo_id: str, revision: str | None) -> str | None:
    """One request, no retries, `HUB_TIMEOUT_S` at most: None when the hub answers (even "not
    found" or "gated": the download then says so), else what went wrong and how long it took."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    started = time.monotonic()
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        return None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status is not None and status < 500 and status not in (408, 429):
            return None
        reason = f"HTTP {status}"
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, TLS, proxy, timeout...
        reason = " ".join(str(err).split()) or type(err).__name__
    return f"gave up after {time.monotonic() - started:.1f} s, timeout {HUB_TIMEOUT_S:g} s: {reason}"


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
