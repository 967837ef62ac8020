"""Nothing lost, nothing repeated, nothing hangs: the faults found by probing the CLI, each checked
by the state it leaves (real subprocesses and signals where the fault is about them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_robustness import (
    QUICK_SEARCH,
    SLOW,
    all_runs,
    assert_consistent,
    cli,
    wait_for_running_trial,
)

from hpo_peft.app.cli import main
from hpo_peft.app.commands import prepare_study_config
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.study.session import StudyLocation, load_study, run_study

# cheap trials (a head on cached features) whose parameters are continuous: equal draws mean a replay
DRAWS = {
    "n_trials": 4,
    "sampler": {"name": "tpe", "n_startup_trials": 10},
    "pruner": {"name": "none"},
    "params": {"method": "zs_linear_probe", "learning_rate": {"low": 0.0001, "high": 0.1, "log": True},
               "max_epochs": 2, "patience": None},
    "heartbeat_interval": 1.0,
}


@pytest.fixture
def draws(write_config, tmp_path):
    config = write_config("draws.yaml", search=DRAWS)
    return config, StudyLocation("draws", storage=str(tmp_path / "optuna.journal"),
                                tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))


@pytest.fixture
def slow(write_config, tmp_path):
    config = write_config("study.yaml", search=QUICK_SEARCH)
    return config, StudyLocation("robust", storage=str(tmp_path / "optuna.journal"),
                                tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))


def learning_rates(options):
    return [t.params["learning_rate"] for t in load_study(options).trials]


def one_error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hpo-peft: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# nothing repeated -------------------------------------------------------------------------------
@pytest.mark.slow
def test_resumed_sessions_draw_new_parameters_and_a_rerun_draws_the_same(draws, tmp_path):
    config, options = draws
    run_study(prepare_study_config(config, []), options, n_trials=2, timeout=None)
    run_study(prepare_study_config(config, []), options, n_trials=2, timeout=None)  # still in TPE's start-up
    first = learning_rates(options)
    assert len(set(first)) == 4, first
    again = StudyLocation("again", storage=str(tmp_path / "again.journal"), tracking_uri=options.tracking_uri)
    run_study(prepare_study_config(config, []), again, n_trials=4, timeout=None)
    assert learning_rates(again) == first  # reproducible from the study's seed


@pytest.mark.slow
def test_jobs_and_separate_commands_never_replay_each_other(draws):
    config, options = draws
    jobs = subprocess.run(cli(config, options, "--n-trials", "4", "--jobs", "2"), capture_output=True, text=True)
    assert jobs.returncode == 0, jobs.stderr
    commands = [subprocess.Popen(cli(config, options, "--n-trials", "2"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for command in commands:
        _, err = command.communicate(timeout=300)
        assert command.returncode == 0, err
    study, _ = assert_consistent(options)
    rates = learning_rates(options)
    assert len(study.trials) == 8 and len(set(rates)) == 8, rates


# nothing lost: stores ---------------------------------------------------------------------------
@pytest.mark.slow
def test_three_commands_start_together_in_an_empty_folder(write_config, tmp_path):
    config = write_config("draws.yaml", search={**DRAWS, "n_trials": 1})
    folder = tmp_path / "empty"
    folder.mkdir()
    argv = [sys.executable, "-m", "hpo_peft.app.cli", "study", "run", str(config), "--storage", "sqlite:///optuna.db"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    processes = [subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    options = StudyLocation("demo", storage=f"sqlite:///{folder}/optuna.db", tracking_uri=f"sqlite:///{folder}/mlruns/mlflow.db")
    study, runs = assert_consistent(options)
    assert len(study.trials) == 3
    assert len([r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"]) == 3


@pytest.mark.slow
def test_mlflow_stores_created_by_many_processes_at_once(tmp_path):
    """The schema race itself, without model loading in between: 4 processes open a new SQLite
    store at the same instant, in 3 fresh folders. Each process says when it has imported MLflow;
    the 4 are let go together once every one has (however long a busy machine takes)."""
    code = ("import sys, time, pathlib\nfrom hpo_peft.tracking.tracker import Tracker\n"
            "pathlib.Path(sys.argv[3]).touch()\n"
            "go = pathlib.Path(sys.argv[2])\nwhile not go.exists(): time.sleep(0.01)\n"
            "Tracker('sqlite:///' + sys.argv[1], experiment='x').experiment_id\n")
    for round_ in range(3):
        db, go = tmp_path / f"r{round_}" / "mlflow.db", tmp_path / f"go{round_}"
        ready = [tmp_path / f"ready{round_}-{n}" for n in range(4)]
        processes = [subprocess.Popen([sys.executable, "-c", code, str(db), str(go), str(r)], stderr=subprocess.PIPE,
                                      text=True) for r in ready]
        deadline = time.monotonic() + 300
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in processes), "a process ended before the start"
            assert time.monotonic() < deadline, "the processes did not import MLflow in 5 minutes"
            time.sleep(0.05)
        go.touch()
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_fast_and_writes_nothing(slow, tmp_path):
    config, options = slow
    uri = f"http://127.0.0.1:{closed_port()}"
    result = subprocess.run(cli(config, StudyLocation("robust", options.storage, uri)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"MLflow tracking server {uri} did not answer" in line and "3 tries in" in line
    assert not Path(options.storage).exists()


@pytest.mark.slow
def test_an_unreachable_database_fails_fast_and_writes_nothing(slow, tmp_path):
    config, options = slow
    url = f"postgresql+psycopg2://postgres:secret@127.0.0.1:{closed_port()}/db"
    result = subprocess.run(cli(config, StudyLocation("robust", url, options.tracking_uri)), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "Optuna storage postgresql+psycopg2://postgres:***@127.0.0.1" in line and "secret" not in line
    assert not (tmp_path / "mlflow.db").exists()


def test_a_plain_postgresql_url_uses_the_installed_driver(draws, postgres_url, capsys):
    config, options = draws
    plain = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    code = main(["study", "run", str(config), "--n-trials", "1", "--study-name", "plain", "--storage", plain,
                 "--tracking-uri", options.tracking_uri])
    assert code == 0, capsys.readouterr().err
    assert len(load_study(StudyLocation("plain", storage=plain)).trials) == 1


def test_reading_commands_write_nothing_where_nothing_ran(write_config, tmp_path, monkeypatch, capsys):
    config = write_config()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for command in (["study", "best", str(config)], ["evaluate", str(config)]):
        assert main(command) == 2
        assert "no study storage here" in one_error_line(capsys.readouterr().err)
    assert list(empty.iterdir()) == []


def in_read_only(folder: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run argv with `folder` mounted read-only (a private mount namespace; root bypasses modes)."""
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" "{folder}" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_a_read_only_working_folder_is_one_line(slow, tmp_path):
    config, _ = slow
    folder = tmp_path / "readonly"
    folder.mkdir()
    result = in_read_only(folder, [sys.executable, "-m", "hpo_peft.app.cli", "study", "run", str(config)], folder)
    assert result.returncode == 2
    assert "cannot be written here" in one_error_line(result.stderr)
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_read_only_artifacts_leave_no_run_open(slow, tmp_path):
    config, options = slow
    (tmp_path / "artifacts").mkdir()
    result = in_read_only(tmp_path / "artifacts", cli(config, options), tmp_path)
    assert result.returncode == 2
    assert "artifacts" in one_error_line(result.stderr)
    assert not Path(options.storage).exists()


def test_a_parent_run_is_closed_when_logging_its_config_fails(slow, monkeypatch):
    from hpo_peft.tracking.tracker import Tracker

    config, options = slow

    def broken(self, run_id, data, path):
        raise OSError(f"cannot write {path}")

    monkeypatch.setattr(Tracker, "log_dict", broken)
    with pytest.raises(OSError):
        run_study(prepare_study_config(config, []), options, n_trials=1, timeout=None)
    assert [r.info.status for r in all_runs(options)] == ["FAILED"]


def test_evaluate_says_a_pruned_trial_was_pruned(write_config, tmp_path, capsys):
    search = {**QUICK_SEARCH, "n_trials": 1, "pruner": {"name": "threshold", "lower": 101.0}}
    config = write_config("pruned.yaml", search=search)
    options = StudyLocation("pruned", storage=str(tmp_path / "p.journal"), tracking_uri="sqlite:///" + str(tmp_path / "p.db"))
    study = run_study(prepare_study_config(config, []), options, n_trials=1, timeout=None)
    run_id = study.trials[0].user_attrs[RUN_ID_ATTR]
    code = main(["evaluate", str(config), "--run-id", run_id, "--study-name", "pruned", "--storage", options.storage,
                 "--tracking-uri", options.tracking_uri])
    assert code == 2
    assert f"run {run_id} is trial 0, which was pruned at epoch 1" in one_error_line(capsys.readouterr().err)


def test_a_negative_timeout_is_refused_before_anything_is_written(slow, capsys):
    config, options = slow
    code = main(["study", "run", str(config), "--timeout", "-5", "--storage", options.storage,
                 "--tracking-uri", options.tracking_uri])
    assert code == 2 and "--timeout must be a positive" in one_error_line(capsys.readouterr().err)
    assert not Path(options.storage).exists()


# nothing hangs: signals -------------------------------------------------------------------------
def start_mid_trial(config, options, *extra):
    process = subprocess.Popen(cli(config, options, "--n-trials", "2", *SLOW, *extra), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return process, wait_for_running_trial(options, process)


def assert_closed_like_ctrl_c(options, trial, reason):
    study, runs = assert_consistent(options)
    stopped = study.trials[trial.number]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["fail_reason"] == reason
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[stopped.user_attrs[RUN_ID_ATTR]].info.status == "KILLED"
    sessions = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"]
    assert [s.info.status for s in sessions] == ["KILLED"]
    assert sessions[0].data.tags["hpo_peft.error"] == reason


@pytest.mark.slow
def test_sigterm_ends_like_ctrl_c(slow):
    config, options = slow
    process, trial = start_mid_trial(config, options)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert_closed_like_ctrl_c(options, trial, "interrupted (SIGTERM)")


@pytest.mark.slow
def test_two_quick_ctrl_c_end_like_one(slow):
    config, options = slow
    process, trial = start_mid_trial(config, options)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert_closed_like_ctrl_c(options, trial, "interrupted (Ctrl-C)")


def worker_pids(options):
    return {t.user_attrs["worker"]["pid"] for t in load_study(options).trials if "worker" in t.user_attrs}


def stat_fields(stat: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the process name (state, ppid, ...): the name can hold
    spaces, so they follow its last ')'. None when the process ended between two looks at /proc."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def running(pid) -> bool:
    """Alive and not a zombie."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def wait_gone(pids, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if running(p)]
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"workers still alive: {alive}")


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_its_workers(slow):
    config, options = slow
    process, trial = start_mid_trial(config, options, "--jobs", "2")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    wait_gone(worker_pids(options))
    study, runs = assert_consistent(options)
    assert all(t.state.name == "FAIL" and t.user_attrs["fail_reason"] == "interrupted (SIGTERM)" for t in study.trials)


def test_a_stop_before_a_trials_run_exists_still_closes_the_trial_with_a_killed_run(demo_workspace, tmp_path,
                                                                                   monkeypatch):
    """A worker stopped while its trial was being sampled (a second worker a step behind the first,
    seen in CI) left a FAIL trial with no MLflow run: the stop now waits until the run exists."""
    import optuna

    from hpo_peft.core import interrupts
    from hpo_peft.study import session as study_module
    from hpo_peft.tracking.recovery import Heartbeat
    from hpo_peft.tracking.tracker import Tracker

    real_sample = study_module.sample_plan

    def sample_then_stop(trial, config):
        plan = real_sample(trial, config)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the trial's run is opened
        return plan

    monkeypatch.setattr(study_module, "sample_plan", sample_then_stop)
    monkeypatch.setattr(interrupts, "_watchdog", lambda signum: None)  # no clean-up deadline inside pytest
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", experiment="stop")
    parent = tracker.start_parent("stop", {})
    study = optuna.create_study(direction="maximize")
    with interrupts.handled(), Heartbeat(tracker, None, 60.0) as heartbeat:
        objective = study_module.make_objective(demo_workspace, demo_workspace.config, tracker, parent, "stop", heartbeat)
        with pytest.raises(KeyboardInterrupt):
            study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted (SIGTERM)"
    run = tracker.client.get_run(trial.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "KILLED" and run.data.tags["hpo_peft.trial_number"] == "0"


def children_of(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(stat)
        if fields is not None and int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_workers_die_with_a_sigkilled_parent_and_are_recovered(slow):
    config, options = slow
    process, trial = start_mid_trial(config, options, "--jobs", "2")
    workers = children_of(process.pid)  # both workers, and multiprocessing's resource tracker
    assert len(workers) >= 2
    process.kill()
    process.wait()
    wait_gone(workers)  # they noticed, closed their trials and runs, and exited
    study = load_study(options)
    assert all(t.state.name != "RUNNING" for t in study.trials)
    run_study(prepare_study_config(config, []), options, n_trials=1, timeout=None, accept_changes=True)  # closes the dead parent's run
    assert_consistent(options)


@pytest.mark.slow
def test_ctrl_c_ends_in_bounded_time_on_a_loaded_machine(slow):
    """A CPU-bound process beside the study (CI machines are busy too): the interrupted session
    still ends, with the same outcome, well within the bound. It no longer draws the session's
    figures (param importances fit a forest) on its way out."""
    config, options = slow
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        process, trial = start_mid_trial(config, options)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        hog.kill()
        hog.wait()
    assert process.returncode == 130, err
    assert_closed_like_ctrl_c(options, trial, "interrupted (Ctrl-C)")


@pytest.mark.slow
def test_a_worker_on_another_host_is_recovered_by_its_heartbeat_alone(slow, monkeypatch):
    """A worker's host can be named (HPO_PEFT_WORKER_HOST), so one machine stands in for two: a
    dead worker of another host is stale only once its heartbeat is older than the grace period."""
    config, options = slow
    process = subprocess.Popen(cli(config, options, "--n-trials", "2", *SLOW), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "HPO_PEFT_WORKER_HOST": "node-b"})
    trial = wait_for_running_trial(options, process)
    assert trial.user_attrs["worker"]["host"] == "node-b"
    process.kill()
    process.wait()
    monkeypatch.setenv("HPO_PEFT_WORKER_HOST", "node-a")
    from hpo_peft.tracking.recovery import recover_stale
    from hpo_peft.study.session import open_stores

    prepared = prepare_study_config(config, [])
    study, tracker = open_stores(prepared, options, accept_changes=True)
    assert recover_stale(study, tracker, grace_period=30.0) == []  # its process is gone, but not on this host
    time.sleep(3.5)
    assert recover_stale(study, tracker, grace_period=3.0) == [trial.number]  # its heartbeat is 3 s old
    study = load_study(options)
    assert study.trials[trial.number].state.name == "FAIL"
    assert study.trials[-1].state.name == "WAITING" and study.trials[-1].user_attrs["retry_of"] == trial.number
    runs = all_runs(options)
    assert [r.info.status for r in runs if r.info.run_id == trial.user_attrs[RUN_ID_ATTR]] == ["KILLED"]
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
