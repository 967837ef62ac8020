"""Where studies and runs are kept, and opening those stores safely.

Defaults (documented in docs/tracking-and-ui.md): Optuna's journal file `mlruns/optuna.journal` and MLflow's
SQLite store `mlruns/mlflow.db` (artifacts in `mlruns/artifacts/`), relative to the working folder;
`OPTUNA_STORAGE` and `MLFLOW_TRACKING_URI` replace them where they are set.

- Several processes may start at once on an empty folder: creating a SQLite store (MLflow's schema
  migrations, Optuna's tables) happens under a file lock beside it, so they never race.
- A server is asked once, with a short timeout and a few tries, before anything is written: an
  unreachable one fails in seconds with one line, instead of the client libraries' long retries.
- Commands that only read (`study best`, `evaluate`) never create a store: a missing one is an error,
  and a read-only one is read.
- A journal whose last record was cut short (a full disk, a power loss, SIGKILL in a write) is
  mended before anything is appended after it: the torn bytes go to a side file, named in one line.
- `postgresql://` URLs use whichever PostgreSQL driver is installed (SQLAlchemy 2.1 defaults to
  psycopg 3; the `[postgres]` extra installs psycopg2).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from hpo_peft.core.errors import UserError

DEFAULT_DIR = Path("mlruns")
PROBE_TRIES = 3
PROBE_TIMEOUT = 3.0  # seconds per try


# The ecosystem's own variables, read wherever no flag (or, for MLflow, config) value is given:
# flag > config (`tracking.uri`) > environment > the defaults here. MLflow's clients read
# MLFLOW_REGISTRY_URI themselves (the registry is the tracking store unless it is set).
TRACKING_ENV = "MLFLOW_TRACKING_URI"
STORAGE_ENV = "OPTUNA_STORAGE"


def default_journal() -> Path:
    return DEFAULT_DIR / "optuna.journal"


def default_storage() -> str | None:
    """`OPTUNA_STORAGE` where it is set; None means the default journal file."""
    return os.environ.get(STORAGE_ENV) or None


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` where it is set, else the SQLite store `mlruns/mlflow.db`."""
    return os.environ.get(TRACKING_ENV) or "sqlite:///" + str((DEFAULT_DIR / "mlflow.db").resolve())


def journal_path(url: str | None) -> Path | None:
    """The journal file a `--storage` value names, or None for a database URL."""
    if url is None:
        return default_journal()
    if url.endswith(".journal") or url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    return None


def sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def database_url(url: str) -> str:
    """`postgresql://` with the PostgreSQL driver that is installed; other URLs unchanged."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise UserError(f"{redact(url)}: no PostgreSQL driver installed; run `pip install \"hpo-peft[postgres]\"` (psycopg2)")


def disk_full(err: BaseException | None) -> str | None:
    """What a full disk (or quota) refused, if that is what raised `err` (its whole chain is read:
    MLflow wraps SQLite's error, Optuna re-raises ours); None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{err.filename}: {err.strerror}" if err.filename else str(err.strerror)
        if "database or disk is full" in str(err) or "No space left on device" in str(err):
            return "the SQLite store: database or disk is full" if "database" in str(err) else "no space left on device"
        err = err.__cause__ or err.__context__
    return None


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def check_writable(folder: Path, what: str, hint: str) -> None:
    """The folder (or the nearest existing folder above it, where it will be created) is writable."""
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise UserError(f"{existing}: {what} cannot be written here ({why}); {hint}")


def check_exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise UserError(f"{path}: no {what} here (has a study run in this folder?); "
                        "pass the same --storage/--tracking-uri as `study run`")


@contextmanager
def lock_for(url: str):
    """Serialise creating (and migrating) a SQLite store file across processes; servers need no lock,
    nor does an existing store in a folder that cannot be written (nothing can be created there)."""
    path = sqlite_path(url)
    if path is None or (path.is_file() and not os.access(path.parent, os.W_OK)):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def probe_server(url: str, what: str, flag: str, api: str = "/health") -> None:
    """An HTTP(S) server answers within PROBE_TRIES short tries, and `api` answers as that server
    would: JSON (or a request for credentials, which its client then sends), not another web
    server's page."""
    import requests

    started, last = time.monotonic(), ""
    for attempt in range(PROBE_TRIES):
        try:
            answer = requests.get(url.rstrip("/") + api, timeout=PROBE_TIMEOUT)
            break
        except requests.RequestException as err:
            last = type(err).__name__ + (": connection refused" if "refused" in str(err).lower() else "")
        if attempt < PROBE_TRIES - 1:
            time.sleep(attempt + 1)
    else:
        raise UserError(f"{what} {redact(url)} did not answer ({last}; {PROBE_TRIES} tries in "
                        f"{time.monotonic() - started:.0f} s); start it or point {flag} elsewhere")
    if answer.status_code in (401, 403):
        return
    try:
        answer.json()
    except ValueError:
        raise UserError(f"{redact(url)} answers, but not as an {what} (HTTP {answer.status_code} for {api.split('?')[0]}, "
                        f"no JSON); check {flag}") from None


def journal_backend(path: Path):
    """Optuna's journal file, whose torn tail is mended under the journal's own lock before each
    append: Optuna reads past a half-written last line, but appends right after it, and from then
    on no command can read the journal."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    class MendingBackend(JournalFileBackend):
        def __init__(self, file_path: str):
            self._mending_lock = JournalFileSymlinkLock(file_path)
            super().__init__(file_path, lock_obj=self._mending_lock)

        def append_logs(self, logs: list[dict]) -> None:
            self._mending_lock.acquire()
            try:
                mend_torn_tail(Path(self._file_path))
                data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
                with open(self._file_path, "ab") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                self._mending_lock.release()

    return MendingBackend(str(path))


def mend_torn_tail(path: Path, chunk: int = 1 << 20) -> int:
    """Bytes after the journal's last newline: a whole record lacking only its newline gets one;
    anything else is moved to `<journal>.torn` (appended, never overwritten) and cut off, said in
    one line. Returns the number of bytes moved."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:  # the last newline, reading backwards
            start = max(0, end - chunk)
            handle.seek(start)
            found = handle.read(end - start).rfind(b"\n")
            if found >= 0:
                end = start + found + 1
                break
            end = start
        if end == size:
            return 0
        handle.seek(end)
        tail = handle.read()
        try:
            json.loads(tail)
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")  # the write stopped just before its newline
            return 0
        except ValueError:
            pass
        side = path.with_name(path.name + ".torn")
        with open(side, "ab") as kept:
            kept.write(tail + b"\n")
            kept.flush()
            os.fsync(kept.fileno())
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())
    print(f"hpo-peft: {path} ended in a half-written record ({len(tail)} bytes, from a write cut short by a "
          f"full disk, a power loss or a killed process); moved to {side}, the study goes on from the last "
          "whole record", file=sys.stderr, flush=True)
    return len(tail)
