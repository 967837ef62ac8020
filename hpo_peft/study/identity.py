"""What defines a study, recorded on it when it is created and checked whenever it is continued.

Two sessions of one study must optimise the same thing: the same data, categories, shots,
validation scheme and seed, prompts, model and revision, precision and training settings, methods
and search space. The data is known by its content, not by where it lies: a digest of the training
and test tables' bytes and of the image folder's sorted file list with sizes (`data.content.sha256`),
so a dataset copied or moved elsewhere continues its studies, and a changed table or image set is
refused. `data.root` (the absolute path) is recorded for the record, never compared; a study
recorded before the content key (whose `data.root` was compared) is compared on the rest, its
training table's digest included. `study run` on an existing study whose fingerprint differs stops
before anything is written and names the keys that differ.
How long it runs (n_trials, timeout), how it samples and prunes, where it logs, and `compare`'s grid
may change between sessions. How a trial is scored (`selection.score_radius`, validation.py) is part
of it too: a study scored before that window existed does not mix with one scored with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hpo_peft.core.config import DataConfig, StudyConfig
from hpo_peft.fewshot.validation import SCORE_RADIUS

FINGERPRINT_ATTR = "hpo_peft.fingerprint"
CONTENT_KEY = "data.content.sha256"
RECORDED_ONLY = {"data.root"}  # where the data lay when the fingerprint was taken: not what the study is
DEFINING = ("protocol", "data", "model", "prompts", "train", "method", "methods", "method_train",
            "search.params", "search.methods")
MACHINE_KEYS = {"train.device", "train.eval_batch_size"}  # where and in what chunks, not what
OTHER_FORMATS_KEYS = ("train_dir", "test_dir", "label_column", "group_column", "split_column", "train_split", "test_split")


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True)


def _file_digest(path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _listing(folder: Path) -> list[tuple[str, str]]:
    """Every file under `folder` (links followed, hidden names skipped), sorted, as (relative POSIX
    path, size); a JSON file (a saved dataset's state and metadata) by its bytes' digest too."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            path = Path(top) / name
            try:
                size = str(path.stat().st_size)
            except OSError:
                size = "unreadable"
            if name.endswith(".json"):
                size += " " + _file_digest(path)
            found.append((path.relative_to(folder).as_posix(), size))
    return sorted(found)


def _data_parts(data: DataConfig) -> tuple[list[str], list[str]]:
    """(tables, folders), relative to `data.root`, that hold the data in its format: SICAPv2 and
    CSV, the two tables and the image folder; an image folder, its train and test folders; a saved
    Hugging Face dataset, its whole folder."""
    form = getattr(data, "format", "sicapv2")
    if form == "imagefolder":
        return [], [data.train_dir, data.test_dir]
    if form == "hf":
        return [], ["."]
    return [data.train_table, data.test_table], [data.images_dir]


def data_content(data: DataConfig) -> str:
    """The data a study trains and is tested on, by content: its tables' bytes, and its folders'
    file names and sizes (not the images' bytes: reading every image would cost a pass over the
    dataset each session; preflight decodes the images a study reads anyway)."""
    digest = hashlib.sha256()
    tables, folders = _data_parts(data)
    for table in tables:
        digest.update(f"table {_file_digest(data.root / table)}\n".encode())
    for name in folders:
        folder = data.root / name
        digest.update(f"folder {'listed' if folder.is_dir() else 'missing'}\n".encode())
        for path, size in _listing(folder) if folder.is_dir() else []:
            digest.update(f"{path}\t{size}\n".encode())
    return digest.hexdigest()[:16]


def fingerprint(config: StudyConfig) -> dict[str, str]:
    """Flat `dotted.key -> JSON value` of everything that defines the study."""
    dumped = config.model_dump(mode="json")
    dumped["data"]["root"] = str(config.data.root.resolve())
    if dumped["model"].get("family") is None:  # inferred from the source: studies from before the key match
        dumped["model"].pop("family", None)
    if not config.data.refit:  # likewise for studies from before holdout could refit
        dumped["data"].pop("refit")
    if config.data.sampler == "package":  # ... and before the course's sampler could draw a study's shots
        dumped["data"].pop("sampler")
    if config.train.augment == "none":  # ... and before training images could be augmented
        dumped["train"].pop("augment")
    dumped["data"].pop("allow_overlap")  # a permission for the data check, not what the study optimises
    if dumped["data"].get("format", "sicapv2") == "sicapv2":  # ... and before other data formats
        dumped["data"].pop("format", None)
    for key in OTHER_FORMATS_KEYS:  # None: a key the data's format does not read
        if key in dumped["data"] and dumped["data"][key] is None:
            dumped["data"].pop(key)
    out: dict[str, str] = {}
    for key in DEFINING:
        node = dumped
        for part in key.split("."):
            node = node.get(part, {})
        _flatten(node, key, out)
    for key in MACHINE_KEYS:
        out.pop(key, None)
    out["selection.score_radius"] = json.dumps(SCORE_RADIUS)
    out["data.train_table.sha256"] = json.dumps(_file_digest(config.data.root / config.data.train_table))
    out[CONTENT_KEY] = json.dumps(data_content(config.data))
    return out


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The keys whose values differ. `data.root` never counts; the data's content counts where both
    fingerprints have it (a study recorded before it is compared on its training table's digest)."""
    ignored = set(RECORDED_ONLY)
    if CONTENT_KEY not in recorded or CONTENT_KEY not in current:
        ignored.add(CONTENT_KEY)
    return sorted(k for k in (set(recorded) | set(current)) - ignored if recorded.get(k) != current.get(k))
