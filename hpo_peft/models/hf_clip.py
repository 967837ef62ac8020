"""The Hugging Face CLIP family: PLIP and any CLIP-format model that `transformers` loads with
`AutoModel`/`AutoProcessor`, from a local folder or a hub id.

A hub id is read from the local Hugging Face cache first; only if it is not there is the hub
asked, once and with a short timeout, before the (retrying) download starts: an offline machine
gets one clear message in seconds instead of minutes of retries."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoProcessor

from hpo_peft.core.config import ModelConfig
from hpo_peft.data import Preprocessing
from hpo_peft.core.errors import UserError
from hpo_peft.models.base import BaseVLM, Family, FamilyEncoder, ModuleNames


class ImageEncoder(FamilyEncoder):
    """vision_model(pixel_values).pooler_output -> visual_projection -> L2-normalise."""

    module_names = ModuleNames(
        block_norms=r"encoder\.layers\.\d+\.layer_norm[12]\.(weight|bias)$",
        outer_norms=r"(pre_layrnorm|post_layernorm)\.(weight|bias)$",
        qkv_linears=("q_proj", "k_proj", "v_proj"),
    )

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class HFClip(Family):
    encoder = ImageEncoder
    name = "hf_clip"

    def recognises(self, source: str) -> bool | None:
        folder = Path(source).expanduser()
        if folder.is_dir() and (folder / "config.json").is_file():
            return True
        return None

    def load(self, config: ModelConfig) -> BaseVLM:
        source = config.name_or_path
        if _looks_like_path(source):
            processor, clip = _load_local(source, config.revision)
        else:
            processor, clip = _load_hub(source, config.revision)
        for attribute in ("vision_model", "visual_projection", "text_model", "text_projection", "logit_scale"):
            if not hasattr(clip, attribute):
                raise UserError(f"model.name_or_path: model {source!r} is not CLIP-format: it has no {attribute!r}")
        clip.eval().requires_grad_(False)
        return BaseVLM(source, config.revision, clip, processor, preprocessing_of(processor), self)

    def image_encoder(self, model: nn.Module) -> ImageEncoder:
        return ImageEncoder(model.vision_model, model.visual_projection)

    def identity_tensors(self, model: nn.Module):
        yield from model.vision_model.state_dict().items()
        yield from (("visual_projection." + k, v) for k, v in model.visual_projection.state_dict().items())
        yield "logit_scale", model.logit_scale

    def text_device(self, model: nn.Module) -> torch.device:
        return next(model.text_model.parameters()).device

    def tokenize(self, base: BaseVLM, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = base.processor.tokenizer(texts, max_length=77, padding=True, truncation=True, return_tensors="pt")
        device = self.text_device(base.clip)
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    def encode_tokens(self, base: BaseVLM, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = base.clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return base.clip.text_projection(pooled)

    def token_embedding_owner(self, model: nn.Module) -> nn.Module:
        return model.text_model.embeddings  # CLIPTextEmbeddings: token_embedding(input_ids) + positions


HUB_TIMEOUT_S = 5.0  # one bounded look at the hub when a model is not in the local cache
DOWNLOAD_HINT = "`hf download vinid/plip --local-dir DIR`"



def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (or anything that exists here) is a path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source or os.path.exists(source)


@contextlib.contextmanager
def _bars_only_in_a_terminal():
    """transformers' own bars ("Loading weights", downloads) in a terminal; in a log (CI, a batch
    job's output file) each redraw would be one more line of noise."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(source: str, revision: str | None, local_only: bool):
    with _bars_only_in_a_terminal():
        return _load_pretrained(source, revision, local_only)


def _load_pretrained(source: str, revision: str | None, local_only: bool):
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


