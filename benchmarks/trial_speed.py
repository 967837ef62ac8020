"""(a) One trial: the course notebook's loop (course_loop.py) vs ours (`open_workspace` once, then
`run_trial`, with precision fp32 and auto), per method: trial seconds, the one-off workspace cost,
their ratios, trainable parameters and peak memory (RSS; on CUDA also GPU)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from fixtures import trial_config
from harness import Children, Sizes, fmt, log, ratio, sync, timed_runs


def child_ours(kit, model_dir, method, shots, val_shots, epochs, precision, device, repeats) -> dict:
    from hpo_peft.models.classifier import load_base_model
    from hpo_peft.core.runtime import amp_dtype, resolve_device
    from hpo_peft.fewshot.trial import open_workspace, run_trial

    config = trial_config(kit, model_dir, shots, val_shots, epochs, precision, device)
    started = time.perf_counter()
    base = load_base_model(config.model)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    workspace = open_workspace(config, base)  # text prototypes + decoding every image once
    sync(device)
    workspace_s = time.perf_counter() - started
    options = {"rank": 4} if method == "lora" else {}
    outcomes = []
    # the first trial pays one-off kernel set-up, as the baseline's only trial does
    times = timed_runs(repeats, device, lambda: outcomes.append(run_trial(workspace, method, options, config.train, progress=False)))
    outcome = outcomes[-1]
    dtype = amp_dtype(precision, resolve_device(device))
    return {"load_s": load_s, "workspace_s": workspace_s, "trial_s": times[0], "trial_times_s": times,
            "trainable": outcome.trainable_parameters,
            "dtype": str(dtype or torch.float32).removeprefix("torch."), "val_bacc": outcome.validation.balanced_accuracy}


def measure_trials(children: Children, kit: Path, model_dir: Path, sizes: Sizes, device: str) -> dict:
    common = dict(kit=str(kit), model_dir=str(model_dir), shots=sizes.shots, val_shots=sizes.val_shots, epochs=sizes.epochs, device=device)
    out = {}
    for method in sizes.trial_methods:
        row = {"baseline": children.run("baseline", method=method, **common)}
        log(f"(a) {method}: baseline {fmt(row['baseline'].get('trial_s'))} s")
        for precision in ("fp32", "auto"):
            row[precision] = children.run("ours", method=method, precision=precision, repeats=sizes.trial_repeats, **common)
            r = row[precision]
            log(f"(a) {method}: ours {precision} ({r.get('dtype')}) trials {[round(t, 1) for t in r.get('trial_times_s', [])]} s "
                f"+ workspace {fmt(r.get('workspace_s'))} s")
        out[method] = row
    return out


def trials_cell(result: dict) -> str:
    """First trial of the process, then the later ones in brackets."""
    times = result.get("trial_times_s") or []
    later = f" ({', '.join(fmt(t) for t in times[1:])})" if len(times) > 1 else ""
    return (fmt(times[0]) if times else "-") + later


def report_section(results: dict) -> list[str]:
    m, sizes = results["machine"], results["sizes"]
    gpu = m["device"] == "cuda"
    trials = results["trials"]
    lines = [
        "## (a) One trial: the course's loop vs ours",
        "",
        f"Epochs {sizes['epochs']}, batch 32, Adam 1e-3, validation after every epoch and once at the end, on "
        f"`{m['device']}`. Baseline: the notebook's loop (PIL decode + ToTensor/Normalize/Resize in every `__getitem__`, "
        "DataLoader, fp32). Ours: `run_trial` after `open_workspace`, which decodes every image once per process "
        "(column *workspace*: decoding + text prototypes, paid once per study process, not per trial). Each "
        "measurement is a fresh process; ours runs the trial "
        f"{sizes['trial_repeats']} time(s) there: the first (compared with the baseline's only trial) and, in "
        "brackets, the later ones, which no longer pay one-off kernel set-up. auto = bf16 autocast where "
        "the device has native bf16, else fp32 (the dtype is shown). Peak RSS: the process's own VmHWM "
        "(whole CLIP model loaded in both).",
        "",
        "| method | trainable (ours / notebook) | baseline s | ours fp32 s | ours auto s | baseline / ours fp32 | "
        "baseline / ours auto | workspace s (once) | baseline / (workspace + ours auto) | "
        "peak RSS MiB baseline / fp32 / auto |"
        + (" peak GPU MiB baseline / fp32 / auto |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for method, row in trials.items():
        b, f, a = row["baseline"], row["fp32"], row["auto"]
        cells = [
            method,
            f"{fmt(f.get('trainable'))} / {fmt(b.get('trainable'))}",
            fmt(b.get("trial_s")),
            trials_cell(f),
            f"{trials_cell(a)}, {a.get('dtype', '-')}",
            ratio(b.get("trial_s"), f.get("trial_s")),
            ratio(b.get("trial_s"), a.get("trial_s")),
            fmt(a.get("workspace_s")),
            ratio(b.get("trial_s"), (a.get("workspace_s") or 0) + (a.get("trial_s") or 0)),
            " / ".join(fmt(r.get("peak_rss_mib"), 0) for r in (b, f, a)),
        ]
        if gpu:
            cells.append(" / ".join(fmt(r.get("peak_gpu_mib"), 0) for r in (b, f, a)))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{method} {k}: {r['error']}" for method, row in trials.items() for k, r in row.items() if "error" in r]
    lines += [""] + [f"- failed: {e}" for e in errors] + ([""] if errors else [])
    return lines
