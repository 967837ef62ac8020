"""The study's trial total shared by its workers: what counts, and the lock on the last place."""

from __future__ import annotations

import fcntl

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState, create_trial

from hpo_peft.study.trial_budget import ClaimLock, usage
from hpo_peft.tracking.recovery import RETRY_OF_ATTR


def test_a_retried_failure_does_not_count_twice():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL):
        study.add_trial(create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                     params={"x": 0.1}, distributions=dist))
    study.enqueue_trial({"x": 0.1}, user_attrs={RETRY_OF_ATTR: 2})  # trial 2's worker died: its retry waits
    counted = usage(study)
    assert (counted.ended, counted.running) == (3, 0)  # the dead worker's trial makes room for its retry
    assert counted.has_room(4) and not counted.used_up(4) and counted.used_up(3) and not counted.has_room(3)
    trial = study.ask()  # the retry runs
    assert trial.user_attrs[RETRY_OF_ATTR] == 2 and usage(study).running == 1
    study.tell(trial, 0.7)
    assert usage(study).ended == 4 and usage(study).used_up(4)


def test_the_last_place_is_claimed_under_a_file_lock_beside_a_journal(tmp_path):
    journal = tmp_path / "optuna.journal"
    with ClaimLock(str(journal), "s") as claim:
        with open(tmp_path / "optuna.journal.budget.lock", "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        claim.release()  # once the worker's trial exists
        with open(tmp_path / "optuna.journal.budget.lock", "a") as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_last_place_is_claimed_under_a_postgresql_advisory_lock(postgres_url):
    engine = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)

    def others_can_take(study_name: str) -> bool:
        from hpo_peft.study.trial_budget import lock_key

        with engine.connect() as other:
            taken = other.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(study_name)}).scalar()
            if taken:
                other.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(study_name)})
            return taken

    with ClaimLock(postgres_url, "study-a") as claim:
        assert not others_can_take("study-a") and others_can_take("study-b")  # one lock per study
        claim.release()
        assert others_can_take("study-a")
    engine.dispose()
