"""The ecosystem's conventions (issue #29): MLFLOW_TRACKING_URI and OPTUNA_STORAGE where no flag or
config value is given, UI links at the tracking server's own address, `--version`; `--jobs`
workers spread over the visible GPUs; a study that follows its dataset to another folder."""

from __future__ import annotations

import io
import json
import os
import shutil
import tomllib
import types
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from hpo_peft.study import identity
from hpo_peft.core import interrupts
from hpo_peft.core import runtime
from hpo_peft.app.cli import main
from hpo_peft.study.session import StudyLocation, load_study

ROOT = Path(__file__).resolve().parents[1]
# one cheap trial: a head on frozen features, two epochs
CHEAP = {
    "n_trials": 1,
    "sampler": {"name": "random", "seed": 1},
    "pruner": {"name": "none"},
    "params": {"method": "zs_linear_probe", "learning_rate": {"low": 0.001, "high": 0.01, "log": True},
               "max_epochs": 2, "patience": None},
}
NAME = "conventions"


def env_for(tmp: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/store/mlflow.db", "OPTUNA_STORAGE": str(tmp / "store" / "optuna.journal")}


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def moved(tmp_path_factory, demo_kit):
    """A 1-trial study on a copy A of the kit's dataset, through the environment's stores alone
    (run in an empty folder: nothing may land in its mlruns/), continued for 1 trial on a copy B."""
    from conftest import write_demo_config

    tmp = tmp_path_factory.mktemp("conventions")
    first, second = tmp / "A", tmp / "B"
    shutil.copytree(demo_kit / "sicapv2", first)
    config = write_demo_config(demo_kit, tmp / "study.yaml", name=NAME, search=CHEAP, data={"root": str(first)})
    work = tmp / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env_for(tmp).items():
            mp.setenv(key, value)
        mp.chdir(work)
        assert run_cli("study", "run", str(config), "--n-trials", "1")[0] == 0
        shutil.copytree(first, second)
        code, printed = run_cli("study", "run", str(config), "--n-trials", "1", "--set", f"data.root={second}")
        study = load_study(StudyLocation(NAME))  # the environment's journal
    return {"tmp": tmp, "config": config, "A": first, "B": second, "work": work, "code": code, "printed": printed,
            "study": study}


@pytest.fixture
def conventions_env(moved, monkeypatch):
    for key, value in env_for(moved["tmp"]).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(moved["work"])
    return moved


# 3. the ecosystem's conventions -------------------------------------------------------------------
def test_version_prints_the_package_version(capsys):
    import hpo_peft

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"hpo-peft {version}" == f"hpo-peft {hpo_peft.__version__}"


def test_stores_are_the_flag_then_the_config_then_the_environment_then_the_default(monkeypatch):
    from hpo_peft.core import stores
    from hpo_peft.core.config import StudyConfig

    config = StudyConfig.model_validate({"data": {"root": "x"}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    plain = StudyLocation.of(config, None, None, None)
    assert (plain.storage, plain.tracking_uri) == (None, None)  # the defaults under mlruns/
    assert stores.default_tracking_uri().endswith("mlruns/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    monkeypatch.setenv("OPTUNA_STORAGE", "env.journal")
    assert stores.default_tracking_uri() == "http://env-host:5000"
    from_env = StudyLocation.of(config, None, None, None)
    assert (from_env.storage, from_env.tracking_uri) == ("env.journal", "http://env-host:5000")
    config.tracking.uri = "sqlite:///config.db"
    assert StudyLocation.of(config, None, None, None).tracking_uri == "sqlite:///config.db"
    flagged = StudyLocation.of(config, None, "flag.journal", "sqlite:///flag.db")
    assert (flagged.storage, flagged.tracking_uri) == ("flag.journal", "sqlite:///flag.db")


def test_ui_links_for_a_server_use_its_address(monkeypatch, capsys):
    """The links name the tracking server as the URI gives it (never its credentials), also where
    the URI comes from MLFLOW_TRACKING_URI; a local store's say how to start `mlflow ui`."""
    from hpo_peft.app import commands
    from hpo_peft.tracking import tracker as tracking
    from hpo_peft.core.config import StudyConfig
    from hpo_peft.tracking.ui_links import print_links, study_links

    class Opened:  # the store as Tracker opens it, without a server to answer
        def __init__(self, uri, experiment, create=True, checked=False):
            self.uri, self.experiment_id = uri or "sqlite:////somewhere/mlruns/mlflow.db", "7"

    monkeypatch.setattr(tracking, "Tracker", Opened)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example.org:8443/mlflow/")
    where = StudyLocation.of(StudyConfig.model_validate({"data": {"root": "x"}}), "s", None, None)
    links = commands.ui_links(where, "abc123")
    assert links["run_table"].startswith("https://mlflow.example.org:8443/mlflow/#/experiments/7/runs?")
    assert links["best_run"].startswith("https://mlflow.example.org:8443/mlflow/#/experiments/7/runs/abc123?")
    assert "start_ui" not in links
    print_links(links)
    printed = capsys.readouterr().out
    assert "secret" not in printed and "127.0.0.1" not in printed and "start it" not in printed

    local = study_links("sqlite:////data/my study/mlflow.db", "s", "abc123")
    assert local["run_table"].startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    assert local["start_ui"] == "mlflow ui --backend-store-uri 'sqlite:////data/my study/mlflow.db'"
    print_links(local)
    assert "(start it with: mlflow ui --backend-store-uri 'sqlite:////data/my study/mlflow.db')" in capsys.readouterr().out


@pytest.mark.slow
def test_study_best_evaluate_and_predict_find_the_stores_in_the_environment(conventions_env, tmp_path):
    """No --storage or --tracking-uri anywhere: `study best`, `evaluate --register` and
    `predict models:/NAME@best IMAGE` all use OPTUNA_STORAGE and MLFLOW_TRACKING_URI."""
    moved = conventions_env
    code, printed = run_cli("study", "best", str(moved["config"]), "--json")
    assert code == 0 and json.loads(printed)["mlflow_run_id"]
    code, printed = run_cli("evaluate", str(moved["config"]), "--register", "conventions-best", "--json")
    assert code == 0, printed
    image = sorted((moved["A"] / "images").iterdir())[0]
    out = tmp_path / "predictions.csv"
    code, printed = run_cli("predict", "models:/conventions-best@best", str(image), "--out", str(out))
    assert code == 0, printed
    assert [Path(p).name for p in pd.read_csv(out)["image"]] == [image.name]
    assert not (moved["work"] / "mlruns").exists()  # nothing went to the default stores


# 4. several GPUs ---------------------------------------------------------------------------------
def test_visible_gpus_come_from_cuda_visible_devices_else_the_count(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runtime.visible_gpus() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, GPU-8f6c,-1,5")  # CUDA stops at the first negative entry
    assert runtime.visible_gpus() == ["4", "GPU-8f6c"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.visible_gpus() == []


def test_worker_i_gets_gpu_i_mod_g_unless_the_config_names_a_device():
    assert runtime.worker_gpus(5, {"auto"}, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert runtime.worker_gpus(2, {"cuda"}, ["6", "7", "9"]) == ["6", "7"]
    assert runtime.worker_gpus(3, {"auto", "cpu"}, ["2"]) == ["2", "2", "2"]
    assert runtime.worker_gpus(2, {"cuda:1"}, ["0", "1"]) == [None, None]  # pinned: every worker on cuda:1
    assert runtime.worker_gpus(2, {"auto", "cuda:0"}, ["0", "1"]) == [None, None]
    assert runtime.worker_gpus(2, {"cpu"}, ["0", "1"]) == [None, None]
    assert runtime.worker_gpus(2, {"auto"}, []) == [None, None]


def test_run_workers_hands_each_worker_its_gpu(write_config, monkeypatch, capsys):
    """With 3 GPUs counted (CUDA_VISIBLE_DEVICES unset), --jobs 4 gives workers 0..3 GPUs 0, 1, 2, 0;
    no process is started (the spawn context is a stand-in)."""
    import multiprocessing

    import torch

    from hpo_peft.study import session as study
    from hpo_peft.core.config_file import load_config

    started = []

    class Process:
        def __init__(self, target, args, name):
            self.target, self.args, self.name, self.exitcode, self.pid = target, args, name, 0, None

        def start(self):
            started.append(self)

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

    monkeypatch.setattr(multiprocessing, "get_context", lambda method: types.SimpleNamespace(Process=Process))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = load_config(write_config(search=CHEAP), [])
    options = StudyLocation("gpus", storage="unused.journal", tracking_uri="sqlite:///unused.db")
    study.run_workers(config, options, "parent", n_trials=5, timeout=None, jobs=4)
    assert [w.target for w in started] == [study._worker] * 4
    assert [w.args[-1] for w in started] == ["0", "1", "2", "0"]
    assert [w.args[3] for w in started] == [2, 1, 1, 1]  # the trials, split as before
    assert "worker 3 on 0" in capsys.readouterr().out

    started.clear()  # a named device is used as named: the workers keep the parent's list
    study.run_workers(load_config(write_config(search=CHEAP), ["train.device=cuda:1"]), options, "parent",
                      n_trials=2, timeout=None, jobs=2)
    assert [w.args[-1] for w in started] == [None, None]


def test_a_worker_sets_its_gpu_before_anything_else(monkeypatch):
    """The first thing `_worker` does is set CUDA_VISIBLE_DEVICES: before the parent watch, the
    config, the stores or torch's CUDA (which reads it once, when it starts)."""
    import torch

    from hpo_peft.study import session as study

    seen = []

    class Stop(Exception):
        pass

    def first_call():
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        raise Stop

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # the parent's list; restored after the test
    monkeypatch.setattr(interrupts, "exit_with_parent", first_call)
    with pytest.raises(Stop):
        study._worker("{}", StudyLocation("s", "x.journal", "sqlite:///x.db"), "parent", 1, None, "2")
    assert seen == ["2"]
    assert not torch.cuda.is_initialized()


# 5. a study follows its dataset ------------------------------------------------------------------
def test_a_study_continues_on_a_copy_of_its_data_elsewhere(moved):
    assert moved["code"] == 0, moved["printed"]
    assert len(moved["study"].trials) == 2
    assert {t.state.name for t in moved["study"].trials} == {"COMPLETE"}
    recorded = moved["study"].user_attrs[identity.FINGERPRINT_ATTR]
    assert json.loads(recorded["data.root"]) == str(moved["A"].resolve())  # where it started, for the record


def test_a_changed_table_is_still_refused(conventions_env, tmp_path, capsys, refuse_model_loading):
    moved = conventions_env
    changed = tmp_path / "C"
    shutil.copytree(moved["B"], changed)
    table = changed / "partition/Test/Test.xlsx"
    pd.read_excel(table).iloc[:-1].to_excel(table, index=False)  # one test image fewer
    code, _ = run_cli("study", "run", str(moved["config"]), "--n-trials", "1", "--set", f"data.root={changed}")
    assert code == 2
    assert identity.CONTENT_KEY in capsys.readouterr().err
    assert len(load_study(StudyLocation(NAME)).trials) == 2


def test_a_study_recorded_with_its_data_path_continues_from_another_folder(moved):
    """A fingerprint from before the content key (its `data.root` compared, no content key) does
    not refuse the same data elsewhere; its training table's digest is still compared."""
    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.core.errors import UserError
    from hpo_peft.study.session import check_settings

    config = prepare_study_config(moved["config"], [f"data.root={moved['B']}"])
    current = identity.fingerprint(config)
    old = {key: value for key, value in current.items() if key != identity.CONTENT_KEY}
    old["data.root"] = json.dumps("/where/it/was/sicapv2")
    check_settings(types.SimpleNamespace(user_attrs={identity.FINGERPRINT_ATTR: old}), config, NAME)
    assert identity.differences(old, current) == []
    changed = dict(old, **{"data.train_table.sha256": json.dumps("0123456789abcdef")})
    assert identity.differences(changed, current) == ["data.train_table.sha256"]
    with pytest.raises(UserError, match="data.train_table.sha256"):
        check_settings(types.SimpleNamespace(user_attrs={identity.FINGERPRINT_ATTR: changed}), config, NAME)
    assert not {"data.format", "data.train_dir", "data.label_column"} & set(current)  # the old keys, no others
    # both new: the content is compared, the path never
    moved_elsewhere = dict(current, **{"data.root": json.dumps("/elsewhere")})
    assert identity.differences(moved_elsewhere, current) == []
    assert identity.differences(dict(current, **{identity.CONTENT_KEY: json.dumps("x")}), current) == [identity.CONTENT_KEY]


def test_an_image_folder_is_known_by_its_files_wherever_it_lies(tmp_path):
    """data.format imagefolder: the train and test folders' files (class folders, names, sizes)."""
    from hpo_peft.core.config import DataConfig

    first = tmp_path / "A"
    for split, label, name in [("train", "a", "1.png"), ("train", "b", "2.png"), ("test", "a", "3.png"), ("test", "b", "4.png")]:
        (first / split / label).mkdir(parents=True, exist_ok=True)
        (first / split / label / name).write_bytes(b"x" * len(name))
    shutil.copytree(first, tmp_path / "B")
    content = {name: identity.data_content(DataConfig(format="imagefolder", root=tmp_path / name)) for name in "AB"}
    assert content["A"] == content["B"]
    (tmp_path / "B" / "test" / "a" / "3.png").rename(tmp_path / "B" / "test" / "b" / "3.png")  # relabelled
    assert identity.data_content(DataConfig(format="imagefolder", root=tmp_path / "B")) != content["A"]
