"""Which trial is the best.

The objective is the validation balanced accuracy (with `data.validation: kfold`, its mean over
folds). With a few validation images per class one image moves it by several points, so trials
tie often; ties are broken by the lower validation loss, then by fewer trainable parameters, then
by the earlier trial. Optuna's own `best_trial` would take the first of the tied trials.

The best of many noisy scores is optimistic. With kfold, each trial's score is a mean over the same
folds, so how much choosing the maximum flatters it can be estimated from the study itself
(Tibshirani & Tibshirani, 2009, Ann. Appl. Stat. 3(2)): on each fold, how far the best trial of that
fold is above the chosen trial, averaged over folds. `corrected_score` is the chosen trial's score
less that amount, reported beside the selection score: an estimate for images that chose nothing
(it leaves out what the refit on all K shots adds; how it compared with unseen images on the demo
kit: docs/validation-and-selection.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

VAL_LOSS_ATTR = "val_loss"
TRAINABLE_ATTR = "trainable_parameters"
FOLD_SCORES_ATTR = "fold_scores"  # kfold: the trial's validation balanced accuracy on each fold
STANDARD_ERROR_ATTR = "standard_error"  # the score's binomial standard error (evaluate.balanced_accuracy_se)
VAL_PREDICTIONS_ATTR = "val_predictions"  # per fold (holdout: its one split): the validation labels and class probabilities


def selection_key(trial: FrozenTrial) -> tuple:
    loss = trial.user_attrs.get(VAL_LOSS_ATTR)
    trainable = trial.user_attrs.get(TRAINABLE_ATTR)
    return (-trial.value, math.inf if loss is None else loss, math.inf if trainable is None else trainable, trial.number)


def select_best(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    return min(completed, key=selection_key) if completed else None


def ranked(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials in the selection's order, `select_best`'s pick first, tie-breaks included."""
    return sorted((t for t in trials if t.state == TrialState.COMPLETE), key=selection_key)


def ranks(trials: Iterable[FrozenTrial]) -> dict[int, int]:
    """Trial number -> its place in the selection, 1 being `select_best`'s pick (the run table sorts by it)."""
    return {t.number: place for place, t in enumerate(ranked(trials), start=1)}


def corrected_score(trials: Iterable[FrozenTrial], best: FrozenTrial) -> float | None:
    """kfold: `best`'s score less the winner's-curse bias estimated over the completed trials scored
    on the same folds; None without fold scores (holdout) or with fewer than two such trials."""
    mine = best.user_attrs.get(FOLD_SCORES_ATTR)
    if not mine:
        return None
    rows = [t.user_attrs.get(FOLD_SCORES_ATTR) for t in trials if t.state == TrialState.COMPLETE]
    rows = [r for r in rows if r and len(r) == len(mine)]
    if len(rows) < 2:
        return None
    bias = sum(max(r[k] for r in rows) - mine[k] for k in range(len(mine))) / len(mine)
    return best.value - bias


def val_predictions(scores: list) -> dict | None:
    """A trial's validation predictions as a trial attribute: per fold, the labels and the class
    probabilities its score was computed from (`Metrics`, averaged over the score window), rounded
    to 4 decimals; None when a score has none."""
    if not scores or any(m is None or m.probabilities is None or m.labels is None for m in scores):
        return None
    return {"labels": [m.labels.tolist() for m in scores],
            "probabilities": [[[round(float(p), 4) for p in row] for row in m.probabilities] for m in scores]}


def ensemble_score(trials: Iterable[FrozenTrial]) -> float | None:
    """The trials' class probabilities averaged on each fold's validation images, the balanced
    accuracy of their arg-max, and its mean over folds: the ensemble's score as a trial's is scored
    (each member a model that never trained on the fold). None unless every trial has the same
    folds' predictions. Like any selection score it flatters the members it chose."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    records = [t.user_attrs.get(VAL_PREDICTIONS_ATTR) for t in trials]
    if not records or any(r is None or r["labels"] != records[0]["labels"] for r in records):
        return None
    means = [np.mean([r["probabilities"][fold] for r in records], axis=0) for fold in range(len(records[0]["labels"]))]
    scores = [100.0 * balanced_accuracy_score(labels, mean.argmax(axis=1)) for labels, mean in zip(records[0]["labels"], means)]
    return float(np.mean(scores))
