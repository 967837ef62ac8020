"""The kit's tokenizer: a byte-level BPE vocabulary and merges in CLIP's format, generated here.

Every byte has a token (alone and word-final with ``</w>``), so any text can be encoded without
``<unk>``; merges then turn each word of the course prompts (``hpo_peft.core.config``'s
COURSE_TEMPLATES and COURSE_DESCRIPTIONS) and of a small histology vocabulary into one token.
``write_tokenizer_files`` writes ``vocab.json`` and ``merges.txt``, which ``CLIPTokenizer``
loads like any CLIP checkpoint's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from hpo_peft.core.config import COURSE_DESCRIPTIONS, COURSE_TEMPLATES

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_EXTRA_WORDS = (
    "nc g3 g4 g5 gleason grade grades pattern patterns tissue tissues non cancerous cancer "
    "benign malignant normal healthy prostate prostatic adenocarcinoma carcinoma tumor tumour "
    "gland glands glandular stroma stromal nuclei nucleus cell cells lumen lumens "
    "a an the of on in with without and or showing image images slide slides histology "
    "histopathology pathology photo patch high low well poorly moderately differentiated "
    "atrophic dense cribriform ill formed fused papillary isolated nest nests roseting presence "
    "class category type"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's table from each byte to a printable character (the BPE's base symbols)."""
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
    """The words to keep whole: the course prompts', the class names and ``_EXTRA_WORDS``."""
    descriptions = [d for ds in COURSE_DESCRIPTIONS.values() for d in ds]
    text = " ".join(list(COURSE_TEMPLATES) + descriptions + list(COURSE_DESCRIPTIONS) + [_EXTRA_WORDS])
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


def write_tokenizer_files(folder: Path) -> None:
    """``vocab.json`` and ``merges.txt`` in ``folder`` (created if missing)."""
    vocab, merges = _tokenizer_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
