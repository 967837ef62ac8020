"""One demo kit per test session, and configs that point at it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICE_FIXTURES = {"postgres_url"}  # a fixture that starts a server from the system


def pytest_collection_modifyitems(items):
    """Markers (CONTRIBUTING.md, "Tests"): `service` where a test starts a server from the system
    (PostgreSQL, `mlflow server` or `models serve`, SLURM, Chromium), by its fixtures or its own
    mark; `slow` is set by hand on tests that run whole studies or many trainings; `unit` is every
    other test: the contributor's loop, `pytest -m unit`."""
    for item in items:
        if SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.service)
        if item.get_closest_marker("service") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def demo_kit(tmp_path_factory) -> Path:
    from hpo_peft.demo_kit import build_demo_kit

    return build_demo_kit(tmp_path_factory.mktemp("kit") / "demo", progress=False)


# the tests' search settings over demo.yaml's space: how the demo started and pruned before the search
# benchmark chose its default (tests check mechanisms on them; test_search checks the shipped default)
TEST_SEARCH = {"sampler": {"name": "tpe", "n_startup_trials": 4},
               "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 4}, "start": "sampler",
               "ensemble": 1,  # evaluate scores the best trial (tests/tracking/test_ensemble.py: the top trials)
               "enqueue": [{"method": "lora", "learning_rate": 0.001, "max_epochs": 20, "lora.rank": 4, "lora.b_init": "zeros"}]}


def demo_config_dict(kit: Path, search: dict | None = None) -> dict:
    """studies/demo.yaml, pointed at the session's kit, searching with TEST_SEARCH; `search` merged into
    its search section (a test's own space: the demo's enqueued trial may lie outside it, so it is dropped)."""
    raw = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    raw["search"] = {**raw["search"], **TEST_SEARCH}
    raw["demo_kit"] = None
    raw["data"]["root"] = str(kit / "sicapv2")
    raw["model"]["name_or_path"] = str(kit / "model")
    if search is not None:
        raw["search"] = {**{key: value for key, value in raw["search"].items() if key != "enqueue"}, **search}
    return raw


def write_demo_config(kit: Path, path: Path, **changes) -> Path:
    """A demo config pointed at `kit`, with those top-level sections replaced (dicts merged), at `path`."""
    raw = demo_config_dict(kit, changes.pop("search", None))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def run_demo_study(kit: Path, tmp: Path, name: str, search: dict, n_trials: int) -> dict:
    """A small study of the demo config with `search`, its stores in `tmp`: what the tracking
    tests' module fixtures share (config path, MLflow URI, the study, the CLI's store options)."""
    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.study.session import StudyLocation, run_study

    path = write_demo_config(kit, tmp / "study.yaml", search=search)
    uri = "sqlite:///" + str(tmp / "mlflow.db")
    where = StudyLocation(name, storage=str(tmp / "optuna.journal"), tracking_uri=uri)
    study = run_study(prepare_study_config(path, []), where, n_trials=n_trials, timeout=None)
    options = ["--study-name", name, "--storage", where.storage, "--tracking-uri", uri]
    return {"path": path, "uri": uri, "tmp": tmp, "study": study, "options": options, "kit": kit}


@pytest.fixture
def write_config(demo_kit, tmp_path):
    """write_config(**sections) -> path of a demo config with those top-level sections replaced/merged."""

    def write(name: str = "config.yaml", **changes) -> Path:
        return write_demo_config(demo_kit, tmp_path / name, **changes)

    return write


@pytest.fixture
def refuse_model_loading(monkeypatch):
    """Fails the test if anything loads a model: for faults that must be found before that."""
    import transformers

    from hpo_peft.models import classifier as model
    from hpo_peft.fewshot import trial

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(model, "load_base_model", refuse)
    monkeypatch.setattr(trial, "load_base_model", refuse)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)


@pytest.fixture(scope="session")
def demo_workspace(demo_kit):
    from hpo_peft.core.config import StudyConfig
    from hpo_peft.fewshot.trial import open_workspace

    return open_workspace(StudyConfig.model_validate(demo_config_dict(demo_kit)))


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (Debian's package) on loopback, for the whole session."""
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    binaries = [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))]
    initdb = next((b for b in binaries if b), None)
    if initdb is None:
        pytest.fail("PostgreSQL server not found; .ci/run installs Debian's postgresql package")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    data = Path(tempfile.mkdtemp(prefix="hpo_peft_pg_"))
    as_postgres = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_postgres, initdb, "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data / "db"), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def create_database(postgres_url: str, name: str) -> str:
    """A new, empty database on the test server; its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return postgres_url.rsplit("/", 1)[0] + "/" + name
