"""The training loop: epochs over the few-shot set, early stopping on the few-shot validation set
(validation balanced accuracy, ties broken by validation loss), and the best epoch's weights restored.
Without validation images (`data.val is None`, e.g. k-fold's final refit) it trains for
`max_epochs` and keeps the last epoch's weights.

`on_epoch(metrics)` is the only way out: the study reports and prunes through it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from hpo_peft.config import TrainConfig
from hpo_peft.data import FewShotSplit, LabelledImages, Preprocessing
from hpo_peft.evaluate import Metrics, compute_metrics, predict_logits
from hpo_peft.model import ImageClassifier, encoder_is_frozen
from hpo_peft.runtime import amp_dtype, autocast, resolve_device, set_seeds


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


def _is_better(current: EpochMetrics, best: EpochMetrics | None) -> bool:
    if best is None:
        return True
    if current.val_balanced_accuracy != best.val_balanced_accuracy:
        return current.val_balanced_accuracy > best.val_balanced_accuracy
    return current.val_loss < best.val_loss


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
    """With a frozen encoder only the head trains, on features computed once (by `features`, a
    shared cache, when given); otherwise the whole classifier runs on the uint8 images."""
    blind = data.val is None
    set_seeds(seed)
    device = resolve_device(config.device)
    dtype = amp_dtype(config.precision, device)
    classifier.to(device)
    named = [(n, p) for n, p in classifier.named_parameters() if p.requires_grad]
    optimizer = make_optimizer([p for _, p in named], config)
    labels = data.train.labels.to(device)
    if not encoder_is_frozen(classifier):
        model, prep_inputs = classifier, prep
        train_inputs, val_inputs = data.train.images.to(device), None if blind else data.val.images
    else:
        encode = features or (lambda split: predict_logits(classifier.encoder, split.images, prep, config.eval_batch_size, dtype))
        model, prep_inputs = classifier.head, None
        train_inputs, val_inputs = encode(data.train).to(device), None if blind else encode(data.val)
        classifier.head.initialize_from_shots(train_inputs, labels)
    order_rng = torch.Generator().manual_seed(seed)

    result = TrainResult(best=None)
    best_state: dict[str, torch.Tensor] = {}
    with tqdm(range(1, config.max_epochs + 1), desc="epochs", leave=False, disable=not progress) as bar:
        for epoch in bar:
            model.train()
            losses = []
            for batch in torch.randperm(len(train_inputs), generator=order_rng).split(config.batch_size):
                batch = batch.to(device)
                inputs = train_inputs[batch] if prep_inputs is None else prep_inputs.normalize(train_inputs[batch])
                with autocast(device, dtype):
                    logits = model(inputs)
                loss = F.cross_entropy(logits.float(), labels[batch])
                if (penalty := classifier.head.penalty()) is not None:
                    loss = loss + penalty
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite training loss at epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())

            if blind:  # nothing to select on: every epoch is the latest, the last one is kept
                result.best = EpochMetrics(epoch, float(np.mean(losses)), None, None)
                result.history.append(result.best)
                bar.set_postfix(loss=f"{result.best.train_loss:.3f}")
                continue
            val_logits = predict_logits(model, val_inputs, prep_inputs, config.eval_batch_size, dtype)
            val = compute_metrics(val_logits, data.val.labels, categories)
            metrics = EpochMetrics(epoch, float(np.mean(losses)), val.loss, val.balanced_accuracy)
            result.history.append(metrics)
            result.validations.append(val)
            if _is_better(metrics, result.best):
                result.best, result.best_validation = metrics, val
                best_state = {n: p.detach().clone() for n, p in named}
            bar.set_postfix(loss=f"{metrics.train_loss:.3f}", val_bacc=f"{metrics.val_balanced_accuracy:.1f}")
            if on_epoch is not None:
                on_epoch(metrics)
            if config.patience is not None and epoch - result.best.epoch >= config.patience:
                result.stopped_early = True
                break

    with torch.no_grad():
        for name, param in named:
            if not blind:
                param.copy_(best_state[name])
    classifier.eval()
    return result
