"""The adapter folder: the method's own files, the head, and a metadata file with everything
needed to rebuild the model without the study (base model identity, method and its config,
categories, prompts, pre-processing), a sha256 of every other file, and a sha256 of the metadata
itself (`metadata_sha256`, over the rest of it), so no file and no value can change unnoticed.
Loading checks all of them, then the base model: its family (hf_clip, open_clip, conch), the fingerprint of every weight the adapter
depends on (vision tower, projection, logit scale), the revision and the pre-processing; each
refusal says what differs.

Layout:
    hpo_peft_adapter.json      metadata + checksums
    head.safetensors           the trained class weights (C x D)
    peft_adapter/              LoRA: HF peft's save_pretrained folder
    encoder_parameters.safetensors   selective methods: the trained encoder parameters
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import hpo_peft
from hpo_peft.core.config import PromptConfig, StudyConfig
from hpo_peft.core.errors import UserError
from hpo_peft.methods import get_method, method_config
from hpo_peft.models.classifier import BaseVLM, ImageClassifier, build_classifier, class_names

METADATA_FILE = "hpo_peft_adapter.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 2  # 2: the metadata has its own checksum; the fingerprint covers the whole vision tower
ENSEMBLE_METHOD = "ensemble"  # the method name of a study's ensemble folder (ensemble.py): several adapters


def is_ensemble(metadata: dict[str, Any]) -> bool:
    """Whether an adapter folder's metadata is a study's ensemble (ensemble.py) rather than one adapter."""
    return metadata.get("method", {}).get("name") == ENSEMBLE_METHOD


def _metadata_digest(metadata: dict[str, Any]) -> str:
    body = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def base_identity(base: BaseVLM) -> dict[str, Any]:
    return {"name_or_path": base.name_or_path, "revision": base.revision, "fingerprint": base.fingerprint(),
            "family": base.family.name}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): _sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != METADATA_FILE
    }


def save_adapter(
    folder: Path,
    classifier: ImageClassifier,
    base: BaseVLM,
    method_name: str,
    method_options: dict[str, Any],
    config: StudyConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """The adapter of `classifier` (trained with `method_name` on `base`), with the categories and
    prompts of the study's `config`, as a self-checking folder."""
    folder.mkdir(parents=True, exist_ok=True)
    get_method(method_name).save(classifier, folder, base.name_or_path)
    head_state = {k: v.detach().float().contiguous().cpu() for k, v in classifier.head.state_dict().items()}
    save_file(head_state, folder / HEAD_FILE)
    metadata = {
        "format_version": FORMAT_VERSION,
        "hpo_peft_version": hpo_peft.__version__,
        "base_model": base_identity(base),
        "method": {"name": method_name, "config": method_options},
        "categories": list(config.data.categories),
        "prompts": config.prompts.model_dump(),
        "preprocessing": asdict(base.preprocessing),
        "logit_scale": float(base.logit_scale),
        **(extra or {}),
    }
    return seal(folder, metadata)


def seal(folder: Path, metadata: dict[str, Any]) -> Path:
    """Write `metadata` into `folder` with a sha256 of every other file in it and its own checksum."""
    metadata = {**metadata, "files": _checksums(folder)}
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    share_as_umask(folder)
    return folder


def share_as_umask(folder: Path) -> None:
    """The finished adapter folder with the modes the user's umask gives new files (0o666 & ~umask,
    folders 0o777 & ~umask): safetensors, so peft's save_pretrained, writes 0600, which other users
    (a colleague, a model server's account) cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def shown_as(folder: Path, label: str | None):
    """Errors about the adapter in `folder` name `label` (what the user gave: `run ID`, a models:/
    URI) and the file inside the adapter, never `folder` itself (a temporary download)."""
    try:
        yield
    except UserError as err:
        if label is None:
            raise
        raise UserError(str(err).replace(str(folder), f"{label}: adapter")) from None


def read_metadata(folder: Path, label: str | None = None) -> dict[str, Any]:
    """The adapter's checked metadata; `label`: how errors name the adapter (`shown_as`)."""
    with shown_as(Path(folder), label):
        return _read_metadata(Path(folder))


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{path}: not an hpo-peft adapter (metadata file missing)")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: metadata is not valid JSON ({err})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: adapter format {metadata.get('format_version')}, this hpo-peft reads format "
                        f"{FORMAT_VERSION}; train it again with this version")
    if metadata.get("metadata_sha256") != _metadata_digest(metadata):
        raise UserError(f"{path}: checksum mismatch; the metadata was altered")
    for key in ("base_model", "method", "categories", "files"):
        if key not in metadata:
            raise UserError(f"{path}: metadata has no {key!r}")
    return metadata


def verify_files(folder: Path, metadata: dict[str, Any]) -> None:
    """Refuse a truncated, altered or incomplete adapter."""
    actual = _checksums(folder)
    for name, expected in metadata["files"].items():
        if name not in actual:
            raise UserError(f"{folder / name}: adapter file missing")
        if actual[name] != expected:
            raise UserError(f"{folder / name}: checksum mismatch; the adapter was altered or truncated")


def check_base(folder: Path, metadata: dict[str, Any], base: BaseVLM) -> None:
    """The adapter's base model is this one: same weights, revision and pre-processing."""
    built_for = metadata["base_model"]
    family = built_for.get("family", "hf_clip")  # adapters from before model families were HF CLIP's
    if family != base.family.name:
        raise UserError(
            f"{folder}: adapter was built on a {family} model ({built_for.get('name_or_path')!r}), and the base "
            f"model {base.name_or_path!r} is a {base.family.name} model; an adapter only loads on the model "
            "family (and the model) it was trained on"
        )
    if built_for.get("fingerprint") != base.fingerprint():
        raise UserError(
            f"{folder}: adapter was built for base model {built_for.get('name_or_path')!r} "
            f"(fingerprint {built_for.get('fingerprint')}), not for {base.name_or_path!r} (fingerprint "
            f"{base.fingerprint()}): the vision tower, projection or logit scale weights differ"
        )
    if built_for.get("revision") != base.revision:
        raise UserError(f"{folder}: adapter was built for revision {built_for.get('revision')!r} of its base model, "
                        f"this one is {base.revision!r}; set model.revision")
    expected, actual = metadata.get("preprocessing"), asdict(base.preprocessing)
    if expected is not None and {k: list(v) if isinstance(v, tuple) else v for k, v in actual.items()} != expected:
        differ = sorted(k for k in actual if expected.get(k) != (list(actual[k]) if isinstance(actual[k], tuple) else actual[k]))
        raise UserError(f"{folder}: adapter was trained with other pre-processing ({', '.join(differ)} differ: "
                        f"{ {k: expected.get(k) for k in differ} } then, { {k: actual[k] for k in differ} } now)")


def load_adapter(
    folder: Path, base: BaseVLM, categories: list[str] | None = None, label: str | None = None
) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the trained classifier on `base` from the adapter folder alone; `label`: how errors
    name the adapter (`shown_as`), e.g. `run ID` for one downloaded to a temporary folder."""
    folder = Path(folder)
    with shown_as(folder, label):
        return _load_adapter(folder, base, categories)


def _load_adapter(folder: Path, base: BaseVLM, categories: list[str] | None) -> tuple[ImageClassifier, dict[str, Any]]:
    metadata = _read_metadata(folder)
    if is_ensemble(metadata):  # several adapters, no one classifier
        raise UserError(f"{folder}: a study's ensemble of {len(metadata['method']['config']['members'])} adapters, "
                        "not one; load it with hpo_peft.fewshot.predict.load_predictor (or hpo-peft predict)")
    verify_files(folder, metadata)
    check_base(folder, metadata, base)
    if categories is not None and list(categories) != metadata["categories"]:
        raise UserError(f"{folder}: adapter categories {metadata['categories']} differ from the config's {categories}")
    method_name = metadata["method"]["name"]
    config = method_config(method_name, metadata["method"]["config"])
    head_state = load_file(folder / HEAD_FILE)
    if "weight" not in head_state:
        raise UserError(f"{folder / HEAD_FILE}: no head weight")
    prompts = PromptConfig.model_validate(metadata["prompts"]) if metadata.get("prompts") else PromptConfig()
    classifier = build_classifier(base, torch.zeros_like(head_state["weight"]), class_names(prompts, metadata["categories"]))
    classifier = get_method(method_name).load(classifier, config, folder)
    try:
        classifier.head.load_state_dict(head_state)
    except RuntimeError as err:
        raise UserError(f"{folder / HEAD_FILE}: head does not fit method {method_name!r} on this model ({err})") from None
    return classifier.eval(), metadata
