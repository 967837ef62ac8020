"""Shared plumbing of the benchmarks: sizes, logging, fresh-process measurement, peak memory,
timing sync, the machine description and the table-cell formatting used by every report section.

Measures nothing itself. `Children.run` starts `benchmarks/run.py _child ...` so that every
measurement runs in a fresh process whose peak memory and caches are its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("run.py")  # the runner, whose `_child` sub-command runs a measurement
PEFT_METHODS = ("affine_ln", "bias", "lora", "full")


@dataclass(frozen=True)
class Sizes:
    full_arch: bool  # CLIPConfig() (PLIP's ViT-B/32) or a tiny CLIP for --quick
    shots: int
    val_shots: int
    epochs: int
    trial_methods: tuple[str, ...]  # (a)
    trial_repeats: int  # (a), ours: trials per process (the first is compared with the baseline)
    demo_trials: int  # (b i), per pruner setting
    plip_trials: int  # (b ii), per pruner setting; 0 skips
    warm_trials: int  # (c), after the cold one
    black_box_epochs: int
    accuracy_epochs: int
    accuracy_methods: tuple[str, ...]
    gpu_batches: tuple[int, ...]
    gpu_steps: int
    matmul_size: int


FULL = Sizes(True, 16, 16, 2, PEFT_METHODS, 2, 12, 4, 3, 100, 20, ("lora", "bias", "affine_ln", "full"), (32, 64, 128), 20, 8192)
QUICK = Sizes(False, 4, 4, 1, ("lora",), 2, 2, 1, 1, 5, 1, ("lora", "bias"), (4, 8), 2, 512)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Subprocesses, memory and timing
# ---------------------------------------------------------------------------------------------


class Children:
    """Runs `_child` subprocesses one at a time, in the run's scratch folder (their working
    directory, so that nothing they write by a relative path lands in the repository)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.count = 0

    def run(self, kind: str, **params) -> dict:
        self.count += 1
        result_path = self.tmp / f"child-{self.count}.json"
        log_path = self.tmp / f"child-{self.count}.log"
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, str(SCRIPT), "_child", json.dumps({"kind": kind, **params}), str(result_path)]
        started = time.perf_counter()
        with open(log_path, "w") as output:
            code = subprocess.run(command, cwd=self.tmp, env=env, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
        if code != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            log(f"  FAILED ({kind}, exit {code}):\n    " + "\n    ".join(tail))
            return {"error": tail[-1] if tail else f"exit code {code}"}
        result = json.loads(result_path.read_text())
        result["process_s"] = time.perf_counter() - started
        return result


def run_logged(children: Children, kind: str, heading: str, lines_of, **params) -> dict:
    """Log `heading`, run the `kind` child, then log each line that `lines_of(result)` gives."""
    log(heading)
    result = children.run(kind, **params)
    for line in lines_of(result):
        log(f"    {line}")
    return result


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM). `ru_maxrss` is kept in the JSON too, but on Linux
    a child's `ru_maxrss` starts at its parent's peak (it survives fork and exec), so it is not used."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(kinds: dict, spec_json: str, result_path: str) -> None:
    """In the child: run the measurement `kinds[spec["kind"]]` and write its result with the peak memory."""
    spec = json.loads(spec_json)
    result = kinds[spec.pop("kind")](**spec)
    result["peak_rss_mib"] = peak_rss_mib()
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(result_path).write_text(json.dumps(result))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_runs(count: int, device: str, work) -> list[float]:
    """Seconds of each of `count` calls of `work()`, the device synchronised before the clock stops."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


# ---------------------------------------------------------------------------------------------
# Machine description and table cells
# ---------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal")), 0)
    from hpo_peft.core.runtime import cpu_has_bf16

    versions = {}
    for package in ("torch", "transformers", "peft", "optuna", "mlflow", "torchvision"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    try:  # a device machine may have the working tree without git or .git: HPO_PEFT_COMMIT names the commit there
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_bf16(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none",
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit or os.environ.get("HPO_PEFT_COMMIT", "unknown"),
        "load_average_start": os.getloadavg()[0],
    }


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"
