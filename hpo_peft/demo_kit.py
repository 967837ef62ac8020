"""Offline demo kit: a generated SICAPv2-layout dataset and a tiny CLIP-format model.

There is no internet where the demo runs, so the kit replaces the two downloads of a real run:

* ``<out>/sicapv2/`` mimics SICAPv2's layout exactly: ``images/<name>.jpg`` (RGB 512x512 patches
  with SICAPv2-style names) and ``partition/Test/{Train,Test}.xlsx`` with the columns
  ``image_name, NC, G3, G4, G5, G4C``. The four classes are synthetic tissue-like textures
  (eosin-pink stroma, haematoxylin-purple nuclei):

  - NC: a few large round glands, white lumen lined by a ring of nuclei;
  - G3: many small, densely packed round glands with small lumens;
  - G4: fused irregular cribriform masses (large blobs pierced by several small holes);
  - G5: sheets of isolated scattered nuclei, no lumens.

* ``<out>/model/`` is a small ``CLIPModel`` (vision tower with PLIP's module names) plus a
  ``CLIPProcessor`` (image processor + a BPE tokenizer generated here), saved with
  ``save_pretrained`` so that ``AutoModel.from_pretrained`` / ``AutoProcessor.from_pretrained``
  load it through exactly the same code path as ``vinid/plip``. It is briefly pre-trained with
  the CLIP contrastive loss on separate generated image/caption pairs, so zero-shot
  classification is above chance but far from perfect.

The build is deterministic (fixed seeds), takes a few seconds on two CPU cores, and is
atomic: everything is written to a temporary sibling folder, moved into place, and
``kit.json`` is written last.

What a build may touch in ``<out>``: only the kit's own parts, ``model/``, ``sicapv2/`` and
``kit.json`` (``KIT_PARTS``); nothing else in the folder is ever read, moved or deleted.

* ``<out>`` missing or empty: the kit is built into it.
* ``<out>`` a kit (its ``kit.json`` was written here: any ``kit_version``, or the marker an
  interrupted install leaves): a complete current kit is kept as is; otherwise (older version,
  interrupted, or ``force``) its parts are rebuilt and replaced silently, since they are ours.
* ``<out>`` a non-empty folder that is not a kit: refused with ``UserError`` (nothing is built),
  unless ``force``; then the parts present are replaced, each named on stderr
  ("demo-kit: replacing existing <out>/model (N files)"), and every other file stays.
* ``<out>`` an existing file (or below a file): refused with ``UserError`` before any work.

During the swap ``kit.json`` holds an "incomplete" marker (so the folder is still recognised as
a kit if the swap is interrupted, and never looks complete), and the swap runs under an
exclusive ``flock`` on ``<out>``, re-checking completeness first, so that concurrent builds end
with one complete kit. Replaced parts are moved into the temporary folder and deleted with it.

This module imports nothing else from ``hpo_peft`` but the trivial ``hpo_peft.errors``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from hpo_peft.errors import UserError

__all__ = ["DEFAULT_DIR", "KIT_VERSION", "build_demo_kit"]

DEFAULT_DIR = Path("local_data/demo")
KIT_VERSION = 1  # bump when the kit's content changes
KIT_PARTS = ("model", "sicapv2", "kit.json")  # all that a build ever writes or replaces in <out>

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

CLASSES = ("NC", "G3", "G4", "G5")
COLUMNS = ("image_name", "NC", "G3", "G4", "G5", "G4C")
PATCH_SIZE = 512
MODEL_IMAGE_SIZE = 64

N_TRAIN_PER_CLASS = 48
N_TEST_PER_CLASS = 24
N_TRAIN_MULTI = 5  # rows with two labels set
N_TRAIN_EMPTY = 5  # rows with no label set
G4C_FRACTION = 1 / 3  # share of G4 rows flagged as cribriform

TEMPLATES = (
    "a histopathology slide showing [CLS]",
    "histopathology image of [CLS]",
    "pathology tissue showing [CLS]",
    "presence of [CLS] tissue on image",
)
DESCRIPTIONS = {
    "NC": "benign glands",
    "G3": "atrophic dense glands",
    "G4": "cribriform ill-formed fused papillary patterns",
    "G5": "isolated nest cells without lumen roseting patterns",
}
_EXTRA_WORDS = (
    "nc g3 g4 g5 gleason grade grades pattern patterns tissue tissues non cancerous cancer "
    "benign malignant normal healthy prostate prostatic adenocarcinoma carcinoma tumor tumour "
    "gland glands glandular stroma stromal nuclei nucleus cell cells lumen lumens "
    "a an the of on in with without and or showing image images slide slides histology "
    "histopathology pathology photo patch high low well poorly moderately differentiated "
    "atrophic dense cribriform ill formed fused papillary isolated nest nests roseting presence "
    "class category type"
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_SEED = 20_240_601
# split ids used to derive independent per-image random streams
_SPLIT_IDS = {"train": 1, "test": 2, "pretrain": 3, "names": 4, "tables": 5}

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
_TORCH_THREADS = 2


# --------------------------------------------------------------------------------------
# Synthetic tissue
# --------------------------------------------------------------------------------------


def _rng(split: str, index: int, extra: int = 0) -> np.random.Generator:
    return np.random.default_rng([_SEED, _SPLIT_IDS[split], index, extra])


def _clip_colour(c) -> tuple[int, int, int]:
    c = np.clip(np.rint(c), 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


class _Painter:
    """Draws one tissue-like patch of side ``size``; geometry is expressed for 512 px."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng = rng
        self.size = size
        self.s = size / PATCH_SIZE
        u = rng.uniform
        # per-image stain jitter
        self.eosin = np.array([230.0, 158.0, 198.0]) + rng.normal(0, 1, 3) * [7, 14, 10]
        self.hema = np.array([78.0, 44.0, 128.0]) + rng.normal(0, 1, 3) * [14, 10, 16]
        mix = u(0.12, 0.30)
        self.cyto = self.eosin * (1 - mix) + self.hema * mix + rng.normal(0, 4, 3)
        self.lumen = np.array([246.0, 240.0, 246.0]) + rng.normal(0, 3, 3)
        self.img = self._background()
        self.draw = ImageDraw.Draw(self.img)

    # -- primitives -------------------------------------------------------------------
    def _background(self) -> Image.Image:
        rng = self.rng
        low = rng.normal(0, 1, (6, 6, 1)) * 9 + rng.normal(0, 1, (6, 6, 3)) * 4
        arr = np.clip(self.eosin + low, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB").resize((self.size, self.size), Image.BILINEAR)
        return img

    def ellipse(self, cx, cy, rx, ry, fill) -> None:
        self.draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_clip_colour(fill))

    def nucleus(self, cx, cy, r=None) -> None:
        rng, s = self.rng, self.s
        r = (r if r is not None else rng.uniform(3.5, 6.0)) * s
        r = max(r, 0.6)
        asp = rng.uniform(0.7, 1.3)
        self.ellipse(cx, cy, r * asp, r / asp, self.hema + rng.normal(0, 9))

    def fibres(self, n: int) -> None:
        rng, s = self.rng, self.s
        for _ in range(n):
            x0, y0 = rng.uniform(0, self.size, 2)
            ang = rng.uniform(0, math.pi)
            length = rng.uniform(80, 260) * s
            x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
            shade = self.eosin + rng.normal(0, 1) * 14 + [-6, -14, -6]
            self.draw.line([x0, y0, x1, y1], fill=_clip_colour(shade),
                           width=max(1, int(round(rng.uniform(1.5, 4.5) * s))))

    def stray_nuclei(self, n: int) -> None:
        rng = self.rng
        for _ in range(n):
            self.nucleus(*rng.uniform(0, self.size, 2), r=rng.uniform(2.5, 4.5))

    def _place(self, radii, min_gap: float, tries: int) -> list[tuple[float, float, float]]:
        """Rejection-sample non-overlapping centres for the given radii (may spill off-image)."""
        rng, placed = self.rng, []
        margin = 0.25 * self.size
        for r in radii:
            for _ in range(tries):
                x, y = rng.uniform(-margin * 0.3, self.size + margin * 0.3, 2)
                if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + min_gap) ** 2 for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
        return placed

    def gland(self, cx, cy, r, lumen_frac, nuc_gap) -> None:
        rng, s = self.rng, self.s
        asp = rng.uniform(0.8, 1.25)
        rx, ry = r * asp, r / asp
        self.ellipse(cx, cy, rx, ry, self.cyto + rng.normal(0, 4, 3))
        self.ellipse(cx, cy, rx * lumen_frac, ry * lumen_frac, self.lumen + rng.normal(0, 2, 3))
        ring = (1 + lumen_frac) / 2 + 0.12 * (1 - lumen_frac)
        n = max(5, int(2 * math.pi * r / (nuc_gap * s)))
        phase = rng.uniform(0, 2 * math.pi)
        for k in range(n):
            t = phase + 2 * math.pi * k / n + rng.normal(0, 0.08)
            rr = ring + rng.normal(0, 0.03)
            self.nucleus(cx + rx * rr * math.cos(t), cy + ry * rr * math.sin(t))

    # -- classes ----------------------------------------------------------------------
    def paint_nc(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(8, 18)))
        self.stray_nuclei(int(rng.integers(10, 30)))
        radii = rng.uniform(55, 100, int(rng.integers(2, 5))) * s
        for x, y, r in self._place(radii, 12 * s, 40):
            self.gland(x, y, r, rng.uniform(0.6, 0.78), rng.uniform(10, 13))

    def paint_g3(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(4, 10)))
        self.stray_nuclei(int(rng.integers(5, 20)))
        radii = rng.uniform(16, 30, int(rng.integers(50, 90))) * s
        for x, y, r in self._place(radii, rng.uniform(1, 6) * s, 25):
            self.gland(x, y, r, rng.uniform(0.28, 0.5), rng.uniform(8, 10))

    def paint_g4(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(4, 10)))
        self.stray_nuclei(int(rng.integers(5, 20)))
        for _ in range(int(rng.integers(2, 4))):
            bx, by = rng.uniform(0.1, 0.9, 2) * self.size
            base = rng.uniform(70, 125) * s
            comps = []
            for _ in range(int(rng.integers(4, 9))):
                ox, oy = rng.normal(0, 0.45, 2) * base
                rx, ry = rng.uniform(0.35, 0.7, 2) * base
                comps.append((bx + ox, by + oy, rx, ry))
                self.ellipse(bx + ox, by + oy, rx, ry, self.cyto + rng.normal(0, 3, 3))
            # dense nuclei throughout the fused mass
            for _ in range(int(rng.integers(90, 180))):
                cx, cy, rx, ry = comps[int(rng.integers(len(comps)))]
                t, rr = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.85))
                self.nucleus(cx + rx * rr * math.cos(t), cy + ry * rr * math.sin(t))
            # several small punched-out holes (cribriform lumens)
            for _ in range(int(rng.integers(4, 11))):
                cx, cy, rx, ry = comps[int(rng.integers(len(comps)))]
                t, rr = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.5))
                h = rng.uniform(6, 15) * s
                self.ellipse(cx + rx * rr * math.cos(t), cy + ry * rr * math.sin(t),
                             h * rng.uniform(0.8, 1.2), h, self.lumen)

    def paint_g5(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(3, 8)))
        centres = rng.uniform(0.15, 0.85, (int(rng.integers(1, 4)), 2)) * self.size
        for cx, cy in centres:  # faint cellular sheets
            r = rng.uniform(90, 170) * s
            self.ellipse(cx, cy, r * rng.uniform(0.8, 1.2), r, self.eosin * 0.6 + self.cyto * 0.4)
        n = int(rng.integers(220, 480))
        for _ in range(n):
            if rng.uniform() < 0.7:
                cx, cy = centres[int(rng.integers(len(centres)))]
                x, y = rng.normal([cx, cy], rng.uniform(60, 140) * s)
            else:
                x, y = rng.uniform(0, self.size, 2)
            self.nucleus(x, y, r=rng.uniform(3.5, 7.0))

    def paint_stroma(self) -> None:  # no label: stroma only
        rng = self.rng
        self.fibres(int(rng.integers(25, 45)))
        self.stray_nuclei(int(rng.integers(20, 50)))

    def finish(self) -> np.ndarray:
        rng, s = self.rng, self.s
        img = self.img.filter(ImageFilter.GaussianBlur(max(0.3, rng.uniform(0.8, 1.8) * s)))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, rng.uniform(3, 7), arr.shape).astype(np.float32)
        return np.clip(arr, 0, 255).astype(np.uint8)


def _draw_patch(rng: np.random.Generator, cls: str | None, size: int = PATCH_SIZE) -> np.ndarray:
    """One synthetic tissue patch (H, W, 3 uint8) of class ``cls`` (None: stroma, no label)."""
    p = _Painter(rng, size)
    {"NC": p.paint_nc, "G3": p.paint_g3, "G4": p.paint_g4, "G5": p.paint_g5, None: p.paint_stroma}[cls]()
    return p.finish()


def _draw_mixed(rng: np.random.Generator, a: str, b: str, size: int = PATCH_SIZE) -> np.ndarray:
    """A patch whose left part shows class ``a`` and right part class ``b`` (two labels)."""
    left, right = _draw_patch(rng, a, size), _draw_patch(rng, b, size)
    split = int(rng.uniform(0.35, 0.65) * size)
    out = right.copy()
    out[:, :split] = left[:, :split]
    return out


# --------------------------------------------------------------------------------------
# Dataset: names, images and partition tables
# --------------------------------------------------------------------------------------


def _sicap_names(count: int, slides: list[str], rng: np.random.Generator, taken: set[str]) -> list[str]:
    """Unique SICAPv2-style patch names such as
    ``16B0001851_Block_Region_1_0_0_xini_6827_yini_59786.jpg``."""
    names: list[str] = []
    while len(names) < count:
        slide = slides[int(rng.integers(len(slides)))]
        region = int(rng.integers(1, 13))
        i, j = int(rng.integers(0, 12)), int(rng.integers(0, 12))
        x, y = int(rng.integers(2_000, 60_000)), int(rng.integers(10_000, 90_000))
        name = f"{slide}_Block_Region_{region}_{i}_{j}_xini_{x}_yini_{y}.jpg"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _slide_ids(rng: np.random.Generator, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        sid = f"{int(rng.integers(16, 19))}B{int(rng.integers(1, 9_999_999)):07d}"
        if sid not in out:
            out.append(sid)
    return out


def _plan_split(split: str) -> list[dict]:
    """Rows (with the labels to draw) of one partition table, shuffled deterministically."""
    rng = _rng("tables", _SPLIT_IDS[split])
    per_class = N_TRAIN_PER_CLASS if split == "train" else N_TEST_PER_CLASS
    rows: list[dict] = []
    for cls in CLASSES:
        for _ in range(per_class):
            rows.append({"labels": (cls,)})
    if split == "train":
        pairs = [("NC", "G3"), ("G3", "G4"), ("G4", "G5"), ("G3", "G5"), ("NC", "G4")]
        for k in range(N_TRAIN_MULTI):
            rows.append({"labels": pairs[k % len(pairs)]})
        for _ in range(N_TRAIN_EMPTY):
            rows.append({"labels": ()})
    order = rng.permutation(len(rows))
    rows = [rows[int(k)] for k in order]
    g4_rows = [r for r in rows if "G4" in r["labels"]]
    n_crib = int(round(len(g4_rows) * G4C_FRACTION))
    for k in sorted(rng.choice(len(g4_rows), size=n_crib, replace=False)):
        g4_rows[int(k)]["g4c"] = 1
    return rows


def _deterministic_xlsx(path: Path, rows: list[list]) -> None:
    """Write an .xlsx with fixed document timestamps and zip entry dates (same bytes every build)."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(COLUMNS))
    for r in rows:
        ws.append(r)
    fixed = datetime(2020, 1, 1)
    wb.properties.creator = "hpo_peft.demo_kit"
    wb.properties.created = fixed
    wb.properties.modified = fixed
    buf = io.BytesIO()
    wb.save(buf)
    # openpyxl stamps the zip entries (and possibly docProps) with "now": normalise them
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = _fix_core_dates(data)
            zi = zipfile.ZipInfo(info.filename, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o600 << 16
            dst.writestr(zi, data)
    path.write_bytes(out.getvalue())


def _fix_core_dates(data: bytes) -> bytes:
    return re.sub(
        rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:\2>)",
        rb"\g<1>2020-01-01T00:00:00Z\g<3>",
        data,
    )


def _write_dataset(root: Path, bar) -> dict:
    images = root / "images"
    part = root / "partition" / "Test"
    images.mkdir(parents=True)
    part.mkdir(parents=True)
    name_rng = _rng("names", 0)
    slides = _slide_ids(name_rng, 30)
    slides_by_split = {"train": slides[:20], "test": slides[20:]}  # patient-level split
    taken: set[str] = set()
    counts = {}
    for split, table in (("train", "Train.xlsx"), ("test", "Test.xlsx")):
        plan = _plan_split(split)
        names = _sicap_names(len(plan), slides_by_split[split], name_rng, taken)
        rows = []
        for idx, (row, name) in enumerate(zip(plan, names)):
            rng = _rng(split, idx)
            labels = row["labels"]
            if len(labels) == 2:
                arr = _draw_mixed(rng, *labels)
            else:
                arr = _draw_patch(rng, labels[0] if labels else None)
            Image.fromarray(arr, "RGB").save(images / name, format="JPEG", quality=90)
            rows.append([name] + [int(c in labels) for c in CLASSES] + [int(row.get("g4c", 0))])
            bar.update(1)
        _deterministic_xlsx(part / table, rows)
        counts[split] = len(rows)
    return counts


# --------------------------------------------------------------------------------------
# Tokenizer (byte-level BPE in CLIP's format, generated here)
# --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one (lower-case ASCII) word; the last symbol carries ``</w>``."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _prompt_words() -> list[str]:
    text = " ".join(list(TEMPLATES) + list(DESCRIPTIONS.values()) + list(CLASSES) + [_EXTRA_WORDS])
    text = text.replace("[CLS]", " ").lower()
    return sorted(set(re.findall(r"[a-z]+", text)))


def _tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab + merges: every byte (alone and with ``</w>``), then merges that turn each prompt
    word into one token (merged left to right), then the two special tokens."""
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    words = _prompt_words()
    for w in words:
        while len(parts := _bpe(w, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    assert all(len(_bpe(w, ranks)) == 1 for w in words)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_tokenizer_files(folder: Path) -> None:
    vocab, merges = _tokenizer_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Model: tiny CLIP, processor, brief contrastive pre-training
# --------------------------------------------------------------------------------------


def _pixel_values(arrs: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """What the consumer feeds the model: the whole patch resized to 64x64 (bicubic, no crop),
    rescaled to [0, 1] and normalised with OpenAI CLIP's mean/std. Returns (N, 3, 64, 64)."""
    out = np.empty((len(arrs), MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3), dtype=np.float32)
    for k, a in enumerate(arrs):
        img = a if isinstance(a, Image.Image) else Image.fromarray(a, "RGB")
        img = img.convert("RGB").resize((MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE), Image.BICUBIC)
        out[k] = np.asarray(img, dtype=np.float32) / 255.0
    out = (out - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _make_processor(tok_folder: Path):
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


def _make_model(tokenizer):
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


def _embed_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    feats = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    return F.normalize(feats, dim=-1)


def _class_prototypes(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    c, t, length = ids.shape
    out = model.text_model(input_ids=ids.reshape(c * t, length), attention_mask=mask.reshape(c * t, length))
    feats = F.normalize(model.text_projection(out.pooler_output), dim=-1).view(c, t, -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    recalls = [float(np.mean(y_pred[y_true == k] == k)) for k in np.unique(y_true)]
    return float(np.mean(recalls))


@torch.no_grad()
def _zero_shot_bacc(model, tokenizer, pixel_values: torch.Tensor, labels: np.ndarray) -> float:
    was_training = model.training
    model.eval()
    protos = _class_prototypes(model, *_caption_tokens(tokenizer))
    pred = (_embed_images(model, pixel_values) @ protos.T).argmax(dim=1).numpy()
    model.train(was_training)
    return _balanced_accuracy(labels, pred)


def _pretrain_images(bar) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-training images (drawn apart from the dataset's), classes cycling NC, G3, G4, G5."""
    n = (PRETRAIN_PER_CLASS + PRETRAIN_VAL_PER_CLASS) * len(CLASSES)
    arrs, labels = [], []
    for k in range(n):
        cls = k % len(CLASSES)
        arrs.append(_draw_patch(_rng("pretrain", k), CLASSES[cls], PRETRAIN_DRAW_SIZE))
        labels.append(cls)
        bar.update(1)
    return _pixel_values(arrs), torch.tensor(labels)


def _pretrain(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor, bar) -> dict:
    """CLIP contrastive loss (both towers) on (image, caption) pairs; a fraction of captions
    comes from a random class. Stops at PRETRAIN_TARGET_BACC on the held-out images."""
    n_train = PRETRAIN_PER_CLASS * len(CLASSES)
    val_pixels, val_labels = pixels[n_train:], labels[n_train:].numpy()
    pixels, labels = pixels[:n_train], labels[:n_train]
    ids, mask = _caption_tokens(tokenizer)
    gen = torch.Generator().manual_seed(_SEED)
    model.logit_scale.requires_grad_(False)  # keep exp(logit_scale) at CLIP's default (~14.3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=PRETRAIN_LR, weight_decay=0.05)
    warmup = 20
    nc, nt, b = len(CLASSES), len(TEMPLATES), PRETRAIN_BATCH
    model.train()
    val_bacc, step = _zero_shot_bacc(model, tokenizer, val_pixels, val_labels), 0
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
            val_bacc = _zero_shot_bacc(model, tokenizer, val_pixels, val_labels)
            bar.set_postfix(loss=f"{out.loss.item():.3f}", zero_shot=f"{val_bacc:.2f}", refresh=False)
            if step >= PRETRAIN_MIN_STEPS and val_bacc >= PRETRAIN_TARGET_BACC:
                break
    bar.total = step  # stopped early: let the bar end at 100 %
    bar.refresh()
    model.eval()
    return {"steps": step, "heldout_zero_shot_balanced_accuracy": round(val_bacc, 4)}


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def _save_quietly(model, processor, folder: Path, progress: bool) -> None:
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


def _read_kit_json(out: Path) -> dict | None:
    try:
        return json.loads((out / "kit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(out: Path) -> bool:
    meta = _read_kit_json(out)
    return (
        isinstance(meta, dict)
        and meta.get("kit_version") == KIT_VERSION
        and (out / "sicapv2").is_dir()
        and (out / "model").is_dir()
    )


def _test_pixels_and_labels(sicap: Path) -> tuple[torch.Tensor, np.ndarray]:
    import pandas as pd

    df = pd.read_excel(sicap / "partition" / "Test" / "Test.xlsx")
    imgs = []
    for name in df["image_name"]:
        with Image.open(sicap / "images" / name) as img:
            imgs.append(img.convert("RGB"))
    labels = df[list(CLASSES)].to_numpy().argmax(axis=1)
    return _pixel_values(imgs), labels


def _kit_message(out: Path) -> str:
    return (f"demo kit folder {out} is not empty and holds no demo kit (no valid kit.json); choose a "
            f"new or empty folder, or run 'hpo-peft demo-kit --out {out} --force' to replace only "
            "its model/, sicapv2/ and kit.json (other files are kept)")


def _is_kit(out: Path) -> bool:
    """``out/kit.json`` was written by this module (any kit version, or the marker of an
    unfinished install): the kit's parts in ``out`` are ours to replace."""
    meta = _read_kit_json(out)
    return isinstance(meta, dict) and "kit_version" in meta


def _check_target(out: Path, force: bool) -> None:
    """Refuse (UserError) a target that cannot or must not be built into; runs before any work."""
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"demo kit folder {out} is an existing file; choose a new or empty folder")
    for parent in Path(os.path.abspath(out)).parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UserError(f"demo kit folder {out}: {parent} is a file, not a folder; choose another path")
            break
    if out.is_dir() and not force and not _is_kit(out) and any(out.iterdir()):
        raise UserError(_kit_message(out))


def _describe(path: Path) -> str:
    if path.is_symlink():
        return "a symlink"
    if path.is_dir():
        n = sum(len(files) for _, _, files in os.walk(path))
        return f"{n} file{'' if n == 1 else 's'}"
    return "a file"


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive lock on ``folder`` itself (no lock file left behind) while its parts are
    swapped, so that two concurrent builds never interleave their swaps."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the re-check under the "lock" still narrows the race
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_json(tmp: Path, dest: Path, data: dict) -> None:
    staged = tmp / "kit.json"
    staged.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, dest)  # atomic: kit.json is never seen half written


def _install(tmp: Path, out: Path, meta: dict, force: bool) -> None:
    """Move the built parts from ``tmp`` into ``out``. Only ``model``, ``sicapv2`` and
    ``kit.json`` are ever replaced; replaced parts are moved into ``tmp`` (deleted with it)."""
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if not force and _is_complete(out):  # a concurrent build finished first: keep it
            return
        ours = _is_kit(out)
        if not ours and not force and any(out.iterdir()):  # something appeared while building
            raise UserError(_kit_message(out))
        if not ours:  # say what will be replaced in a folder that is not a kit
            for name in KIT_PARTS:
                if os.path.lexists(out / name):
                    print(f"demo-kit: replacing existing {out / name} ({_describe(out / name)})",
                          file=sys.stderr)
            if os.path.lexists(out / "kit.json"):  # whatever it is (even a folder): set it aside
                os.replace(out / "kit.json", tmp / "replaced-kit.json")
        # from here on out/kit.json marks the folder as an (incomplete) kit, so an interrupted
        # install can be resumed without --force, and a concurrent build still recognises it
        _write_json(tmp, out / "kit.json", {"kit_version": None, "state": "incomplete: being built"})
        for part in ("sicapv2", "model"):
            if os.path.lexists(out / part):
                os.replace(out / part, tmp / f"replaced-{part}")
            os.replace(tmp / part, out / part)
        _write_json(tmp, out / "kit.json", meta)


def build_demo_kit(out: Path | str = DEFAULT_DIR, *, force: bool = False, progress: bool = True) -> Path:
    """Build the offline demo kit into ``out`` (``out/sicapv2``, ``out/model``, ``out/kit.json``).

    Idempotent: returns at once when ``out/kit.json`` records the current ``KIT_VERSION``
    (``force=True`` rebuilds). The build happens in a temporary sibling folder whose parts are
    moved into place at the end, ``kit.json`` last, so an interrupted build never looks complete.
    Raises UserError (before any work) when ``out`` is a file, or a non-empty folder that is not
    a kit and ``force`` is not set; see the module docstring.
    """
    out = Path(out)
    if not force and _is_complete(out):
        return out
    _check_target(out, force)
    parent = Path(os.path.abspath(out)).parent  # abspath: "--out ." builds beside, not inside
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{Path(os.path.abspath(out)).name}.tmp-", dir=parent))
    prev_threads = torch.get_num_threads()
    n_images = sum(len(_plan_split(s)) for s in ("train", "test"))
    n_pre = (PRETRAIN_PER_CLASS + PRETRAIN_VAL_PER_CLASS) * len(CLASSES)
    try:
        torch.set_num_threads(_TORCH_THREADS)  # fixed thread count: reproducible float sums
        with tqdm(total=n_images + n_pre, desc="demo kit: images", unit="img", disable=not progress) as bar:
            counts = _write_dataset(tmp / "sicapv2", bar)
            pre_pixels, pre_labels = _pretrain_images(bar)

        model_dir = tmp / "model"
        _write_tokenizer_files(model_dir)
        processor = _make_processor(model_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model = _make_model(processor.tokenizer)
            with tqdm(total=PRETRAIN_MAX_STEPS, desc="demo kit: pre-training", unit="step",
                      disable=not progress) as bar:
                pretrain_info = _pretrain(model, processor.tokenizer, pre_pixels, pre_labels, bar)
        test_pixels, test_labels = _test_pixels_and_labels(tmp / "sicapv2")
        bacc = _zero_shot_bacc(model, processor.tokenizer, test_pixels, test_labels)
        _save_quietly(model, processor, model_dir, progress)

        meta = {
            "kit_version": KIT_VERSION,
            "classes": list(CLASSES),
            "dataset": "sicapv2",
            "model": "model",
            "rows": counts,
            "templates": list(TEMPLATES),
            "descriptions": DESCRIPTIONS,
            "model_image_size": MODEL_IMAGE_SIZE,
            "pretraining": pretrain_info,
            "zero_shot_balanced_accuracy_test": round(bacc, 4),
        }
        _install(tmp, out, meta, force)
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return out
