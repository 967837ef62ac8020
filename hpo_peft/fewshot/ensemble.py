"""The study's top trials as one model (`search.ensemble: N`): their adapters side by side, their
class probabilities averaged.

With a few labelled images per class, the selection score that ranks trials is noisy: the single best
trial is often not the best configuration, while the few best trials are each good. Averaging the
class probabilities of the N best trials (the softmax of each adapter's fp32 logits; the prediction
is the arg-max of the mean) keeps what they share and loses most of one trial's luck. How far it
lands from the best configuration of the space, against the single best trial:
docs/search.md ("The top trials as one model").

Folder (an adapter folder in every way the package reads one: `predict`, `evaluate`, the pyfunc
model and its REST server take it as they take a trial's adapter):
    hpo_peft_adapter.json      metadata: base model, categories, pre-processing, the members (their
                               trials, runs and selection scores) and a sha256 of every member's file
    member-1/ ... member-N/    each member's own adapter folder, unchanged (its own checksums)

Every member is built on the same base model; each rebuilds its own copy of the vision tower
(`build_classifier`), so an ensemble of N holds N towers in memory when its members tune the tower.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hpo_peft
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.artifacts import ENSEMBLE_METHOD, FORMAT_VERSION, METADATA_FILE, read_metadata, seal, verify_files

MEMBER_PREFIX = "member-"


def members_of(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The members as the metadata lists them: folder, trial, run id, method, selection score."""
    return list(metadata["method"]["config"]["members"])


def save_ensemble(folder: Path, members: list[tuple[Path, dict[str, Any]]]) -> Path:
    """`members`: (adapter folder, what to record of it: trial, run_id, selection) in rank order.
    Each member is checked (`read_metadata`) and copied; they must share base model and categories."""
    if len(members) < 2:
        raise UserError(f"an ensemble needs at least 2 members, got {len(members)}")
    folder.mkdir(parents=True, exist_ok=True)
    listed, first = [], None
    for place, (source, record) in enumerate(members, start=1):
        metadata = read_metadata(source, record.get("label"))
        first = first or metadata
        for key in ("base_model", "categories", "preprocessing"):
            if metadata.get(key) != first.get(key):
                raise UserError(f"ensemble member {place} ({record.get('label') or source}): its {key} differs from "
                                f"member 1's; an ensemble's members share one base model and one set of categories")
        shutil.copytree(source, folder / f"{MEMBER_PREFIX}{place}")
        listed.append({"folder": f"{MEMBER_PREFIX}{place}", "method": metadata["method"],
                       **{k: v for k, v in record.items() if k != "label"}})
    metadata = {
        "format_version": FORMAT_VERSION,
        "hpo_peft_version": hpo_peft.__version__,
        "base_model": first["base_model"],
        "method": {"name": ENSEMBLE_METHOD, "config": {"members": listed}},
        "categories": first["categories"],
        "preprocessing": first.get("preprocessing"),
    }
    return seal(folder, metadata)


def member_folders(folder: Path, metadata: dict[str, Any]) -> list[Path]:
    """The members' folders, each checked to be listed, present and the file the metadata hashed."""
    verify_files(folder, metadata)  # every member file, as the ensemble was saved
    out = []
    for member in members_of(metadata):
        path = folder / member["folder"]
        if not (path / METADATA_FILE).is_file():
            raise UserError(f"{path}: ensemble member missing")
        out.append(path)
    return out


@dataclass
class EnsemblePredictor:
    """`predict.Predictor`'s face over several: probabilities are the members' mean; logits are
    their log, so arg-max and softmax agree with the mean."""

    members: list  # predict.Predictor, one per member, in rank order
    metadata: dict[str, Any]

    @property
    def categories(self) -> list[str]:
        return list(self.metadata["categories"])

    @property
    def preprocessing(self):
        return self.members[0].preprocessing

    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        if len(images) == 0:
            return torch.empty(0, len(self.categories))
        return torch.stack([m.probabilities(images, batch_size) for m in self.members]).mean(dim=0)

    def logits(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return self.probabilities(images, batch_size).clamp_min(torch.finfo(torch.float32).tiny).log()
