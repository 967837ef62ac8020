"""Where studies and runs are kept, and opening those stores safely.

Defaults (documented in the README): Optuna's journal file `mlruns/optuna.journal` and MLflow's
SQLite store `mlruns/mlflow.db` (artifacts in `mlruns/artifacts/`), relative to the working folder.

- Several processes may start at once on an empty folder: creating a SQLite store (MLflow's schema
  migrations, Optuna's tables) happens under a file lock beside it, so they never race.
- A server is asked once, with a short timeout and a few tries, before anything is written: an
  unreachable one fails in seconds with one line, instead of the client libraries' long retries.
- Commands that only read (`study best`, `evaluate`) never create a store: a missing one is an error.
- `postgresql://` URLs use whichever PostgreSQL driver is installed (SQLAlchemy 2.1 defaults to
  psycopg 3; the `[postgres]` extra installs psycopg2).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from hpo_peft.errors import UserError

DEFAULT_DIR = Path("mlruns")
PROBE_TRIES = 3
PROBE_TIMEOUT = 3.0  # seconds per try


def default_journal() -> Path:
    return DEFAULT_DIR / "optuna.journal"


def default_tracking_uri() -> str:
    return "sqlite:///" + str((DEFAULT_DIR / "mlflow.db").resolve())


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
        raise UserError(f"{existing}: {what} cannot be written here (permission denied); {hint}")


def check_exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise UserError(f"{path}: no {what} here (has a study run in this folder?); "
                        "pass the same --storage/--tracking-uri as `study run`")


@contextmanager
def lock_for(url: str):
    """Serialise creating (and migrating) a SQLite store file across processes; servers need no lock."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def probe_server(url: str, what: str, flag: str) -> None:
    """An HTTP(S) server answers at all (any status), within PROBE_TRIES short tries."""
    import requests

    started, last = time.monotonic(), ""
    for attempt in range(PROBE_TRIES):
        try:
            requests.get(url.rstrip("/") + "/health", timeout=PROBE_TIMEOUT)
            return
        except requests.RequestException as err:
            last = type(err).__name__ + (": connection refused" if "refused" in str(err).lower() else "")
        if attempt < PROBE_TRIES - 1:
            time.sleep(attempt + 1)
    raise UserError(f"{what} {redact(url)} did not answer ({last}; {PROBE_TRIES} tries in "
                    f"{time.monotonic() - started:.0f} s); start it or point {flag} elsewhere")
