"""A study's trial budget shared by all its workers (`hpo-peft study worker`, job arrays).

With `study worker`, `--n-trials N` is the study's total, not one worker's share: the trials that
ended (COMPLETE, PRUNED or FAIL) plus those running now. A trial that recovery failed because its
worker died, and queued once more, does not count: its retry takes its place. A worker starts a
trial only while the budget has room, waits while other workers' running trials fill it (one of
them may still die and be retried), and ends when the ended trials reach N.

Workers that check at the same instant may both take the last place (Optuna has no atomic
"create a trial if fewer than N"): a study can end one trial over N per such race.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hpo_peft.recovery import RETRY_OF_ATTR

ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Usage:
    ended: int  # COMPLETE, PRUNED and FAIL, less the failed trials whose retry is queued or ran
    running: int

    def used_up(self, total: int) -> bool:
        return self.ended >= total

    def has_room(self, total: int) -> bool:
        return self.ended + self.running < total


def usage(study: optuna.Study) -> Usage:
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}
    ended = sum(t.state in ENDED and not (t.state == TrialState.FAIL and t.number in retried) for t in trials)
    return Usage(ended=ended, running=sum(t.state == TrialState.RUNNING for t in trials))
