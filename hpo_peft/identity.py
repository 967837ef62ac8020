"""What defines a study, recorded on it when it is created and checked whenever it is continued.

Two sessions of one study must optimise the same thing: the same data (root, tables and the
training table's content), categories, shots, validation scheme and seed, prompts, model and
revision, precision and training settings, methods and search space. `study run` on an existing
study whose fingerprint differs stops before anything is written and names the keys that differ.
How long it runs (n_trials, timeout), how it samples and prunes, where it logs, and `compare`'s grid
may change between sessions. How a trial is scored (`selection.score_radius`, validation.py) is part
of it too: a study scored before that window existed does not mix with one scored with it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hpo_peft.config import StudyConfig
from hpo_peft.validation import SCORE_RADIUS

FINGERPRINT_ATTR = "hpo_peft.fingerprint"
DEFINING = ("protocol", "data", "model", "prompts", "train", "method", "methods", "method_train",
            "search.params", "search.methods")
MACHINE_KEYS = {"train.device", "train.eval_batch_size"}  # where and in what chunks, not what


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
    return out


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
