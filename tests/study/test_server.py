"""Studies across machines, for real: a `mlflow server` on a PostgreSQL backend store with served
artifacts, Optuna on PostgreSQL, and workers that know both only by URL (as on other hosts, named
by HPO_PEFT_WORKER_HOST). One server for the module; the outage test stops and restarts it last."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import requests
from conftest import create_database
from mlflow import MlflowClient

from hpo_peft.app.commands import prepare_study_config
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.run_story import OBJECTIVE
from hpo_peft.study.session import StudyLocation, load_study, run_study

pytestmark = pytest.mark.service  # PostgreSQL, `mlflow server` and SLURM on loopback

ROOT = Path(__file__).resolve().parents[2]
SEARCH = {
    "n_trials": 4,
    "sampler": {"name": "random", "seed": 1},
    "pruner": {"name": "none"},
    "params": {"method": {"choices": ["bias", "lora"]}, "learning_rate": {"low": 0.002, "high": 0.01, "log": True},
               "max_epochs": 2, "patience": None},
    "methods": {"lora": {"rank": {"choices": [1, 2]}}},
    "heartbeat_interval": 1.0,
    "grace_period": 8.0,  # other hosts: only the heartbeat tells a dead worker
}
SLOW = ["--set", "search.params.max_epochs=100000"]  # a trial that runs until it is killed


class MlflowServer:
    """`mlflow server` on loopback: PostgreSQL backend store, artifacts served from a folder."""

    def __init__(self, backend: str, folder: Path):
        self.backend, self.folder = backend, folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend, "--serve-artifacts",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        pytest.fail("mlflow server did not start: " + (self.folder / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        """SIGTERM to its process group (uvicorn ends the requests in flight), then wait."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def server(postgres_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow_server")
    server = MlflowServer(create_database(postgres_url, f"mlflow_{uuid.uuid4().hex[:8]}"), folder)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def location(server, postgres_url):
    """A fresh Optuna database, and a study (MLflow experiment) of its own on the shared server."""
    return StudyLocation(f"across-{uuid.uuid4().hex[:6]}", storage=create_database(postgres_url, f"optuna_{uuid.uuid4().hex[:8]}"),
                         tracking_uri=server.url)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster (Debian's slurm-wlm, run as root) with its own munge daemon and
    ports: the environment in which `sbatch`, `squeue` and `scontrol` talk to it."""
    import shutil

    daemons = {name: shutil.which(name) or f"/usr/sbin/{name}" for name in ("munged", "slurmctld", "slurmd")}
    if not all(os.path.exists(path) for path in daemons.values()) or shutil.which("sbatch") is None:
        pytest.fail("SLURM not found; .ci/run installs Debian's slurm-wlm and munge")
    folder = tmp_path_factory.mktemp("slurm")
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = folder / "munge.socket"
    subprocess.run([daemons["munged"], "--force", f"--socket={socket_path}", f"--key-file={key}",
                    f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                    f"--seed-file={folder / 'munged.seed'}"], check=True, capture_output=True)
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    host = socket.gethostname().split(".")[0]
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hpopeft", f"SlurmctldHost={host}", "AuthType=auth/munge", f"AuthInfo=socket={socket_path}",
        "SlurmUser=root", "SlurmdUser=root", f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "ReturnToService=2", "MpiDefault=none",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemons[daemon], "-f", str(conf)], check=True, capture_output=True, env=env)
        deadline = time.monotonic() + 120
        while subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout.strip() != "idle":
            if time.monotonic() > deadline:
                pytest.fail("SLURM node not idle: " + (folder / "slurmctld.log").read_text()[-2000:])
            time.sleep(0.3)
        yield env
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def sbatch_workers(slurm: dict, config: Path, where: StudyLocation, tasks: int, total: int, folder: Path,
                   *extra: str) -> str:
    """deploy/slurm_study.sh as a job array of `tasks` workers; returns the job id."""
    env = {**slurm, "PYTHONPATH": str(ROOT), "CONFIG": str(config), "N_TRIALS": str(total),
           "HPO_PEFT": f"{sys.executable} -m hpo_peft.app.cli", "HPO_PEFT_STORAGE": where.storage,
           "HPO_PEFT_TRACKING_URI": where.tracking_uri, "HPO_PEFT_WORKER_HOST": "node"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--array=0-{tasks - 1}", "--cpus-per-task=1", "--mem=100M",
         f"--output={folder}/worker-%a.log", f"--chdir={ROOT}", str(ROOT / "deploy" / "slurm_study.sh"),
         "--study-name", where.study_name, *extra], capture_output=True, text=True, env=env, check=True)
    return submitted.stdout.strip().split(";")[0]


def wait_for_job(slurm: dict, job: str, timeout: float = 400) -> dict[int, str]:
    """Until every task of the array has ended: {task id: "STATE exit code"}."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=slurm).stdout.strip():
        assert time.monotonic() < deadline, f"SLURM job {job} still running"
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=slurm).stdout
    ended = {}
    for line in shown.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        ended[int(fields["ArrayTaskId"])] = f"{fields['JobState']} {fields['ExitCode']}"
    return ended


def cli(command: str, config: Path, where: StudyLocation, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpo_peft.app.cli", *command.split(), str(config), "--study-name", where.study_name,
            "--storage", where.storage, "--tracking-uri", where.tracking_uri, *extra]


def as_host(host: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HPO_PEFT_WORKER_HOST": host}


def trial_runs(where: StudyLocation) -> tuple[list, list]:
    """(child runs of the study's trials, all its runs), through the server."""
    client = MlflowClient(where.tracking_uri)
    experiment = client.get_experiment_by_name(where.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    return [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "trial"], runs


def assert_consistent(where: StudyLocation) -> tuple[optuna.Study, list]:
    study = load_study(where)
    children, runs = trial_runs(where)
    assert sorted(int(r.data.tags["hpo_peft.trial_number"]) for r in children) == [t.number for t in study.trials]
    assert [(r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"] == []
    return study, children


def download_adapter(where: StudyLocation, run_id: str, destination: Path) -> Path:
    folder = Path(MlflowClient(where.tracking_uri).download_artifacts(run_id, "adapter", str(destination)))
    assert (folder / "hpo_peft_adapter.json").is_file() and (folder / "head.safetensors").is_file()
    return folder


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            found = condition()
        except Exception:  # the study may not exist yet
            found = None
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_slurm_job_array_shares_a_tracking_server_recovers_a_killed_worker_and_evaluate_reproduces(
        server, slurm, location, write_config, demo_workspace, tmp_path):
    """Two workers of deploy/slurm_study.sh (hosts node-0, node-1) and one more (node-a) killed mid-trial."""
    from hpo_peft.fewshot.artifacts import load_adapter
    from hpo_peft.data import load_test
    from hpo_peft.fewshot.evaluate import evaluate_as_trained
    from hpo_peft.fewshot.settings import TrialSettings

    config = write_config("study.yaml", search=SEARCH)
    doomed = subprocess.Popen(cli("study run", config, location, "--n-trials", "1", "--accept-changes", *SLOW),
                              env=as_host("node-a"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running_on(host):
        return [t for t in load_study(location).trials if t.state.name == "RUNNING" and RUN_ID_ATTR in t.user_attrs
                and t.user_attrs.get("worker", {}).get("host") == host]

    # node-a's trial holds one of the 4 places before the array starts (on a busy machine the array
    # could otherwise use up the budget before node-a's trial even began, leaving nothing to recover)
    killed = wait_for(lambda: running_on("node-a"), doomed, "node-a's trial")[0]
    wait_for(lambda: load_study(location).trials[killed.number].user_attrs.get("heartbeat"), doomed, "a heartbeat")
    job = sbatch_workers(slurm, config, location, 2, 4, tmp_path, "--accept-changes")
    wait_for(lambda: [t for t in load_study(location).trials
                      if t.user_attrs.get("worker", {}).get("host") in ("node-0", "node-1")], doomed, "an array worker's trial")
    doomed.kill()  # SIGKILL mid-trial, beside the array's workers: nothing of it closes its trial or runs
    doomed.communicate()
    ended = wait_for_job(slurm, job)
    outputs = [(tmp_path / f"worker-{task}.log").read_text() for task in (0, 1)]
    assert ended == {0: "COMPLETED 0:0", 1: "COMPLETED 0:0"}, "\n".join(outputs)
    for out in outputs:
        assert "the study's budget is used up: 4 of 4 trials ended" in out, out
        assert f"MLflow {server.url}, experiment {location.study_name!r}, session run" in out, out  # where it logs
    assert any(f"recovered stale trials [{killed.number}]" in out for out in outputs), "\n".join(outputs)

    study, children = assert_consistent(location)
    stale = study.trials[killed.number]
    assert stale.state.name == "FAIL" and "worker stopped" in stale.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == stale.params and retry[0].state.name == "COMPLETE"
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len(study.trials) == 5  # the total, shared: the killed trial's retry took its place
    assert {t.user_attrs["worker"]["host"] for t in complete} <= {"node-0", "node-1"}
    status = {r.info.run_id: r.info.status for r in children}
    assert status[stale.user_attrs[RUN_ID_ATTR]] == "KILLED"
    for trial in complete:  # adapters live in the server's artifact store and come back through it
        run = MlflowClient(location.tracking_uri).get_run(trial.user_attrs[RUN_ID_ATTR])
        assert status[run.info.run_id] == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        download_adapter(location, run.info.run_id, tmp_path / f"adapter{trial.number}")

    # evaluate from a third process that knows the study only by the two URLs (no local store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(cli("evaluate", config, location, "--json", "--register", "across-best"),
                            env=as_host("node-d"), cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout)  # stdout is the JSON alone, also with a server
    assert not (elsewhere / "mlruns").exists()
    by_run = {t.user_attrs[RUN_ID_ATTR]: t for t in complete}
    assert scored["val_balanced_accuracy"] == pytest.approx(by_run[scored["mlflow_run_id"]].value)
    assert scored["val_balanced_accuracy"] == pytest.approx(max(t.value for t in complete))  # the best one
    client = MlflowClient(location.tracking_uri)
    logged = client.get_run(scored["mlflow_run_id"]).data.metrics["test_balanced_accuracy"]
    assert logged == pytest.approx(scored["balanced_accuracy"])
    version = client.get_model_version("across-best", str(scored["registered_version"]))
    assert version.run_id == scored["mlflow_run_id"]
    # ... and the adapter fetched here through the server gives the same test score
    study_config = prepare_study_config(config, [])
    classifier, metadata = load_adapter(download_adapter(location, scored["mlflow_run_id"], tmp_path / "best"),
                                        demo_workspace.base, study_config.data.categories)
    test = load_test(study_config.data, demo_workspace.base.preprocessing)
    again = evaluate_as_trained(classifier, test, demo_workspace.base.preprocessing, study_config.data.categories,
                                TrialSettings.saved(metadata, study_config.train.device))
    assert again.balanced_accuracy == pytest.approx(scored["balanced_accuracy"])


def test_a_server_that_stays_away_is_named_in_one_line_after_the_retries(server, monkeypatch):
    from hpo_peft.tracking.tracker import Tracker, TrackingUnavailable

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "8"  # the package's default: about 4 minutes of tries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # quick: the defaults wait about 4 minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    tracker = Tracker(server.url, experiment="gone")
    tracker.uri, tracker.client = url, MlflowClient(url)  # as if the server went away after the session began
    with pytest.raises(TrackingUnavailable) as raised:
        tracker.log_metrics("0" * 32, {"val_loss": 1.0})
    message = str(raised.value)
    assert message.startswith(f"MLflow tracking server {url} did not answer log_metrics (1 retries over")
    assert "connection refused" in message and "\n" not in message


@pytest.mark.slow
def test_a_server_outage_mid_study_loses_nothing(server, location, write_config, tmp_path):
    """Runs last in this module: it stops the shared server and starts it again on the same port."""
    config = prepare_study_config(write_config("study.yaml", search={**SEARCH, "n_trials": 3}), [])
    outage = {}

    def stop_mid_trial():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "stopped" not in outage:
            try:
                trials = load_study(location).trials
            except Exception:
                trials = []
            running = [t for t in trials if t.state.name == "RUNNING" and RUN_ID_ATTR in t.user_attrs]
            if running:
                outage["trial"] = running[0].number
                server.stop()
                outage["stopped"] = True
                time.sleep(3)  # the outage: every call meanwhile is refused and retried
                server.start()
                outage["restarted"] = True
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_mid_trial)
    watcher.start()
    try:
        run_study(config, location, n_trials=3, timeout=None)
    finally:
        watcher.join(timeout=300)
    assert outage.get("restarted"), "the server was not stopped during the study"

    study, children = assert_consistent(location)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client = MlflowClient(location.tracking_uri)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FINISHED" and run.data.tags["hpo_peft.trial_state"] == "COMPLETE"
        assert run.data.metrics[OBJECTIVE] == pytest.approx(trial.value)
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == sorted({m.step for m in history}) and len(history) == 2
        assert "wall_time_s" in run.data.metrics and "trainable_parameters" in run.data.metrics
        download_adapter(location, run.info.run_id, tmp_path / f"adapter{trial.number}")
    artifacts = {f.path for f in client.list_artifacts(trial.user_attrs[RUN_ID_ATTR])}
    assert "validation_confusion_matrix.png" in artifacts
