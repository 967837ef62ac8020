"""Ctrl-C and SIGTERM, end to end: a stop is never held by a stalled store call, prints one line
(no traceback), and a `--jobs` parent passes on the signal it got. Real subprocesses and signals,
and a real `mlflow server` that is SIGSTOPped mid-trial."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from test_faults import wait_gone, worker_pids
from test_robustness import QUICK_SEARCH, SLOW, all_runs, assert_consistent, cli, wait_for_running_trial
from test_server import MlflowServer

from hpo_peft.core import interrupts
from hpo_peft.app.commands import prepare_study_config
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.study.session import StudyLocation, load_study, run_study

ONE_LINE = "hpo-peft: interrupted (Ctrl-C); runs closed"
HELD = "waiting for a store call to return"


def held_stop(seconds_inside: float, stop_timeout: int) -> subprocess.CompletedProcess:
    """A process that gets Ctrl-C inside a store call (deferred()) lasting `seconds_inside`."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from hpo_peft.core import interrupts
        with interrupts.handled():
            try:
                with interrupts.deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep({seconds_inside})
                print("not raised")
            except KeyboardInterrupt as err:
                print("raised after the call:", interrupts.reason(err))
        """)
    env = {**os.environ, "HPO_PEFT_STOP_TIMEOUT": str(stop_timeout)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_a_held_signal_is_raised_after_a_quick_call_and_bounded_by_the_watchdog_in_a_stalled_one():
    quick = held_stop(0.2, 30)
    assert quick.returncode == 0, quick.stderr
    assert quick.stdout.strip() == "raised after the call: interrupted (Ctrl-C)"
    assert quick.stderr == ""  # a store call of the usual length: no line about waiting for it

    started = time.monotonic()
    stalled = held_stop(600, 4)  # a store call that does not return (MLflow's retries: minutes)
    assert stalled.returncode == 130, stalled.stderr
    assert time.monotonic() - started < 60  # the watchdog's 4 s (and the start-up), not the call's 600 s
    assert stalled.stdout == ""
    lines = stalled.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in stalled.stderr, stalled.stderr
    assert lines[0] == f"hpo-peft: interrupted (Ctrl-C); {HELD} before closing the runs (at most 4 s)"
    assert lines[1].startswith("hpo-peft: a store call did not return within 4 s of the stop; exiting now")


def test_optuna_logs_an_interrupted_trial_in_one_line_and_a_failed_one_in_full():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.extend(self.format(record).splitlines())

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        raise objective.error

    study = optuna.create_study()
    collect = Collect()
    logger = logging.getLogger("optuna")  # where Optuna's own handler sits (it does not propagate)
    logger.addHandler(collect)
    try:
        with interrupts.handled():
            objective.error = RuntimeError("CUDA out of memory")
            study.optimize(objective, n_trials=1, catch=(Exception,))
            failed = list(lines)
            lines.clear()
            objective.error = interrupts.Interrupted(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                study.optimize(objective, n_trials=1, catch=(Exception,))
            interrupted = list(lines)
            lines.clear()
            try:  # a full disk: the session ends with its own line (test_stores.py); the trial's is short
                open("/dev/full", "wb").write(b"x" * 1_000_000)
            except OSError as err:
                objective.error = RuntimeError("logging failed")
                objective.error.__cause__ = err
            study.optimize(objective, n_trials=1, catch=(Exception,))
    finally:
        logger.removeHandler(collect)
    assert failed[0].startswith("Trial 0 failed with parameters: {'x': ") and "Traceback" in failed[1]
    assert "RuntimeError: CUDA out of memory" in failed and failed[-1] == "Trial 0 failed with value None."
    assert interrupted == ["Trial 1 interrupted (Ctrl-C)"]
    assert lines == ["Trial 2 failed: disk full (No space left on device)"]


@pytest.fixture
def slow(write_config, tmp_path):
    config = write_config("study.yaml", search=QUICK_SEARCH)
    return config, StudyLocation("signals", storage=str(tmp_path / "optuna.journal"),
                                 tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))


@pytest.mark.slow
def test_ctrl_c_to_a_jobs_parent_is_ctrl_c_on_its_workers_trials_in_one_line(slow):
    """Only the parent gets SIGINT (not a terminal's process group): it passes SIGINT on, the
    workers record "interrupted (Ctrl-C)", and nothing prints Optuna's traceback of the interrupt."""
    config, options = slow
    process = subprocess.Popen(cli(config, options, "--n-trials", "2", "--jobs", "2", *SLOW),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(running := [t for t in trials_of(options)
                              if t.state.name == "RUNNING" and RUN_ID_ATTR in t.user_attrs]) < 2:
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "the two workers did not both start a trial"
            time.sleep(0.3)
        wait_for_running_trial(options, process)  # and train an epoch or two
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.splitlines().count(ONE_LINE) == 1, err[-3000:]
    wait_gone(worker_pids(options))
    study, runs = assert_consistent(options)
    assert len({t.user_attrs["worker"]["pid"] for t in running}) == 2
    assert [(t.state.name, t.user_attrs["fail_reason"]) for t in study.trials] == [("FAIL", "interrupted (Ctrl-C)")] * 2
    by_id = {r.info.run_id: r for r in runs}
    assert all(by_id[t.user_attrs[RUN_ID_ATTR]].info.status == "KILLED" for t in study.trials)
    sessions = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"]
    assert [(s.info.status, s.data.tags["hpo_peft.error"]) for s in sessions] == [("KILLED", "interrupted (Ctrl-C)")]


def trials_of(options):
    try:
        return load_study(options).trials
    except Exception:  # the study may not exist yet
        return []


def wait_for_stall(options, process, number: int, timeout: float = 240) -> None:
    """Until the trial's epochs stop: its main thread waits for the stopped server (each epoch
    logs its metrics, then reports to Optuna's journal). Quiet for 4 epochs' time, and 5 s at least."""
    def reported():
        return len(load_study(options).trials[number].intermediate_values)

    seen, since, epoch = reported(), time.monotonic(), 1.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        now = reported()
        if now != seen:
            epoch = max(epoch, (time.monotonic() - since) / (now - seen))  # the slowest epoch seen
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > max(5.0, 4 * epoch):
            return
        time.sleep(0.2)
    pytest.fail("the trial went on training with the server stopped")


@pytest.mark.service
@pytest.mark.slow
def test_ctrl_c_while_the_tracking_server_is_stopped_ends_within_the_stop_timeout(write_config, tmp_path):
    """The server SIGSTOPped mid-trial: the study's store call waits (MLflow retries for minutes).
    Ctrl-C (twice) ends it within HPO_PEFT_STOP_TIMEOUT with one line saying why it waited; once
    the server answers again, the next session closes the trial and every run."""
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(f"sqlite:///{folder}/mlflow.db", folder)
    server.start()
    config = write_config("study.yaml", search=QUICK_SEARCH)
    options = StudyLocation("stalled", storage=str(tmp_path / "optuna.journal"), tracking_uri=server.url)
    env = {**os.environ, "HPO_PEFT_STOP_TIMEOUT": "10"}
    process = subprocess.Popen(cli(config, options, "--n-trials", "1", *SLOW), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    stopped = False
    try:
        trial = wait_for_running_trial(options, process, timeout=300)
        os.killpg(server.process.pid, signal.SIGSTOP)
        stopped = True
        wait_for_stall(options, process, trial.number)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # as the probe did: the second is absorbed too
        _, err = process.communicate(timeout=60)  # MLflow's retries would hold it for minutes
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        if stopped:
            os.killpg(server.process.pid, signal.SIGCONT)
    try:
        assert process.returncode == 130, err[-3000:]
        assert took < 60 and "Traceback" not in err, err[-3000:]
        held = [line for line in err.splitlines() if HELD in line]
        assert held == [f"hpo-peft: interrupted (Ctrl-C); {HELD} before closing the runs (at most 10 s)"], err[-3000:]
        assert "hpo-peft: a store call did not return within 10 s of the stop; exiting now" in err, err[-3000:]

        # the server answers again: the next session recovers the trial, and no run stays RUNNING
        run_study(prepare_study_config(config, []), options, n_trials=1, timeout=None, accept_changes=True)
        study, runs = assert_consistent(options)
        stale = study.trials[trial.number]
        assert stale.state.name == "FAIL" and "worker stopped" in stale.user_attrs["fail_reason"]
        assert study.trials[-1].user_attrs.get("retry_of") == trial.number
        assert study.trials[-1].state.name == "COMPLETE"
        by_id = {r.info.run_id: r for r in all_runs(options)}
        assert by_id[stale.user_attrs[RUN_ID_ATTR]].info.status == "KILLED"
        sessions = sorted((r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"),
                          key=lambda r: r.info.start_time)
        assert [s.info.status for s in sessions] == ["KILLED", "FINISHED"]
    finally:
        server.stop()
