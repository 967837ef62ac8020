"""A session's compute budget: `study run --budget 300e | 20m | 90s`, or `search.budget`.

`300e` counts the epochs the session's trials trained, every one of them: holdout's epochs (and its
refit's, with `data.refit`), kfold's epochs of every fold and its refit; a pruned or failed trial
counts the epochs it ran. `20m` / `90s` / `2h` count the trials' own training time (`run_trial`,
from its start to its end or its failure), not the model load or the time between trials. Each
trial records both on itself (user attrs `epochs_trained`, `train_seconds`) and on its MLflow run
(metrics of the same names), so a session with workers (`--jobs`) counts every worker's trials, and
a resumed study can tell what all its sessions spent.

The session starts no new trial once its trials have spent the budget (a running trial finishes):
an Optuna callback calls `study.stop()` after the trial that spent it.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Iterable

import optuna

from hpo_peft.fewshot.validation import Scheme
from hpo_peft.core import interrupts
from hpo_peft.core.config import SearchConfig
from hpo_peft.core.errors import UserError
from hpo_peft.core.runtime import worker_identity

EPOCHS_ATTR = "epochs_trained"
SECONDS_ATTR = "train_seconds"
SESSION_ATTR = "hpo_peft.session"  # {"run": the session's parent run, "launcher": "host:pid" of the command}
UNITS = {"e": ("epochs", EPOCHS_ATTR, 1.0), "s": ("seconds", SECONDS_ATTR, 1.0),
         "m": ("minutes", SECONDS_ATTR, 60.0), "h": ("hours", SECONDS_ATTR, 3600.0)}
NO_TRIAL_LIMIT = 10**9  # a budget without --n-trials: the budget (or --timeout) ends the session


@dataclass(frozen=True)
class Budget:
    amount: float
    unit: str  # e, s, m or h

    @property
    def attr(self) -> str:
        return UNITS[self.unit][1]

    def spent(self, trials: Iterable[optuna.trial.FrozenTrial]) -> float:
        """What those trials spent, in the budget's unit."""
        return sum(float(t.user_attrs.get(self.attr, 0.0)) for t in trials) / UNITS[self.unit][2]

    def callback(self, parent_id: str):
        """`study.optimize(callbacks=[...])`: no new trial once the session's trials (every worker's:
        they share `parent_id`) spent it."""
        def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if self.spent(session_trials(study.get_trials(deepcopy=False), parent_id)) >= self.amount:
                study.stop()

        return stop

    def line(self, trials: list[optuna.trial.FrozenTrial]) -> str:
        """`budget: 312 of 300 epochs spent over 9 trials`."""
        spent = f"{self.spent(trials):,.0f}" if self.unit == "e" else f"{self.spent(trials):,.1f}"
        return f"budget: {spent} of {self.amount:,g} {UNITS[self.unit][0]} spent over {len(trials)} " \
               f"trial{'' if len(trials) == 1 else 's'}"


def parse(text: str | None, key: str = "search.budget") -> Budget | None:
    if text is None:
        return None
    try:
        return Budget(*SearchConfig.parse_budget(text))
    except ValueError as err:
        raise UserError(f"{key}: {err}") from None


def callbacks(budget: str | None, parent_id: str) -> list:
    """`search.budget`'s callback for the session `parent_id`, or none without a budget."""
    spend = parse(budget)
    return [] if spend is None else [spend.callback(parent_id)]


def launcher() -> str:
    """The command that started the session: this process, or the `--jobs` parent of a worker."""
    parent = multiprocessing.parent_process()
    return f"{worker_identity()['host']}:{parent.pid if parent is not None else worker_identity()['pid']}"


def session_trials(trials: Iterable[optuna.trial.FrozenTrial], parent_id: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.user_attrs.get(SESSION_ATTR, {}).get("run") == parent_id]


def launched_here(trials: Iterable[optuna.trial.FrozenTrial], before: set[int]) -> list[optuna.trial.FrozenTrial]:
    """The trials this command's session ran: new since `before` (the numbers that existed), started by it."""
    me = launcher()
    return [t for t in trials if t.number not in before and t.user_attrs.get(SESSION_ATTR, {}).get("launcher") == me]


def study_line(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """What every session of the study trained, when any trial recorded it."""
    counted = [t for t in trials if EPOCHS_ATTR in t.user_attrs]
    if not counted:
        return None
    epochs = sum(int(t.user_attrs[EPOCHS_ATTR]) for t in counted)
    seconds = sum(float(t.user_attrs.get(SECONDS_ATTR, 0.0)) for t in counted)
    took = f"{seconds / 60:,.1f} minutes" if seconds >= 60 else f"{seconds:.1f} seconds"
    return f"the study so far: {epochs:,} epochs and {took} of training over {len(counted)} trials"


class TrialSpending:
    """What one trial spends, from its creation (just before `run_trial`): the objective counts each
    epoch it sees (`saw`), and records them, with the refit's, on the trial and its run once (`record`)."""

    def __init__(self, parent_id: str, scheme: Scheme):
        self.parent_id, self.scheme, self.epochs, self.seconds = parent_id, scheme, 0, 0.0
        self._started, self._recorded = time.perf_counter(), False

    def saw(self, metrics) -> None:
        """`on_epoch`'s metrics: kfold reports each fold's epoch, then (fold None) their mean, which trained nothing."""
        if metrics.fold is not None or not self.scheme.folds_are_scored:
            self.epochs += 1

    def refit(self, outcome) -> None:
        if outcome.refit:  # trained blind for the chosen epochs, seen by no on_epoch
            self.epochs += int(outcome.selected_epoch or 0)

    def record(self, trial: optuna.Trial, tracker, run_id: str | None, outcome=None, quiet: bool = False) -> None:
        """On the trial (user attrs) and its run (metrics), once; `outcome` (a trial that returned) adds
        its refit. `quiet`: a trial already failing (pruned, an error, a stop) keeps its own error."""
        if self._recorded:
            return
        self._recorded, self.seconds = True, time.perf_counter() - self._started
        if outcome is not None:
            self.refit(outcome)
        try:
            with interrupts.deferred():  # the journal is written whole
                trial.set_user_attr(SESSION_ATTR, session_attr(self.parent_id))
                trial.set_user_attr(EPOCHS_ATTR, self.epochs)
                trial.set_user_attr(SECONDS_ATTR, round(self.seconds, 3))
                if run_id is not None:
                    tracker.log_metrics(run_id, {EPOCHS_ATTR: self.epochs, SECONDS_ATTR: self.seconds})
        except Exception:
            if not quiet:
                raise


def session_attr(parent_id: str) -> dict[str, str]:
    return {"run": parent_id, "launcher": launcher()}
