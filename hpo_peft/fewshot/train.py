"""The training loop: epochs over the few-shot set, early stopping on the few-shot validation set
(validation balanced accuracy, ties broken by validation loss), and the best epoch's weights restored.
Without validation images (`data.val is None`, e.g. k-fold's final refit) it trains for
`max_epochs` and keeps the last epoch's weights. `Training` is one run an epoch at a time (kfold's
folds train in lockstep, trial.py); `train` drives one to its end.

`on_epoch(metrics)` is the only way out: the study reports and prunes through it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from hpo_peft.core.config import TrainConfig
from hpo_peft.data import FewShotSplit, LabelledImages, Preprocessing
from hpo_peft.fewshot.evaluate import Metrics, compute_metrics, predict_logits
from hpo_peft.models.classifier import ImageClassifier, encoder_is_frozen
from hpo_peft.core.runtime import (
    RandomStream,
    amp_dtype,
    autocast,
    resolve_device,
    set_seeds,
)


class NonFiniteLoss(RuntimeError):
    """Training diverged (loss is NaN or infinite)."""


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float | None  # None when training without validation
    val_balanced_accuracy: float | None
    fold: int | None = None  # kfold: which fold's run (0-based)


@dataclass
class TrainResult:
    best: EpochMetrics | None
    history: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    best_validation: Metrics | None = None  # the best epoch's full validation metrics
    validations: list[Metrics] = field(default_factory=list)  # every validated epoch's, in order

    def as_dict(self) -> dict:
        return {"best": asdict(self.best) if self.best else None, "history": [asdict(m) for m in self.history]}


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def dihedral(images: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, H, W) in one of the square's 8 symmetries, drawn from torch's random
    stream: flipped left-right, flipped up-down and transposed, each with probability 1/2 (no
    transpose for a non-square image). A tissue patch has no up or left."""
    flips = torch.rand(3, len(images), device=images.device) < 0.5
    images = torch.where(flips[0, :, None, None, None], images.flip(-1), images)
    images = torch.where(flips[1, :, None, None, None], images.flip(-2), images)
    if images.shape[-1] != images.shape[-2]:
        return images
    return torch.where(flips[2, :, None, None, None], images.transpose(-1, -2), images)


def epoch_rank(metrics: EpochMetrics) -> tuple:
    """The one best-epoch rule (a run's own curve here, the folds' mean curve in validation.py): the
    higher validation balanced accuracy, then the lower validation loss, then the earlier epoch."""
    return -metrics.val_balanced_accuracy, metrics.val_loss, metrics.epoch


def _is_better(current: EpochMetrics, best: EpochMetrics | None) -> bool:
    return best is None or epoch_rank(current) < epoch_rank(best)


class Training:
    """One training run, an epoch at a time: `epoch()` trains and validates one, `finish()` puts the
    best epoch's weights back (keeps the last epoch's without validation or with `keep_best=False`).
    `train` drives one to its end; kfold (trial.py) drives its folds in lockstep, each on its own
    random stream (RandomStream), so a fold draws the same batches and dropout masks as it would alone.

    With a frozen encoder only the head trains, on features computed once (by `features`, a shared
    cache, when given); otherwise the whole classifier runs on the uint8 images."""

    def __init__(self, classifier: ImageClassifier, data: FewShotSplit, prep: Preprocessing, categories: list[str],
                 config: TrainConfig, seed: int, features: Callable[[LabelledImages], torch.Tensor] | None = None,
                 keep_best: bool = True):
        self.classifier, self.data, self.categories, self.config = classifier, data, categories, config
        self.blind = data.val is None
        self.keep_best = keep_best and not self.blind  # False: no copy of the best weights (kfold's folds)
        set_seeds(seed)
        device = resolve_device(config.device)
        self.device, self.dtype = device, amp_dtype(config.precision, device)
        classifier.to(device)
        self.named = [(n, p) for n, p in classifier.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer([p for _, p in self.named], config)
        self.labels = data.train.labels.to(device)
        if not encoder_is_frozen(classifier):
            self.model, self.prep = classifier, prep
            self.train_inputs, self.val_inputs = data.train.images.to(device), None if self.blind else data.val.images
        else:
            encode = features or (lambda split: predict_logits(classifier.encoder, split.images, prep,
                                                               config.eval_batch_size, self.dtype))
            self.model, self.prep = classifier.head, None
            self.train_inputs = encode(data.train).to(device)
            self.val_inputs = None if self.blind else encode(data.val)
            classifier.head.initialize_from_shots(self.train_inputs, self.labels)
        self.scheduler = classifier.head.schedule(self.optimizer, -(-len(self.train_inputs) // config.batch_size),
                                                  config.max_epochs)
        self.order_rng = torch.Generator().manual_seed(seed)
        self.stream = RandomStream(device)
        self.result = TrainResult(best=None)
        self.best_state: dict[str, torch.Tensor] = {}

    def epoch(self) -> EpochMetrics:
        epoch = len(self.result.history) + 1
        with self.stream.active():
            self.model.train()
            losses = []
            for batch in torch.randperm(len(self.train_inputs), generator=self.order_rng).split(self.config.batch_size):
                batch = batch.to(self.device)
                inputs = self.train_inputs[batch]
                if self.prep is not None:  # images, not features: augmented (train.augment), then normalised
                    inputs = self.prep.normalize(dihedral(inputs) if self.config.augment == "dihedral" else inputs)
                with autocast(self.device, self.dtype):
                    logits = self.model(inputs)
                loss = F.cross_entropy(logits.float(), self.labels[batch])
                if (penalty := self.classifier.head.penalty()) is not None:
                    loss = loss + penalty
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite training loss at epoch {epoch}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                losses.append(loss.item())

        if self.blind:  # nothing to select on: every epoch is the latest, the last one is kept
            self.result.best = EpochMetrics(epoch, float(np.mean(losses)), None, None)
            self.result.history.append(self.result.best)
            return self.result.best
        val_logits = predict_logits(self.model, self.val_inputs, self.prep, self.config.eval_batch_size, self.dtype)
        val = compute_metrics(val_logits, self.data.val.labels, self.categories)
        metrics = EpochMetrics(epoch, float(np.mean(losses)), val.loss, val.balanced_accuracy)
        self.result.history.append(metrics)
        self.result.validations.append(val)
        if _is_better(metrics, self.result.best):
            self.result.best, self.result.best_validation = metrics, val
            if self.keep_best:
                self.best_state = {n: p.detach().clone() for n, p in self.named}
        return metrics

    def patience_ran_out(self) -> bool:
        best, patience = self.result.best, self.config.patience
        return patience is not None and len(self.result.history) - best.epoch >= patience  # asked of validated runs only

    def finish(self) -> TrainResult:
        if self.keep_best:
            with torch.no_grad():
                for name, param in self.named:
                    param.copy_(self.best_state[name])
        self.classifier.eval()
        return self.result


def train(
    classifier: ImageClassifier,
    data: FewShotSplit,
    prep: Preprocessing,
    categories: list[str],
    config: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
    features: Callable[[LabelledImages], torch.Tensor] | None = None,
) -> TrainResult:
    """One run: up to `max_epochs`, stopped `patience` epochs after the best validated one."""
    run = Training(classifier, data, prep, categories, config, seed, features)
    with tqdm(range(config.max_epochs), desc="epochs", leave=False, disable=not progress) as bar:
        for _ in bar:
            metrics = run.epoch()
            if run.blind:
                bar.set_postfix(loss=f"{metrics.train_loss:.3f}")
                continue
            bar.set_postfix(loss=f"{metrics.train_loss:.3f}", val_bacc=f"{metrics.val_balanced_accuracy:.1f}")
            if on_epoch is not None:
                on_epoch(metrics)
            if run.patience_ran_out():
                run.result.stopped_early = True
                break
    return run.finish()
