"""Image features of the frozen base encoder, computed once per process for each
(base model identity, image list, pre-processing, autocast dtype) and shared by every black-box trial."""

from __future__ import annotations

import torch
from torch import nn

from hpo_peft.data import LabelledImages, Preprocessing

_CACHE: dict[tuple, torch.Tensor] = {}


class FeatureCache:
    def __init__(self, encoder: nn.Module, identity: str, prep: Preprocessing, batch_size: int = 256,
                 amp_dtype: torch.dtype | None = None):
        self.encoder = encoder
        self.identity = identity
        self.prep = prep
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype

    def __call__(self, data: LabelledImages) -> torch.Tensor:
        """L2-normalised features (N, D), float32, on the encoder's device."""
        from hpo_peft.evaluate import predict_logits

        key = (self.identity, tuple(data.names), self.prep, self.amp_dtype)
        if key not in _CACHE:
            _CACHE[key] = predict_logits(self.encoder, data.images, self.prep, self.batch_size, self.amp_dtype)
        device = next(self.encoder.parameters()).device
        return _CACHE[key].to(device)
