"""A model or device that cannot be used: one `hpo-peft: error:` line naming the key and what to do,
exit 2, no traceback, and no minutes of download retries when the hub cannot be reached."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpo_peft.app.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hpo-peft: error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def closed_port() -> int:
    """A loopback port nothing listens on: a hub that cannot be reached, without leaving the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hub_env(tmp_path: Path) -> dict[str, str]:
    """A child process with an empty (or given) HF cache and an unreachable hub on loopback.
    huggingface_hub reads these variables once, at import: hence a fresh process, not monkeypatch."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="*",
        no_proxy="*",
        PYTHONPATH=str(ROOT),
    )
    return env


def run_child(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    # timeout: a guard against a hang only (the old code took ~150 s here)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_an_uncached_hub_model_with_the_hub_unreachable_fails_at_once_in_one_line(write_config, tmp_path):
    config = write_config(model={"name_or_path": "vinid/plip"})
    child = run_child(["-m", "hpo_peft.app.cli", "trial", str(config)], hub_env(tmp_path))
    assert child.returncode == 2, child.stderr[-2000:]
    line = error_line(child.stderr)
    assert "model.name_or_path: 'vinid/plip'" in line and "not in the Hugging Face cache" in line
    assert "could not reach the hub" in line and "gave up after" in line
    assert "--local-dir DIR" in line and "set model.name_or_path to DIR" in line
    assert "Retrying" not in child.stderr
    assert "thrown while requesting" not in child.stderr


def cache_plip(demo_kit: Path, tmp_path: Path) -> Path:
    """The demo model as `vinid/plip` in an HF cache under tmp_path/hf/hub; returns its snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--vinid--plip"
    shutil.copytree(demo_kit / "model", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


LOAD_PLIP = (
    "from hpo_peft.core.config import ModelConfig; from hpo_peft.core.errors import UserError; "
    "from hpo_peft.models.classifier import load_base_model\n"
    "try:\n    base = load_base_model(ModelConfig(name_or_path='vinid/plip')); print('loaded', base.name_or_path)\n"
    "except UserError as err:\n    print('hpo-peft: error:', err)"
)


@pytest.mark.slow
def test_a_hub_model_in_the_local_cache_loads_without_asking_the_hub(demo_kit, tmp_path):
    cache_plip(demo_kit, tmp_path)
    child = run_child(["-c", LOAD_PLIP], hub_env(tmp_path))
    assert child.returncode == 0, child.stderr[-2000:]
    assert "loaded vinid/plip" in child.stdout
    assert "Retrying" not in child.stderr and "thrown while requesting" not in child.stderr


@pytest.mark.slow
def test_damaged_weights_in_the_cache_are_named(demo_kit, tmp_path):
    weights = cache_plip(demo_kit, tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    child = run_child(["-c", LOAD_PLIP], hub_env(tmp_path))
    assert child.returncode == 0, child.stderr[-2000:]
    assert f"model.name_or_path: {weights} is damaged or truncated; re-download it" in error_line(child.stdout)
    assert "Retrying" not in child.stderr


@pytest.mark.parametrize("name", ["./models/plip", "models/plip/v1", "~/plip-not-here", "{tmp}/x/y"])
def test_a_missing_local_model_folder_is_named(write_config, tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    name = name.format(tmp=tmp_path)
    code, _, err = run(capsys, "trial", write_config(model={"name_or_path": name}))
    assert code == 2
    line = error_line(err)
    assert f"model.name_or_path: folder {name} not found" in line
    assert "Repo id" not in line


def test_a_file_given_as_model_folder_is_named(write_config, demo_kit, capsys):
    weights = demo_kit / "model" / "model.safetensors"
    code, _, err = run(capsys, "trial", write_config(model={"name_or_path": str(weights)}))
    assert code == 2
    assert f"model.name_or_path: {weights} is a file, not a model folder" in error_line(err)


def test_a_model_folder_without_config_json_says_so(write_config, demo_kit, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(demo_kit / "model", folder)
    (folder / "config.json").unlink()
    code, _, err = run(capsys, "trial", write_config(model={"name_or_path": str(folder)}))
    assert code == 2
    line = error_line(err)
    assert f"model '{folder}'" in line and "the folder has no config.json" in line


def test_truncated_weights_name_the_damaged_file(write_config, demo_kit, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(demo_kit / "model", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(capsys, "trial", write_config(model={"name_or_path": str(folder)}))
    assert code == 2
    assert f"model.name_or_path: {weights} is damaged or truncated; re-download it" in error_line(err)


@pytest.mark.parametrize(
    "device, expected",
    [
        ("cuda", "train.device: 'cuda' is not available on this machine; set train.device to auto or one of: cpu"),
        ("cuda:1", "train.device: 'cuda:1' is not available on this machine"),
        ("gpu", "train.device: unknown device 'gpu'; use one of auto, cpu, cuda"),  # the config's own check
    ],
)
def test_an_unavailable_device_is_named_with_what_there_is(write_config, monkeypatch, capsys, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    code, _, err = run(capsys, "trial", write_config(), "--set", f"train.device={device}", "--method", "zero_shot")
    assert code == 2
    assert expected in error_line(err)
