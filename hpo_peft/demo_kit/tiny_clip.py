"""The kit's model: a tiny ``CLIPModel`` and ``CLIPProcessor``, briefly pre-trained here.

The vision tower keeps PLIP's module names and the files are written with ``save_pretrained``,
so ``AutoModel`` / ``AutoProcessor.from_pretrained`` load the kit through the same code path as
``vinid/plip``. Pre-training uses CLIP's contrastive loss on generated image/caption pairs
(images drawn apart from the dataset's, captions from the course prompts of
``hpo_peft.core.config``, a fraction from a random class) and stops as soon as zero-shot
classification of held-out pre-training images is above chance; the same zero-shot check,
with the prompt-ensemble prototypes it needs, then scores the Test table for ``kit.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from hpo_peft.core.config import COURSE_DESCRIPTIONS, COURSE_TEMPLATES
from hpo_peft.demo_kit import tissue
from hpo_peft.demo_kit.tissue import CLASSES, SEED

MODEL_IMAGE_SIZE = 64
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# the course prompts, one description per class: the captions of pre-training
TEMPLATES = tuple(COURSE_TEMPLATES)
DESCRIPTIONS = {c: COURSE_DESCRIPTIONS[c][0] for c in CLASSES}

# Pre-training recipe. The zero-shot accuracy reached after a fixed number of steps varies a lot
# with tiny numeric differences (the loss sits on a plateau, then drops), so training stops as
# soon as the zero-shot balanced accuracy on a held-out set of *pre-training* images (never the
# Test table) reaches PRETRAIN_TARGET_BACC, checked every PRETRAIN_CHECK_EVERY steps.
PRETRAIN_PER_CLASS = 48  # training pairs per class
PRETRAIN_VAL_PER_CLASS = 16  # held-out pre-training images per class (for the stop rule)
PRETRAIN_DRAW_SIZE = 256  # pre-training images are drawn at 256 px (same geometry) then resized
PRETRAIN_MAX_STEPS = 600
PRETRAIN_MIN_STEPS = 60
PRETRAIN_CHECK_EVERY = 20
PRETRAIN_TARGET_BACC = 0.55
PRETRAIN_BATCH = 32
PRETRAIN_LR = 1e-3
PRETRAIN_CAPTION_NOISE = 0.5  # fraction of captions taken from a random class


def pixel_values(arrs: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """What the consumer feeds the model: the whole patch resized to 64x64 (bicubic, no crop),
    rescaled to [0, 1] and normalised with OpenAI CLIP's mean/std. Returns (N, 3, 64, 64)."""
    out = np.empty((len(arrs), MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3), dtype=np.float32)
    for k, a in enumerate(arrs):
        img = a if isinstance(a, Image.Image) else Image.fromarray(a, "RGB")
        img = img.convert("RGB").resize((MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE), Image.BICUBIC)
        out[k] = np.asarray(img, dtype=np.float32) / 255.0
    out = (out - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def make_processor(tok_folder: Path):
    """The processor saved with the model: CLIP's image processor at 64 px and the tokenizer
    whose files are in ``tok_folder``."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tok_folder), model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": MODEL_IMAGE_SIZE},
        crop_size={"height": MODEL_IMAGE_SIZE, "width": MODEL_IMAGE_SIZE},
        do_center_crop=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_model(tokenizer):
    """A new tiny CLIP (two-layer towers of width 64) sized for ``tokenizer``'s vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=MODEL_IMAGE_SIZE,
            patch_size=16,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_channels=3,
        ),
        projection_dim=32,
    )
    return CLIPModel(config)


def _caption_tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids / attention masks of every template x class description: (C, T, L)."""
    texts = [t.replace("[CLS]", DESCRIPTIONS[c]) for c in CLASSES for t in TEMPLATES]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    shape = (len(CLASSES), len(TEMPLATES), -1)
    return enc["input_ids"].view(shape), enc["attention_mask"].view(shape)


def _embed_images(model, pixels: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings."""
    feats = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return F.normalize(feats, dim=-1)


def _class_prototypes(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One unit-norm text prototype per class: the mean of its templates' unit-norm embeddings."""
    c, t, length = ids.shape
    out = model.text_model(input_ids=ids.reshape(c * t, length), attention_mask=mask.reshape(c * t, length))
    feats = F.normalize(model.text_projection(out.pooler_output), dim=-1).view(c, t, -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    recalls = [float(np.mean(y_pred[y_true == k] == k)) for k in np.unique(y_true)]
    return float(np.mean(recalls))


@torch.no_grad()
def zero_shot_bacc(model, tokenizer, pixels: torch.Tensor, labels: np.ndarray) -> float:
    """Balanced accuracy of zero-shot classification (nearest class prototype) of ``pixels``."""
    was_training = model.training
    model.eval()
    protos = _class_prototypes(model, *_caption_tokens(tokenizer))
    pred = (_embed_images(model, pixels) @ protos.T).argmax(dim=1).numpy()
    model.train(was_training)
    return _balanced_accuracy(labels, pred)


def count_pretrain_images() -> int:
    """How many images ``pretrain_images`` draws: training pairs and held-out images."""
    return (PRETRAIN_PER_CLASS + PRETRAIN_VAL_PER_CLASS) * len(CLASSES)


def pretrain_images(bar) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-training images (drawn apart from the dataset's), classes cycling NC, G3, G4, G5."""
    n = count_pretrain_images()
    arrs, labels = [], []
    for k in range(n):
        cls = k % len(CLASSES)
        arrs.append(tissue.draw_patch(tissue.rng("pretrain", k), CLASSES[cls], PRETRAIN_DRAW_SIZE))
        labels.append(cls)
        bar.update(1)
    return pixel_values(arrs), torch.tensor(labels)


def _pretrain(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor, bar) -> dict:
    """CLIP contrastive loss (both towers) on (image, caption) pairs; a fraction of captions
    comes from a random class. Stops at PRETRAIN_TARGET_BACC on the held-out images."""
    n_train = PRETRAIN_PER_CLASS * len(CLASSES)
    val_pixels, val_labels = pixels[n_train:], labels[n_train:].numpy()
    pixels, labels = pixels[:n_train], labels[:n_train]
    ids, mask = _caption_tokens(tokenizer)
    gen = torch.Generator().manual_seed(SEED)
    model.logit_scale.requires_grad_(False)  # keep exp(logit_scale) at CLIP's default (~14.3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=PRETRAIN_LR, weight_decay=0.05)
    warmup = 20
    nc, nt, b = len(CLASSES), len(TEMPLATES), PRETRAIN_BATCH
    model.train()
    val_bacc, step = zero_shot_bacc(model, tokenizer, val_pixels, val_labels), 0
    while step < PRETRAIN_MAX_STEPS:
        lr_factor = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / PRETRAIN_MAX_STEPS))
        for group in opt.param_groups:
            group["lr"] = PRETRAIN_LR * lr_factor
        idx = torch.randint(n_train, (b,), generator=gen)
        x = pixels[idx]
        flip_h = torch.rand(b, 1, 1, 1, generator=gen) < 0.5
        flip_v = torch.rand(b, 1, 1, 1, generator=gen) < 0.5
        x = torch.where(flip_h, x.flip(3), x)
        x = torch.where(flip_v, x.flip(2), x)
        cls = labels[idx].clone()
        noisy = torch.rand(b, generator=gen) < PRETRAIN_CAPTION_NOISE
        cls[noisy] = torch.randint(nc, (int(noisy.sum()),), generator=gen)
        tmpl = torch.randint(nt, (b,), generator=gen)
        out = model(input_ids=ids[cls, tmpl], attention_mask=mask[cls, tmpl], pixel_values=x, return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % PRETRAIN_CHECK_EVERY == 0:
            val_bacc = zero_shot_bacc(model, tokenizer, val_pixels, val_labels)
            bar.set_postfix(loss=f"{out.loss.item():.3f}", zero_shot=f"{val_bacc:.2f}", refresh=False)
            if step >= PRETRAIN_MIN_STEPS and val_bacc >= PRETRAIN_TARGET_BACC:
                break
    bar.total = step  # stopped early: let the bar end at 100 %
    bar.refresh()
    model.eval()
    return {"steps": step, "heldout_zero_shot_balanced_accuracy": round(val_bacc, 4)}


def pretrain_model(tokenizer, pixels: torch.Tensor, labels: torch.Tensor, progress: bool) -> tuple:
    """A new tiny CLIP (seeded, without touching the global torch RNG) pre-trained on
    ``pixels``/``labels`` (from ``pretrain_images``); returns it (in eval mode) and a summary."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = make_model(tokenizer)
        with tqdm(total=PRETRAIN_MAX_STEPS, desc="demo kit: pre-training", unit="step",
                  disable=not progress) as bar:
            info = _pretrain(model, tokenizer, pixels, labels, bar)
    return model, info


def save_quietly(model, processor, folder: Path, progress: bool) -> None:
    """save_pretrained (safetensors) for model and processor; transformers' own progress bar
    ("Writing model shards") is silenced unless ``progress``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)  # safetensors is the only format in transformers 5
        processor.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
