"""A study's trial budget shared by all its workers (`hpo-peft study worker`, job arrays).

With `study worker`, `--n-trials N` is the study's total, not one worker's share: the trials that
ended (COMPLETE, PRUNED or FAIL) plus those running now. A trial that recovery failed because its
worker died, and queued once more, does not count: its retry takes its place. A worker starts a
trial only while the budget has room, waits while other workers' running trials fill it (one of
them may still die and be retried), and ends when the ended trials reach N.

Optuna has no atomic "create a trial if fewer than N": a lock on the study (`ClaimLock`) is held from
the check until the worker's trial exists, so two workers never both take the last place.
"""

from __future__ import annotations

import fcntl
import hashlib
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo_peft.core import stores
from hpo_peft.tracking.recovery import RETRY_OF_ATTR

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


class ClaimLock:
    """Held from the budget check until this worker's next trial exists, so two workers never both
    take the last place: a PostgreSQL advisory lock (any host) or a file lock beside a journal or
    SQLite file (one machine or a shared file system). Other databases: no lock (a race is possible)."""

    def __init__(self, storage_url: str | None, study_name: str):
        self.url, self.study_name = storage_url, study_name
        self._release = None

    def __enter__(self) -> "ClaimLock":
        path = stores.journal_path(self.url)
        url = None if path is not None else stores.database_url(self.url)
        if path is None and url is not None:
            path = stores.sqlite_path(url)
        if path is not None:
            self._release = _file_lock(path.with_name(path.name + ".budget.lock"))
        elif url.startswith("postgresql"):
            self._release = _advisory_lock(url, self.study_name)
        return self

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __exit__(self, *exc) -> None:
        self.release()


def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    fcntl.flock(handle, fcntl.LOCK_EX)

    def release() -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    return release


def lock_key(study_name: str) -> int:
    """The study's PostgreSQL advisory lock (a signed 64-bit number); the key's text keeps the
    module's former name, so workers of an older version share the same lock."""
    return int.from_bytes(hashlib.sha256(f"hpo_peft.study.budget:{study_name}".encode()).digest()[:8], "big", signed=True)


def _advisory_lock(url: str, study_name: str):
    import sqlalchemy

    key = lock_key(study_name)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    connection = engine.connect()
    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})

    def release() -> None:
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:  # closing the connection releases the lock in any case
            connection.close()
            engine.dispose()

    return release
