"""The training loop: epochs over the few-shot set, early stopping on the few-shot validation set
(validation balanced accuracy, ties broken by validation loss), and the best epoch's weights restored.
Without validation images (`data.val is None`, e.g. k-fold's final refit) it trains for
`max_epochs` and keeps the last epoch's weights. `Training` is one run an epoch at a time; `drive`
is the one loop, for one run (`train`) or kfold's folds in lockstep (validation.py's `KFold`).

`on_epoch(metrics)` is the only way out: the study reports and prunes through it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from hpo_peft.core.config import TrainConfig
from hpo_peft.data import FewShotSplit, LabelledImages, Preprocessing
from hpo_peft.fewshot.evaluate import Metrics, compute_metrics, forward_in_batches
from hpo_peft.models.classifier import ImageClassifier, encoder_is_frozen
from hpo_peft.core.runtime import Placement, RandomStream, set_seeds


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


def mean_curve(histories: list[list[EpochMetrics]]) -> list[EpochMetrics]:
    """The folds' mean curve, over the epochs every fold reached (`fold` None: the trial's own)."""
    return [EpochMetrics(epoch[0].epoch, *(sum(getattr(m, k) for m in epoch) / len(epoch)
                                           for k in ("train_loss", "val_loss", "val_balanced_accuracy")))
            for epoch in zip(*histories)]


def stop_together(histories: list[list[EpochMetrics]], patience: int | None) -> bool:
    """Whether folds trained in lockstep stop now: `patience` epochs after the best epoch of their
    *mean* curve (`best_epoch`). Asked after every epoch, so they stop the first time it holds."""
    return patience is not None and min(len(h) for h in histories) - best_epoch(histories) >= patience


def best_epoch(histories: list[list[EpochMetrics]]) -> int:
    """The epoch (1-based) with the highest fold-mean validation balanced accuracy, among the epochs
    every fold reached; the lower mean validation loss, then the earlier epoch, break ties (`epoch_rank`)."""
    return min(mean_curve(histories), key=epoch_rank).epoch


class Training:
    """One training run, an epoch at a time: `epoch()` trains and validates one, `finish()` puts the
    best epoch's weights back (keeps the last epoch's without validation or with `keep_best=False`).
    `drive` runs one to its end, or kfold's folds in lockstep, each on its own
    random stream (RandomStream), so a fold draws the same batches and dropout masks as it would alone.

    With a frozen encoder only the head trains, on features computed once (by `features`, a shared
    cache, when given); otherwise the whole classifier runs on the uint8 images. `placement`: the
    trial's device and autocast (its TrialSettings'); by default resolved from `config`."""

    def __init__(self, classifier: ImageClassifier, data: FewShotSplit, prep: Preprocessing, categories: list[str],
                 config: TrainConfig, seed: int, features: Callable[[LabelledImages], torch.Tensor] | None = None,
                 keep_best: bool = True, placement: Placement | None = None):
        self.classifier, self.data, self.categories, self.config = classifier, data, categories, config
        self.blind = data.val is None
        self.keep_best = keep_best and not self.blind  # False: no copy of the best weights (kfold's folds)
        set_seeds(seed)
        self.placement = placement or Placement.of(config.device, config.precision)
        device = self.placement.device
        classifier.to(device)
        self.named = [(n, p) for n, p in classifier.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer([p for _, p in self.named], config)
        self.labels = data.train.labels.to(device)
        if not encoder_is_frozen(classifier):
            self.model, self.prep = classifier, prep
            self.train_inputs, self.val_inputs = data.train.images.to(device), None if self.blind else data.val.images
        else:
            encode = features or (lambda split: forward_in_batches(classifier.encoder, split.images, prep,
                                                               config.eval_batch_size, self.placement.dtype))
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
                batch = batch.to(self.placement.device)
                inputs = self.train_inputs[batch]
                if self.prep is not None:  # images, not features: augmented (train.augment), then normalised
                    inputs = self.prep.normalize(dihedral(inputs) if self.config.augment == "dihedral" else inputs)
                with self.placement.autocast():
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
        val_logits = forward_in_batches(self.model, self.val_inputs, self.prep, self.config.eval_batch_size,
                                        self.placement.dtype)
        val = compute_metrics(val_logits, self.data.val.labels, self.categories)
        metrics = EpochMetrics(epoch, float(np.mean(losses)), val.loss, val.balanced_accuracy)
        self.result.history.append(metrics)
        self.result.validations.append(val)
        if _is_better(metrics, self.result.best):
            self.result.best, self.result.best_validation = metrics, val
            if self.keep_best:
                self.best_state = {n: p.detach().clone() for n, p in self.named}
        return metrics

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
    placement: Placement | None = None,
) -> TrainResult:
    """One run: up to `max_epochs`, stopped `patience` epochs after the best validated one."""
    return drive([Training(classifier, data, prep, categories, config, seed, features, placement=placement)], config,
                 on_epoch, progress)[0]


def drive(runs: list[Training], config: TrainConfig, on_epoch: Callable[[EpochMetrics], None] | None = None,
          progress: bool = True) -> list[TrainResult]:
    """The one training loop: each run an epoch in turn, until `patience` epochs pass without the
    validation curve improving (one run's own; several runs' *mean*, `stop_together`) or `max_epochs`.
    kfold's folds never stop on their own: a fold that stopped while still at the zero-shot level
    would stop every fold there (slow starters, e.g. LoRA at 1e-3, scored before they learn); each is
    reported to `on_epoch` with its `fold`, then their mean (`fold` None); one run is reported as is.
    A run without validation (a refit) trains its `max_epochs`, reported to no one."""
    blind = all(run.blind for run in runs)
    desc = "epochs" if len(runs) == 1 else f"epochs ({len(runs)} folds)"
    with tqdm(range(config.max_epochs), desc=desc, leave=False, disable=not progress) as bar:
        for _ in bar:
            epoch = [run.epoch() for run in runs]
            if blind:
                bar.set_postfix(loss=f"{np.mean([m.train_loss for m in epoch]):.3f}")
                continue
            histories = [run.result.history for run in runs]
            mean = mean_curve(histories)[-1] if len(runs) > 1 else epoch[0]
            bar.set_postfix(loss=f"{mean.train_loss:.3f}", val_bacc=f"{mean.val_balanced_accuracy:.1f}")
            if on_epoch is not None:
                if len(runs) > 1:  # each fold's epoch, then their mean
                    for k, metrics in enumerate(epoch):
                        on_epoch(replace(metrics, fold=k))
                on_epoch(mean)
            if stop_together(histories, config.patience):
                for run in runs:
                    run.result.stopped_early = True
                break
    return [run.finish() for run in runs]
