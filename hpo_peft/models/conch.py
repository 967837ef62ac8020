"""The CONCH family (MahmoodLab/CONCH): a CoCa model, timm ViT-B/16 trunk at 448 px, attentional
pooling to the contrastive space, its own tokenizer (context 128).

Real weights (gated, CC-BY-NC-ND) load through MahmoodLab's own package, installed from its git
repository (`pip install git+https://github.com/Mahmoodlab/CONCH.git`), with
`conch.open_clip_custom.create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=...)`.
`model.name_or_path` is then the checkpoint file (`pytorch_model.bin`), the folder holding it, or
`hf_hub:MahmoodLab/conch` (CONCH's own spelling; needs the hub and a token).

`conch_architecture()` rebuilds CONCH's image side from an exact copy of its config
(`conch_ViT-B-16.json`: timm `VisionTransformer(embed_dim=768, depth=12, num_heads=12,
mlp_ratio=4, img_size=448, patch_size=16, num_classes=0, dynamic_img_size=True)`, an attentional
pooler of 1 query, 8 heads, d_model 512 over the 768-wide tokens, `ln_contrast`, `proj_contrast`
512 x 512) with timm and open_clip classes, and a CONCH-shaped text tower (open_clip's
`TextTransformer` with a CLS embedding, context 128): random weights, for counts, benchmarks and
tests, under the same module names as CONCH's, so the same code reads both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hpo_peft.core.config import ModelConfig
from hpo_peft.data import Preprocessing
from hpo_peft.core.errors import UserError
from hpo_peft.models.base import BaseVLM, Family, FamilyEncoder, ModuleNames

CONCH_MODEL = "conch_ViT-B-16"
HUB_PREFIX = "hf_hub:"  # CONCH's own prefix (open_clip spells it hf-hub:)
CHECKPOINT = "pytorch_model.bin"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CONCH's create_model sets these
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INSTALL_HINT = "pip install git+https://github.com/Mahmoodlab/CONCH.git"


class ConchEncoder(FamilyEncoder):
    """trunk (timm ViT, all tokens) -> attentional pool (1 query) -> ln_contrast -> @ proj_contrast."""

    module_names = ModuleNames(
        block_norms=r"trunk\.blocks\.\d+\.norm[12]\.(weight|bias)$",
        outer_norms=r"(trunk\.norm|ln_contrast)\.(weight|bias)$",
        fused_qkv=r"trunk\.blocks\.\d+\.attn\.qkv\.weight$",
    )

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.trunk = visual.trunk
        self.attn_pool_contrast = visual.attn_pool_contrast
        self.ln_contrast = visual.ln_contrast
        self.proj_contrast = visual.proj_contrast  # the same Parameter (the caption pooler is left out)

    def project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(pixel_values)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast


class ConchArchitecture(nn.Module):
    """CONCH's contrastive towers with random weights, named as in CONCH's CoCa."""

    def __init__(self, image_size=448, width=768, layers=12, heads=12, patch_size=16, embed_dim=512,
                 pooler_heads=8, text_width=768, text_layers=12, text_heads=12, context_length=128, vocab_size=49408):
        super().__init__()
        from open_clip.transformer import AttentionalPooler, TextTransformer
        from timm.models.vision_transformer import VisionTransformer

        self.visual = nn.Module()
        self.visual.trunk = VisionTransformer(embed_dim=width, depth=layers, num_heads=heads, mlp_ratio=4,
                                              img_size=image_size, patch_size=patch_size, num_classes=0,
                                              dynamic_img_size=True)
        self.visual.attn_pool_contrast = AttentionalPooler(embed_dim, width, n_head=pooler_heads, n_queries=1)
        self.visual.ln_contrast = nn.LayerNorm(embed_dim)
        self.visual.proj_contrast = nn.Parameter(width ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.visual.image_size = image_size
        self.text = TextTransformer(context_length=context_length, vocab_size=vocab_size, width=text_width,
                                    heads=text_heads, layers=text_layers, output_dim=embed_dim, embed_cls=True,
                                    output_tokens=True, pad_id=0)
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        latent, _ = self.text(text[:, :-1])  # CONCH's _encode_text: the last place is the CLS token's
        return nn.functional.normalize(latent, dim=-1) if normalize else latent


class ContextTokenizer:
    """open_clip's BPE tokenizer at CONCH's context length (the architecture's twin only)."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.inner = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.inner(texts)


class ConchTokenizer:
    """CONCH's own tokenizer and padding (`conch.open_clip_custom.tokenize`)."""

    def __init__(self):
        from conch.open_clip_custom import get_tokenizer

        self.inner = get_tokenizer()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        from conch.open_clip_custom import tokenize

        return tokenize(self.inner, texts)


def conch_preprocessing(image_size: int = 448) -> Preprocessing:
    return Preprocessing(height=image_size, width=image_size, mean=OPENAI_MEAN, std=OPENAI_STD, resample=3)


def conch_architecture(**sizes) -> BaseVLM:
    """A random-weight CONCH (or a smaller one of the same shape, for tests) as a base model."""
    model = ConchArchitecture(**sizes).eval().requires_grad_(False)
    name = "conch-architecture" + "".join(f",{k}={v}" for k, v in sorted(sizes.items()))
    return BaseVLM(name, None, model, ContextTokenizer(model.text.context_length),
                     conch_preprocessing(model.visual.image_size), Conch())


def _checkpoint(source: str) -> str:
    if source.startswith(HUB_PREFIX):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"model.name_or_path: CONCH checkpoint {path} not found; download it once "
                        "(`hf download MahmoodLab/CONCH --local-dir DIR`, after accepting its terms) and set "
                        "model.name_or_path to DIR")
    return str(path)


class Conch(Family):
    encoder = ConchEncoder
    name = "conch"

    def recognises(self, source: str) -> bool | None:
        if source.lower().startswith((HUB_PREFIX + "mahmoodlab/conch")):
            return True
        folder = Path(source).expanduser()
        if folder.is_dir() and (folder / CHECKPOINT).is_file() and (folder / "meta.yaml").is_file():
            return True  # the layout of MahmoodLab/CONCH on the hub
        return None

    def load(self, config: ModelConfig) -> BaseVLM:
        checkpoint = _checkpoint(config.name_or_path)
        try:
            from conch.open_clip_custom import create_model_from_pretrained
        except ImportError:
            raise UserError(f"model.family: conch needs MahmoodLab's conch package ({INSTALL_HINT})") from None
        try:
            model = create_model_from_pretrained(CONCH_MODEL, checkpoint_path=checkpoint, return_transform=False)
        except (OSError, RuntimeError, ValueError) as err:
            raise UserError(f"model.name_or_path: CONCH {config.name_or_path!r} could not be loaded: "
                            f"{' '.join(str(err).split())}") from None
        model.eval().requires_grad_(False)
        size = model.visual.image_size[0]
        return BaseVLM(config.name_or_path, config.revision, model, ConchTokenizer(), conch_preprocessing(size), self)

    def image_encoder(self, model: nn.Module) -> ConchEncoder:
        return ConchEncoder(model.visual)

    def text_device(self, model: nn.Module) -> torch.device:
        return model.logit_scale.device

    def tokenize(self, base: BaseVLM, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": base.processor(texts).to(self.text_device(base.clip))}

    def encode_tokens(self, base: BaseVLM, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return base.clip.encode_text(tokens["input_ids"], normalize=False)

    def token_embedding_owner(self, model: nn.Module) -> nn.Module:
        """The text tower's (CoCa's `text`, which appends its CLS token after the embeddings)."""
        owner = getattr(model, "text", None)
        if not isinstance(getattr(owner, "token_embedding", None), nn.Embedding):
            return super().token_embedding_owner(model)
        return owner
