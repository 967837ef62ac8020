"""What every method shares: which parameters train, and how the trained encoder parameters are
saved and loaded. The head is saved by `artifacts`, the same way for every method.

A method never trains the base model in place: it gets a fresh `ImageClassifier` copy."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from hpo_peft.core.errors import UserError
from hpo_peft.models.classifier import ImageClassifier
from hpo_peft.models import ModuleNames

WEIGHTS_FILE = "encoder_parameters.safetensors"


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = True
    trains_encoder: ClassVar[bool] = True  # False: it sees features computed once, never an image (train.augment)
    copies_backbone: ClassVar[bool] = False  # its adapter holds the whole vision tower (retention.py)

    def check_family(self, config: MethodConfig, names: ModuleNames) -> None:
        """Refuse, in one line naming the key, options this model family cannot run: called by preflight
        for every method and option value a command may use, before anything loads or trains."""

    def prepare_as_notebook(self, classifier: ImageClassifier, config: MethodConfig) -> ImageClassifier:
        """`prepare` under `protocol: course`: drawing any random initialisation as the course
        notebook's own code does, where that differs (LoRA's wrapper); otherwise `prepare`."""
        return self.prepare(classifier, config)

    def prepare(self, classifier: ImageClassifier, config: MethodConfig) -> ImageClassifier:
        """Mark what trains (and wrap modules where the method adds any). The head always trains."""
        classifier.requires_grad_(False)
        if self.trains:
            classifier.head.weight.requires_grad_(True)
        return classifier

    def save(self, classifier: ImageClassifier, folder: Path, base_name: str | None = None) -> list[str]:
        """Write the trained encoder parameters; returns the file names written."""
        state = {n: p.detach().contiguous().cpu() for n, p in classifier.encoder.named_parameters() if p.requires_grad}
        if not state:
            return []
        save_file(state, folder / WEIGHTS_FILE)
        return [WEIGHTS_FILE]

    def load(self, classifier: ImageClassifier, config: MethodConfig, folder: Path) -> ImageClassifier:
        classifier = self.prepare(classifier, config)
        expected = {n: p for n, p in classifier.encoder.named_parameters() if p.requires_grad}
        if expected:
            path = folder / WEIGHTS_FILE
            if not path.is_file():
                raise UserError(f"{path}: adapter weights missing")
            state = load_file(path)
            if set(state) != set(expected):
                raise UserError(
                    f"{path}: adapter does not fit method {self.name!r} on this model "
                    f"({len(set(state) ^ set(expected))} parameter names differ)"
                )
            with torch.no_grad():
                for name, value in state.items():
                    if expected[name].shape != value.shape:
                        raise UserError(f"{path}: {name} has shape {tuple(value.shape)}, model has {tuple(expected[name].shape)}")
                    expected[name].copy_(value)
        return classifier.requires_grad_(False)


class SelectiveMethod(Method):
    """Tunes an existing subset of the image encoder, chosen by parameter name; the encoder's
    family says where its modules are (`ModuleNames`)."""

    def tunes(self, name: str, config: MethodConfig, names: ModuleNames) -> bool:
        raise NotImplementedError

    def prepare(self, classifier: ImageClassifier, config: MethodConfig) -> ImageClassifier:
        classifier = super().prepare(classifier, config)
        names = classifier.encoder.module_names
        for name, param in classifier.encoder.named_parameters():
            if self.tunes(name, config, names):
                param.requires_grad_(True)
        return classifier
