"""Image features of the frozen base encoder, computed once per process for each
(base model identity, image list, pre-processing, autocast dtype) and shared by every black-box
trial; optionally also kept on disk so later processes (study workers, resumed sessions) skip the
backbone too."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from hpo_peft.data import LabelledImages, Preprocessing
from hpo_peft.fewshot.evaluate import forward_in_batches

_CACHE: dict[tuple, torch.Tensor] = {}


class FeatureCache:
    def __init__(self, encoder: nn.Module, identity: str, prep: Preprocessing, batch_size: int = 256,
                 directory: Path | None = None):
        self.encoder = encoder
        self.identity = identity
        self.prep = prep
        self.batch_size = batch_size
        self.directory = directory

    def _file(self, key: tuple) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / (hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".pt")

    def _compute(self, key: tuple, data: LabelledImages, dtype: torch.dtype | None) -> torch.Tensor:
        path = self._file(key)
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        features = forward_in_batches(self.encoder, data.images, self.prep, self.batch_size, dtype)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".tmp{id(features)}")
            torch.save(features, partial)
            partial.replace(path)  # atomic: a concurrent reader never sees half a file
        return features

    def __call__(self, data: LabelledImages, dtype: torch.dtype | None) -> torch.Tensor:
        """L2-normalised features (N, D), float32, on the encoder's device; computed under autocast
        `dtype` (None: fp32), the trial's own (its TrialSettings' placement)."""
        pixels = hashlib.sha256(data.images.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
        # names alone may repeat across datasets (an hf split names its images train/0, train/1, ...)
        key = (self.identity, tuple(data.names), pixels, self.prep, str(dtype))
        if key not in _CACHE:
            _CACHE[key] = self._compute(key, data, dtype)
        device = next(self.encoder.parameters()).device
        return _CACHE[key].to(device)
