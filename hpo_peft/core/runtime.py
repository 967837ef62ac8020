"""Where and how this process computes: seeds, the device, the precision and its autocast, and
who this process is (host, pid) for the records of several workers."""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from hpo_peft.core.errors import UserError

WORKER_HOST_ENV = "HPO_PEFT_WORKER_HOST"


def worker_identity() -> dict[str, object]:
    """This process, as recorded on its trials and runs: host (the machine's name, or
    `HPO_PEFT_WORKER_HOST` where containers or cluster nodes share one) and pid."""
    return {"host": os.environ.get(WORKER_HOST_ENV) or socket.gethostname(), "pid": os.getpid()}


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RandomStream:
    """A torch random stream of its own (the CPU's and, on CUDA, the device's), starting where the
    global one is now. Runs that take turns (kfold's folds, trained in lockstep) each draw inside
    `active()` exactly what they would draw alone, and leave the global stream as it was."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.state = self._now()

    def _now(self) -> tuple:
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.cuda) if self.cuda else None)

    @contextmanager
    def active(self):
        with torch.random.fork_rng(devices=[self.cuda] if self.cuda else []):
            torch.set_rng_state(self.state[0])
            if self.cuda:
                torch.cuda.set_rng_state(self.state[1], self.cuda)
            yield
            self.state = self._now()


def available_devices() -> list[str]:
    """What `train.device` can name on this machine."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names += ["mps", "mps:0"]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += ["xpu", *(f"xpu:{i}" for i in range(xpu.device_count()))]
    return names


GPU_ENV = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them: its entries where it is
    set (indices, UUIDs or MIG ids; CUDA stops at the first negative one), else 0..N-1 for the N
    GPUs torch counts (through NVML where it can: counting does not start CUDA)."""
    listed = os.environ.get(GPU_ENV)
    if listed is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    entries = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def worker_gpus(jobs: int, devices: set[str], visible: list[str] | None = None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `jobs` worker processes on one machine: worker i sees GPU
    i mod G of the G visible ones, as its only device. None (the parent's own list) where the config
    pins a device (`train.device: cuda:N` is used as named, by every worker) or there is no GPU.
    `devices`: the `train.device` values the config uses (`train`'s and `method_train`'s)."""
    if any(":" in device for device in devices) or not devices & {"auto", "cuda"}:
        return [None] * jobs
    visible = visible_gpus() if visible is None else visible
    if not visible:
        return [None] * jobs
    return [visible[i % len(visible)] for i in range(jobs)]


def spread_workers(jobs: int, config) -> list[str | None]:
    """`worker_gpus` for a study config's devices (`train`'s and `method_train`'s), said in one line
    where workers get GPUs."""
    devices = {config.train.device, *(str(t["device"]) for t in config.method_train.values() if "device" in t)}
    gpus = worker_gpus(jobs, devices)
    if any(gpus):
        print(f"the workers' GPUs ({GPU_ENV}): " + ", ".join(f"worker {i} on {gpu}" for i, gpu in enumerate(gpus)),
              flush=True)
    return gpus


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA, else MPS, else CPU. A named device must exist here (UserError otherwise)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = available_devices()
    advice = f"set train.device to auto or one of: {', '.join(available)}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"train.device: {name!r} is not a device name; {advice}") from None
    if device.type != "cpu" and str(device) not in available:
        raise UserError(f"train.device: {name!r} is not available on this machine; {advice}")
    return device


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: on such a CPU a PLIP trial runs faster under bf16 autocast
    than in fp32 (docs/configs.md, "Precision and device"); without them bf16 is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass(frozen=True)
class Placement:
    """Where a run computes and its encoder's autocast dtype (None: fp32), resolved once from a
    device name and a precision (`train.device`, `train.precision`) and handed down from there."""

    device: torch.device
    dtype: torch.dtype | None

    @classmethod
    def of(cls, device: str, precision: str) -> "Placement":
        where = resolve_device(device)
        return cls(where, amp_dtype(precision, where))

    def autocast(self):
        return autocast(self.device, self.dtype)
