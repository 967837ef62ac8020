"""The open_clip family: QuiltNet (`hf-hub:wisdomik/QuiltNet-B-32`) and any model that
`open_clip.create_model_and_transforms` loads: `hf-hub:ORG/NAME`, `local-dir:PATH`, or a folder
holding `open_clip_config.json` and the weights (loaded as `local-dir:`, offline).

Its vision tower (`model.visual`) projects inside (`visual.proj`); attention is
`nn.MultiheadAttention` with a fused [q; k; v] input projection (`attn.in_proj_weight`), and the
LayerNorms are `ln_1`/`ln_2` in each block, `ln_pre`/`ln_post` around them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hpo_peft.core.config import ModelConfig
from hpo_peft.data import Preprocessing
from hpo_peft.core.errors import UserError
from hpo_peft.models.base import RESAMPLE, BaseVLM, Family, FamilyEncoder, ModuleNames

CONFIG_FILE = "open_clip_config.json"
HUB_PREFIX, LOCAL_PREFIX = "hf-hub:", "local-dir:"
DOWNLOAD_HINT = "`hf download wisdomik/QuiltNet-B-32 --local-dir DIR`"


class OpenClipEncoder(FamilyEncoder):
    """open_clip's `visual` (ViT: patch embedding, blocks, pooling, `proj`) -> L2-normalise."""

    module_names = ModuleNames(
        block_norms=r"transformer\.resblocks\.\d+\.ln_[12]\.(weight|bias)$",
        outer_norms=r"(ln_pre|ln_post)\.(weight|bias)$",
        fused_qkv=r"transformer\.resblocks\.\d+\.attn\.in_proj_weight$",
    )

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


def open_clip_name(source: str) -> str:
    """The name open_clip loads: `hf-hub:`/`local-dir:` as given, a folder as `local-dir:`."""
    if source.startswith((HUB_PREFIX, LOCAL_PREFIX)):
        return source
    return LOCAL_PREFIX + str(Path(source).expanduser())


class OpenClip(Family):
    encoder = OpenClipEncoder
    name = "open_clip"

    def recognises(self, source: str) -> bool | None:
        if source.startswith((HUB_PREFIX, LOCAL_PREFIX)):
            return True
        return True if (Path(source).expanduser() / CONFIG_FILE).is_file() else None

    def load(self, config: ModelConfig) -> BaseVLM:
        import open_clip

        name = open_clip_name(config.name_or_path)
        _check_local(name)
        if config.revision is not None:
            raise UserError("model.revision: open_clip models are loaded by name or folder, without a revision; "
                            "download the revision you want once and point model.name_or_path at its folder")
        try:
            model = open_clip.create_model(name, pretrained=None, load_weights=True, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(name)
        except (OSError, ValueError, RuntimeError) as err:
            reason = " ".join(str(err).split())
            raise UserError(f"model.name_or_path: open_clip model {config.name_or_path!r} could not be loaded: "
                            f"{reason} Without internet, download it once elsewhere (e.g. {DOWNLOAD_HINT}) and set "
                            "model.name_or_path to that folder.") from None
        model.eval().requires_grad_(False)
        return BaseVLM(config.name_or_path, None, model, tokenizer, preprocessing_of(model), self)

    def image_encoder(self, model: nn.Module) -> OpenClipEncoder:
        return OpenClipEncoder(model.visual)

    def tokenize(self, base: BaseVLM, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": base.processor(texts).to(self.text_device(base.clip))}

    def encode_tokens(self, base: BaseVLM, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return base.clip.encode_text(tokens["input_ids"])

    def text_device(self, model: nn.Module) -> torch.device:
        return self.token_embedding_owner(model).token_embedding.weight.device

    def token_embedding_owner(self, model: nn.Module) -> nn.Module:
        """CLIP's own `token_embedding`, or its text tower's (`CustomTextCLIP.text`)."""
        owner = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if not isinstance(getattr(owner, "token_embedding", None), nn.Embedding):
            return super().token_embedding_owner(model)
        return owner


def _check_local(name: str) -> None:
    if not name.startswith(LOCAL_PREFIX):
        return
    folder = Path(name[len(LOCAL_PREFIX):])
    if not folder.is_dir():
        raise UserError(f"model.name_or_path: folder {folder} not found; set it to a folder with "
                        f"{CONFIG_FILE} and the weights (e.g. made by {DOWNLOAD_HINT})")
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"model.name_or_path: {folder} has no {CONFIG_FILE}; it is not an open_clip model folder")


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The package's pre-processing from open_clip's: the whole patch resized to the input size
    (no crop), the model's mean, std and interpolation."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    return Preprocessing(
        height=int(height),
        width=int(width),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        resample=RESAMPLE.get(cfg.get("interpolation", "bicubic"), 3),
    )
