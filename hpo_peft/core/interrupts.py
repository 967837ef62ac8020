"""Stopping cleanly, whatever stops us.

Ctrl-C (SIGINT) and SIGTERM (what schedulers and `docker stop` send) both raise `Interrupted`, a
`KeyboardInterrupt`, once, in the main thread: every `except KeyboardInterrupt` then closes its
trial and runs the same way. Later signals are absorbed while that clean-up runs (a second Ctrl-C
0.2 s after the first must not cut it short), and a watchdog ends the process if the clean-up itself
hangs, so a stop always ends in bounded time. `deferred()` holds a signal back over calls that
must not be split: every call to a store (an exception raised inside a SQLite transaction leaves
the database locked for the clean-up that follows), creating a run and recording its id. The hold
is bounded too: the watchdog starts when the signal arrives, not when the held call returns, so a
stalled store call (a tracking server that stopped answering, retried by MLflow for minutes) never
holds a stop past `HPO_PEFT_STOP_TIMEOUT`; a hold of over two seconds says so in one line.

Optuna logs a trial that raised as failed, with the traceback: for a stop that is one short line.

Worker processes also stop when their parent dies, however it died (`exit_with_parent`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager

from hpo_peft.core.stores import disk_full

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


def _reason_of(signum: int) -> str:
    return reason(Interrupted(signum))


def exit_code(err: BaseException) -> int:
    return 128 + getattr(err, "signum", signal.SIGINT)


class _State:
    stopping = False
    deferring = 0
    pending: int | None = None  # a signal held back by deferred(); its watchdog is already running


def _timer(seconds: float, action) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def _watchdog(signum: int) -> None:
    def expire() -> None:
        if _State.pending is not None:  # the held store call never returned: nothing could be closed
            print(f"hpo-peft: a store call did not return within {STOP_TIMEOUT:.0f} s of the stop; exiting now "
                  "(the next `study run` closes the trial and its runs)", file=sys.stderr, flush=True)
        else:
            print(f"hpo-peft: clean-up took over {STOP_TIMEOUT:.0f} s; exiting now", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    _timer(STOP_TIMEOUT, expire)


def _notice_held(signum: int) -> None:
    """One line if the held call is slow (a store call usually takes milliseconds: no line then)."""
    def notice() -> None:
        if _State.pending == signum and not _State.stopping:
            print(f"hpo-peft: {_reason_of(signum)}; waiting for a store call to return before closing the runs "
                  f"(at most {STOP_TIMEOUT:.0f} s)", file=sys.stderr, flush=True)

    _timer(min(2.0, STOP_TIMEOUT / 4), notice)


def _handler(signum: int, frame) -> None:
    if _State.stopping:
        print("hpo-peft: already stopping; closing the runs first", file=sys.stderr, flush=True)
        return
    if _State.pending is not None:
        print("hpo-peft: already stopping; waiting for a store call first", file=sys.stderr, flush=True)
        return
    if _State.deferring:  # raised when the store call returns, or the watchdog ends the process
        _State.pending = signum
        _watchdog(signum)
        _notice_held(signum)
        return
    _State.stopping = True
    _watchdog(signum)
    raise Interrupted(signum)


class _ShortInterrupts(logging.Filter):
    """Optuna logs a trial whose objective raised as "Trial N failed with parameters: ... because of
    the following error: ..." with the traceback, then "Trial N failed with value None.". For a stop
    that becomes one line, "Trial N interrupted (Ctrl-C)", and for a full disk (which ends the
    session in one line of its own) "Trial N failed: disk full (...)"; other failures in full."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        full = disk_full(err) if isinstance(err, Exception) else None
        if isinstance(err, KeyboardInterrupt) or full is not None:
            number = re.match(r"Trial (\d+) ", str(record.msg))
            self.interrupted = number.group(1) if number else None
            what = f"failed: disk full ({full})" if full is not None else reason(err)
            record.msg = f"Trial {self.interrupted} {what}" if number else what
            record.args, record.exc_info, record.exc_text = (), None, None
            return True
        if self.interrupted is not None and str(record.msg) == f"Trial {self.interrupted} failed with value None.":
            self.interrupted = None
            return False
        return True


_OPTUNA_LOGGER = "optuna.study._optimize"  # a logger's filters see only its own records, not its children's


@contextmanager
def handled():
    """Install the handlers for the duration of a command; the previous ones come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in _SIGNALS}
    _State.stopping, _State.deferring, _State.pending = False, 0, None
    short = _ShortInterrupts()
    logging.getLogger(_OPTUNA_LOGGER).addFilter(short)
    try:
        yield
    finally:
        logging.getLogger(_OPTUNA_LOGGER).removeFilter(short)
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def deferred():
    """A signal arriving inside is raised when the block ends, not in the middle of it; its
    watchdog runs from the signal on, so a block that never ends cannot hold a stop forever.
    Signals are only ever handled in the main thread, so other threads pass straight through."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        if not _State.deferring and _State.pending is not None and not _State.stopping:
            signum = _State.pending
            _State.stopping, _State.pending = True, None  # its watchdog started when it arrived
            raise Interrupted(signum)


def exit_with_parent(poll: float = 1.0) -> None:
    """In a worker process: when the parent process is gone (even SIGKILLed), stop as on SIGTERM."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="hpo-peft-parent-watch", daemon=True).start()
