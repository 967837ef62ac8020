"""Learning-rate schedules the papers of some methods train with (a head's `schedule` hook, which
`train.Training` steps once per batch).

- `cosine`: lr_t = lr * (1 + cos(pi * t / T)) / 2 over every step of the run (Tip-Adapter-F:
  `CosineAnnealingLR(optimizer, epochs * batches)`), or per epoch (`per_epoch`, Dassl's CoOp).
- `warmup_epochs` at the constant `warmup_lr` first (Dassl's `ConstantWarmupScheduler`, CoOp:
  1 epoch at 1e-5); the cosine then starts at the full learning rate, as Dassl's successor does.
"""

from __future__ import annotations

import math

import torch


def cosine_schedule(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, per_epoch: bool = False,
                    warmup_epochs: int = 0, warmup_lr: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A multiplier of each group's learning rate, stepped once per batch."""
    steps_per_epoch = max(steps_per_epoch, 1)
    base = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if epoch < warmup_epochs:
            return (warmup_lr if warmup_lr is not None else base) / base
        if per_epoch:
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max(epochs, 1)))
        return 0.5 * (1 + math.cos(math.pi * step / max(epochs * steps_per_epoch, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
