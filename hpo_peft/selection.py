"""Which trial is the best.

The objective is the validation balanced accuracy (with `data.validation: kfold`, its mean over
folds). With a few validation images per class one image moves it by several points, so trials
tie often; ties are broken by the lower validation loss, then by fewer trainable parameters, then
by the earlier trial. Optuna's own `best_trial` would take the first of the tied trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

VAL_LOSS_ATTR = "val_loss"
TRAINABLE_ATTR = "trainable_parameters"


def selection_key(trial: FrozenTrial) -> tuple:
    loss = trial.user_attrs.get(VAL_LOSS_ATTR)
    trainable = trial.user_attrs.get(TRAINABLE_ATTR)
    return (-trial.value, math.inf if loss is None else loss, math.inf if trainable is None else trainable, trial.number)


def select_best(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    return min(completed, key=selection_key) if completed else None
