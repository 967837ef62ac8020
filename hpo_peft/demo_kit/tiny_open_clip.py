"""The kit's open_clip twin: a tiny open_clip ViT saved as QuiltNet is published
(`open_clip_config.json` with `model_cfg` and `preprocess_cfg`, `open_clip_model.safetensors`),
so `open_clip.create_model("local-dir:<kit>/open_clip_model")` and `open_clip.get_tokenizer`
load it offline through exactly the path `hf-hub:wisdomik/QuiltNet-B-32` takes (open_clip's own
BPE vocabulary ships inside the package). Random weights, seeded: figures on it say nothing
about QuiltNet; it proves the pipeline on the open_clip family.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpo_peft.demo_kit.tiny_clip import (
    MODEL_IMAGE_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

SEED = 7
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": MODEL_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 2.0,
                   "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def save_model(folder: Path) -> Path:
    """Build the tiny model from `MODEL_CFG` with seeded random weights and save it in `folder`."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = CLIP(**MODEL_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    assert open_clip.get_model_config(f"local-dir:{folder}") == MODEL_CFG
    return folder
