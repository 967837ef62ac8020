"""The stores survive what disks and users do to them: a journal torn by a cut-short write, a full
disk, a copied or moved study folder, a read-only folder, a changed search space, a web server
that is not MLflow, a worker that arrives after the budget is spent. Each is checked by the state
it leaves (files, trial and run states, exit code, the one line)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_faults import DRAWS, in_read_only, one_error_line
from test_robustness import all_runs, assert_consistent

from hpo_peft.app.cli import main
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.study.session import StudyLocation, load_study

ROOT = Path(__file__).resolve().parents[2]
CHEAP = {**DRAWS, "n_trials": 2}
BIAS = {  # trials that write adapters to the store, for the disk to fill
    "n_trials": 2, "sampler": {"name": "random", "seed": 1}, "pruner": {"name": "none"},
    "params": {"method": "bias", "learning_rate": {"low": 0.002, "high": 0.01, "log": True}, "max_epochs": 2,
               "patience": None},
}


def hpo(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process (a trial left RUNNING by it is recovered: its process is gone)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hpo_peft.app.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def default_stores(folder: Path, name: str = "demo") -> StudyLocation:
    return StudyLocation(name, storage=str(folder / "mlruns" / "optuna.journal"),
                         tracking_uri="sqlite:///" + str(folder / "mlruns" / "mlflow.db"))


@pytest.fixture
def cheap(write_config, tmp_path):
    config = write_config("cheap.yaml", search=CHEAP)
    where = StudyLocation("cheap", storage=str(tmp_path / "optuna.journal"),
                          tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    options = ["--study-name", where.study_name, "--storage", where.storage, "--tracking-uri", where.tracking_uri]
    return config, where, options


@pytest.mark.slow
def test_a_torn_journal_is_mended_under_its_lock_before_the_next_append(cheap):
    config, where, options = cheap
    assert hpo("study", "run", str(config), *options).returncode == 0
    journal = Path(where.storage)
    kept = journal.read_bytes()[:-30]  # a write cut short: the last record lost its end
    journal.write_bytes(kept)
    torn = kept[kept.rfind(b"\n") + 1:]
    assert hpo("study", "best", str(config), *options).returncode == 0  # reading always worked

    again = hpo("study", "run", str(config), "--n-trials", "1", *options)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{journal} ended in a half-written record ({len(torn)} bytes" in again.stderr
    assert Path(f"{journal}.torn").read_bytes() == torn + b"\n"  # set aside, not lost
    assert journal.read_bytes().startswith(kept[:len(kept) - len(torn)])
    best = hpo("study", "best", str(config), *options)
    assert best.returncode == 0, best.stderr[-3000:]
    study, _ = assert_consistent(where)
    assert len(study.trials) == 3 and "RUNNING" not in {t.state.name for t in study.trials}


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs of the test's own (CI runs as root, as mounting needs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test ({mounted.stderr.strip()}); run as root, as CI does")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_session_in_one_line_and_the_next_session_resumes(write_config, small_disk):
    config = write_config("disk.yaml", search=BIAS)
    first = hpo("study", "run", str(config), cwd=small_disk)
    assert first.returncode == 0, first.stderr[-3000:]
    filler = small_disk / "filler"
    with pytest.raises(OSError, match="No space left"), open(filler, "wb") as handle:  # every byte, whatever
        handle.write(b"\0" * (shutil.disk_usage(small_disk).free + 1024 * 1024))  # the next write is refused

    full = hpo("study", "run", str(config), "--n-trials", "3", cwd=small_disk)
    assert full.returncode == 2
    assert "disk full" in one_error_line(full.stderr)  # no traceback, whichever write it struck

    filler.unlink()
    again = hpo("study", "run", str(config), "--n-trials", "1", cwd=small_disk)
    assert again.returncode == 0, again.stderr[-3000:]
    study, runs = assert_consistent(default_stores(small_disk))  # nothing RUNNING, one run per trial
    assert study.trials[-1].state.name == "COMPLETE" and len(study.trials) >= 3
    assert "RUNNING" not in {r.info.status for r in runs}
    best = hpo("study", "best", str(config), cwd=small_disk)
    assert best.returncode == 0 and "best trial" in best.stdout, best.stderr[-3000:]


def artifact_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in (folder / "mlruns" / "artifacts").rglob("*") if p.is_file())


def test_a_copied_or_moved_study_folder_never_touches_the_original(write_config, tmp_path, monkeypatch, capsys):
    config = write_config("copy.yaml", search=CHEAP)
    original = tmp_path / "A"
    original.mkdir()
    monkeypatch.chdir(original)
    assert main(["study", "run", str(config)]) == 0
    adapters, journal = artifact_files(original), (original / "mlruns" / "optuna.journal").read_bytes()
    assert adapters

    from hpo_peft.models import classifier as model
    from hpo_peft.fewshot import trial

    monkeypatch.setattr(model, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(trial, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    copy = tmp_path / "B"
    shutil.copytree(original, copy, symlinks=True)
    monkeypatch.chdir(copy)
    capsys.readouterr()
    assert main(["study", "run", str(config), "--n-trials", "1", "--set", "search.keep_adapters=best:1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"keeps its artifacts in {original / 'mlruns' / 'artifacts'}" in line and "copied or moved" in line
    assert artifact_files(original) == adapters  # the original's adapters are all there
    assert (copy / "mlruns" / "optuna.journal").read_bytes() == journal

    moved = tmp_path / "C"
    original.rename(moved)
    monkeypatch.chdir(moved)
    for command in (["evaluate", str(config)], ["study", "run", str(config), "--n-trials", "1"]):
        assert main(command) == 2
        assert "copied or moved" in one_error_line(capsys.readouterr().err)
    assert not original.exists()  # not quietly recreated


def test_a_changed_choice_list_is_refused_in_one_line_before_anything_loads(write_config, cheap, monkeypatch, capsys):
    _, where, options = cheap
    space = {**CHEAP, "params": {**CHEAP["params"], "method": {"choices": ["zs_linear_probe", "linear_probe"]}}}
    config = write_config("space.yaml", search=space)
    assert main(["study", "run", str(config), "--n-trials", "1", *options]) == 0
    journal = Path(where.storage).read_bytes()
    wider = {**space, "params": {**space["params"], "method": {"choices": ["zs_linear_probe", "linear_probe", "clip_adapter"]}}}
    changed = write_config("wider.yaml", search=wider)

    from hpo_peft.fewshot import trial

    monkeypatch.setattr(trial, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    assert main(["study", "run", str(changed), "--n-trials", "1", "--accept-changes", *options]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("hpo-peft: error: search.params.method: study 'cheap' drew it from ['zs_linear_probe', "
                           "'linear_probe'], the config now from ['zs_linear_probe', 'linear_probe', 'clip_adapter']")
    assert "--study-name cheap-2" in line
    assert Path(where.storage).read_bytes() == journal


def test_a_web_server_that_is_not_mlflow_is_refused_before_anything_is_written(cheap, tmp_path, monkeypatch, capsys,
                                                                              refuse_model_loading):
    config, where, _ = cheap
    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "log_message", lambda *a: None)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code = main(["study", "run", str(config), "--storage", where.storage, "--tracking-uri", url])
    finally:
        server.shutdown()
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{url} answers, but not as an MLflow tracking server (HTTP 404" in line
    assert not Path(where.storage).exists()


@pytest.mark.slow
def test_reading_commands_read_a_read_only_store_and_a_late_worker_opens_no_run(write_config, demo_kit, tmp_path,
                                                                                  monkeypatch, capsys):
    config = write_config("ro.yaml", search={**CHEAP, "n_trials": 1})
    folder = tmp_path / "study"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert main(["study", "run", str(config)]) == 0
    where = default_stores(folder)
    sessions = len(all_runs(where))
    assert main(["study", "worker", str(config), "--n-trials", "1"]) == 0  # the budget is spent already
    assert "the study's budget is used up: 1 of 1 trials ended" in capsys.readouterr().out
    assert len(all_runs(where)) == sessions  # no empty session run

    cli = [sys.executable, "-m", "hpo_peft.app.cli"]
    best = in_read_only(folder / "mlruns", [*cli, "study", "best", str(config)], folder)
    assert best.returncode == 0 and "best trial 0" in best.stdout, best.stderr[-3000:]
    evaluated = in_read_only(folder / "mlruns", [*cli, "evaluate", str(config)], folder)
    assert evaluated.returncode == 2  # it records the test score: said before the model loads
    line = one_error_line(evaluated.stderr)
    assert "the MLflow store cannot be written here (read-only file system)" in line and "journal" not in line
    run_id = load_study(where).trials[0].user_attrs[RUN_ID_ATTR]
    image = sorted((demo_kit / "sicapv2" / "images").iterdir())[0]
    out = tmp_path / "predictions.csv"
    predicted = in_read_only(folder / "mlruns", [*cli, "predict", run_id, str(image), "--out", str(out)], folder)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 2


def test_a_full_disk_inside_a_trial_stops_the_session_after_it(cheap, monkeypatch):
    """ENOSPC injected where a trial writes its adapter: that trial fails, no further trial starts,
    the session's one line names the disk, and every run is closed."""
    import errno

    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.core.errors import UserError
    from hpo_peft.study.session import run_study
    from hpo_peft.tracking.tracker import Tracker

    config, where, _ = cheap

    def full(self, run_id, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(Tracker, "log_adapter", full)
    with pytest.raises(UserError, match=r"disk full \(.*: No space left on device\): the session stopped"):
        run_study(prepare_study_config(config, []), where, n_trials=3, timeout=None)
    study, runs = assert_consistent(where)
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the trial's run and the session's
