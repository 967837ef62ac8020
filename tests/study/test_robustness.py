"""Studies that survive: failing trials, Ctrl-C, SIGKILLed workers, several workers (journal file
and a real PostgreSQL server). After every fault: Optuna's trial count equals the MLflow child-run
count, no MLflow run is RUNNING, and the trials completed before the fault are still there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import create_database
from mlflow import MlflowClient

from hpo_peft.app.commands import prepare_study_config
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.study.session import StudyLocation, load_study, open_storage, run_study
from hpo_peft.fewshot.train import NonFiniteLoss

QUICK_SEARCH = {
    "n_trials": 3,
    "sampler": {"name": "random", "seed": 1},
    "pruner": {"name": "none"},
    "params": {"method": {"choices": ["bias", "lora"]}, "learning_rate": {"low": 0.002, "high": 0.01, "log": True},
               "max_epochs": 2, "patience": None},
    "methods": {"lora": {"rank": {"choices": [1, 2]}}},
    "heartbeat_interval": 1.0,
    "grace_period": 600.0,
}
SLOW = ["--set", "search.params.max_epochs=100000", "--accept-changes"]  # a trial that runs until it is stopped


@pytest.fixture
def setup(write_config, tmp_path):
    config = write_config("study.yaml", search=QUICK_SEARCH)
    options = StudyLocation("robust", storage=str(tmp_path / "optuna.journal"),
                           tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    return config, options


def cli(config, options, *extra):
    return [sys.executable, "-m", "hpo_peft.app.cli", "study", "run", str(config), "--study-name", options.study_name,
            "--storage", options.storage, "--tracking-uri", options.tracking_uri, *extra]


def all_runs(options):
    client = MlflowClient(options.tracking_uri)
    experiment = client.get_experiment_by_name(options.study_name)
    return client.search_runs([experiment.experiment_id], max_results=10_000)


def assert_consistent(options, completed_before=()):
    study = load_study(options)
    runs = all_runs(options)
    children = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "trial"]
    assert len(study.trials) == len(children)
    assert sorted(int(r.data.tags["hpo_peft.trial_number"]) for r in children) == [t.number for t in study.trials]
    running = [(r.info.run_name, r.info.start_time, r.data.tags) for r in runs if r.info.status == "RUNNING"]
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == [], running
    by_number = {t.number: t for t in study.trials}
    for number, value in completed_before:
        assert by_number[number].state == optuna.trial.TrialState.COMPLETE and by_number[number].value == value
    return study, runs


def completed(options):
    return [(t.number, t.value) for t in load_study(options).trials if t.state.name == "COMPLETE"]


def wait_for_running_trial(options, process, timeout=120):
    """Until a trial of the study is RUNNING with its MLflow run created."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            running = [t for t in load_study(options).trials if t.state.name == "RUNNING" and RUN_ID_ATTR in t.user_attrs]
        except Exception:  # the study may not exist yet
            running = []
        if running:
            time.sleep(1.5)  # let it train an epoch or two
            return running[0]
        time.sleep(0.3)
    pytest.fail("no trial started")


def two_trials_then_a_running_one(config, options):
    """Two completed trials, then a second session in a subprocess that is mid-trial."""
    run_study(prepare_study_config(config, []), options, n_trials=2, timeout=None)
    before = completed(options)
    process = subprocess.Popen(cli(config, options, "--n-trials", "1", *SLOW), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return before, process, wait_for_running_trial(options, process)


def test_a_raising_trial_fails_alone_and_the_study_goes_on(setup, monkeypatch):
    config, options = setup
    from hpo_peft.study import session as study_module

    real = study_module.run_trial

    def flaky(workspace, method, *args, **kwargs):
        if flaky.calls == 1:
            flaky.calls += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        flaky.calls += 1
        return real(workspace, method, *args, **kwargs)

    flaky.calls = 0
    monkeypatch.setattr(study_module, "run_trial", flaky)
    run_study(prepare_study_config(config, []), options, n_trials=3, timeout=None)
    study, runs = assert_consistent(options)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "CUDA out of memory" in study.trials[1].user_attrs["fail_reason"]
    failed = [r for r in runs if r.data.tags.get("hpo_peft.trial_number") == "1"][0]
    assert failed.info.status == "FAILED" and "CUDA out of memory" in failed.data.tags["hpo_peft.error"]
    assert failed.data.tags["hpo_peft.trial_state"] == "FAIL"


def test_a_diverging_trial_raises_non_finite_loss(demo_workspace):
    from hpo_peft.core.config import TrainConfig
    from hpo_peft.fewshot.trial import run_trial

    with pytest.raises(NonFiniteLoss):
        run_trial(demo_workspace, "full", {}, TrainConfig(optimizer="sgd", learning_rate=1e30, max_epochs=3), progress=False)


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_and_the_study_resumes(setup):
    config, options = setup
    before, process, trial = two_trials_then_a_running_one(config, options)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    study, runs = assert_consistent(options, before)
    assert study.trials[trial.number].state.name == "FAIL"
    killed = [r for r in runs if r.info.run_id == trial.user_attrs[RUN_ID_ATTR]][0]
    assert killed.info.status == "KILLED"
    sessions = sorted((r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"), key=lambda r: r.info.start_time)
    assert sessions[-1].info.status == "KILLED"
    run_study(prepare_study_config(config, []), options, n_trials=1, timeout=None)
    study, _ = assert_consistent(options, before)
    assert study.trials[-1].state.name == "COMPLETE"


@pytest.mark.slow
def test_a_sigkilled_worker_is_recovered_by_the_next_session(setup):
    config, options = setup
    before, process, trial = two_trials_then_a_running_one(config, options)
    process.kill()
    process.wait()
    assert any(r.info.status == "RUNNING" for r in all_runs(options))  # what the kill left behind

    run_study(prepare_study_config(config, []), options, n_trials=1, timeout=None)
    study, runs = assert_consistent(options, before)
    stale = study.trials[trial.number]
    assert stale.state.name == "FAIL" and "worker stopped" in stale.user_attrs["fail_reason"]
    retry = study.trials[-1]
    assert retry.user_attrs["retry_of"] == trial.number and retry.params == stale.params
    assert [r.info.status for r in runs if r.info.run_id == stale.user_attrs[RUN_ID_ATTR]] == ["KILLED"]
    killed_sessions = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session" and r.info.status == "KILLED"]
    assert len(killed_sessions) == 1


@pytest.mark.slow
def test_jobs_share_one_journal_without_duplicates(setup):
    config, options = setup
    result = subprocess.run(cli(config, options, "--n-trials", "5", "--jobs", "2"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    study, runs = assert_consistent(options)
    assert len(study.trials) == 5 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2
    assert len({t.user_attrs[RUN_ID_ATTR] for t in study.trials}) == 5
    assert len([r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"]) == 1


@pytest.mark.slow
def test_separate_workers_on_postgresql(setup, postgres_url):
    config, options = setup
    options = StudyLocation("robust", storage=postgres_url, tracking_uri=options.tracking_uri)
    workers = [subprocess.Popen(cli(config, options, "--n-trials", "3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    study, runs = assert_consistent(options)
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2
    assert len([r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "study_session"]) == 2


def test_watching_a_postgresql_study_holds_one_connection_pool(postgres_url):
    """Each new Optuna RDBStorage holds its connections until the garbage collector runs: a loop that
    watches a study (tests, `study best` in a shell loop's process, a dashboard) would use up the
    server's 100 connections and lock out the workers. One storage per database and process."""
    import gc
    import uuid

    import sqlalchemy

    name = f"watch_{uuid.uuid4().hex[:8]}"
    options = StudyLocation("watched", storage=create_database(postgres_url, name))
    optuna.create_study(study_name="watched", storage=open_storage(options.storage))
    monitor = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    gc.disable()  # as between two collections on a busy machine
    try:
        for _ in range(40):
            assert load_study(options).trials == []
        with monitor.connect() as connection:
            held = connection.execute(sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                                      {"name": name}).scalar()
    finally:
        gc.enable()
        monitor.dispose()
    assert 1 <= held <= 2


@pytest.mark.slow
def test_a_corrupt_image_stops_the_session_before_anything_is_written(setup, demo_kit, tmp_path):
    import shutil

    config, options = setup
    root = tmp_path / "sicapv2"
    shutil.copytree(demo_kit / "sicapv2", root)
    for image in (root / "images").glob("*.jpg"):
        image.write_bytes(b"\xff\xd8\xff broken")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["root"] = str(root)
    config.write_text(yaml.safe_dump(raw))
    result = subprocess.run(cli(config, options), capture_output=True, text=True)
    assert result.returncode == 2
    assert "cannot decode image (row" in result.stderr
    assert not os.path.exists(options.storage) and not (tmp_path / "mlflow.db").exists()
