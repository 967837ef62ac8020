"""Stopping cleanly, whatever stops us.

Ctrl-C (SIGINT) and SIGTERM (what schedulers and `docker stop` send) both raise `Interrupted`, a
`KeyboardInterrupt`, once, in the main thread: every `except KeyboardInterrupt` then closes its
trial and runs the same way. Later signals are absorbed while that clean-up runs (a second Ctrl-C
0.2 s after the first must not cut it short), and a watchdog ends the process if the clean-up itself
hangs, so a stop always ends in bounded time. `deferred()` holds a signal back over calls that
must not be split: every call to a store (an exception raised inside a SQLite transaction leaves
the database locked for the clean-up that follows), creating a run and recording its id.

Worker processes also stop when their parent dies, however it died (`exit_with_parent`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

STOP_TIMEOUT = float(os.environ.get("HPO_PEFT_STOP_TIMEOUT", "60"))  # seconds the clean-up may take
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop requested by a signal; `signal_name` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def reason(err: BaseException) -> str:
    """What to record on a trial and its run: `interrupted (SIGTERM)`, `interrupted (Ctrl-C)`."""
    name = getattr(err, "signal_name", "SIGINT")
    return f"interrupted ({'Ctrl-C' if name == 'SIGINT' else name})"


def exit_code(err: BaseException) -> int:
    return 128 + getattr(err, "signum", signal.SIGINT)


class _State:
    stopping = False
    deferring = 0
    pending: int | None = None


def _watchdog(signum: int) -> None:
    def expire() -> None:
        print(f"hpo-peft: clean-up took over {STOP_TIMEOUT:.0f} s; exiting now", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    timer = threading.Timer(STOP_TIMEOUT, expire)
    timer.daemon = True
    timer.start()


def _handler(signum: int, frame) -> None:
    if _State.stopping:
        print("hpo-peft: already stopping; closing the runs first", file=sys.stderr, flush=True)
        return
    if _State.deferring:
        _State.pending = signum
        return
    _State.stopping = True
    _watchdog(signum)
    raise Interrupted(signum)


@contextmanager
def handled():
    """Install the handlers for the duration of a command; the previous ones come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in _SIGNALS}
    _State.stopping, _State.deferring, _State.pending = False, 0, None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def deferred():
    """A signal arriving inside is raised when the block ends, not in the middle of it. Signals
    are only ever handled in the main thread, so other threads pass straight through."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        if not _State.deferring and _State.pending is not None and not _State.stopping:
            signum, _State.pending = _State.pending, None
            _State.stopping = True
            _watchdog(signum)
            raise Interrupted(signum)


def exit_with_parent(poll: float = 1.0) -> None:
    """In a worker process: when the parent process is gone (even SIGKILLed), stop as on SIGTERM."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="hpo-peft-parent-watch", daemon=True).start()
