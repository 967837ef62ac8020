"""What the benchmarks measure on, not a measurement: the PLIP-architecture model folder (random
weights, saved like `vinid/plip`) and the StudyConfig of one trial on the demo kit's images."""

from __future__ import annotations

from pathlib import Path

import torch


def build_model_folder(kit: Path, folder: Path, full_arch: bool) -> dict:
    """A random-weight CLIPModel saved with save_pretrained together with a processor (the
    CLIPImageProcessor defaults: 224 input; the demo kit's tokenizer), loadable like vinid/plip."""
    from transformers import (
        AutoProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
    )

    tokenizer = AutoProcessor.from_pretrained(kit / "model").tokenizer
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if full_arch:  # PLIP's architecture: CLIP ViT-B/32 defaults (token ids only matter for pooling)
        config = CLIPConfig(text_config=token_ids)
    else:
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPConfig(
            text_config=dict(small, vocab_size=len(tokenizer), **token_ids),
            vision_config=dict(small, image_size=224, patch_size=32),
            projection_dim=32,
        )
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    vision = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    info = {"folder": str(folder), "vision_parameters": vision, "all_parameters": sum(p.numel() for p in model.parameters()),
            "architecture": "CLIPConfig() (CLIP ViT-B/32, as PLIP)" if full_arch else "tiny CLIP (quick mode)"}
    del model
    return info


def trial_config(kit: str, model_dir: str, shots: int, val_shots: int, epochs: int, precision: str, device: str, **extra):
    from hpo_peft.core.config import StudyConfig

    return StudyConfig.model_validate({
        "name": "benchmark",
        "data": {"root": str(Path(kit) / "sicapv2"), "shots": shots, "val_shots": val_shots},
        "model": {"name_or_path": model_dir},
        "train": {"max_epochs": epochs, "patience": None, "precision": precision, "device": device},
        **extra,
    })
