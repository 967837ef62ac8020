"""(c) Black-box adapters on the per-process feature cache: linear probe, zero-shot linear probe,
CLIP-Adapter and CLAP with the course's settings; seconds of the cold trial (the cache emptied, so
it extracts the features) and the median of the warm ones (the head alone on cached features)."""

from __future__ import annotations

import statistics
from pathlib import Path

from fixtures import trial_config
from harness import Children, Sizes, fmt, ratio, run_logged, timed_runs

BLACK_BOX = ("linear_probe", "zs_linear_probe", "clip_adapter", "clap")


def child_black_box(kit, model_dir, shots, val_shots, epochs, warm_trials, device) -> dict:
    from hpo_peft.fewshot import features
    from hpo_peft.fewshot.trial import open_workspace, run_trial

    course = {"optimizer": "sgd", "learning_rate": 1e-3, "max_epochs": epochs, "patience": None}
    config = trial_config(kit, model_dir, shots, val_shots, epochs, "auto", device,
                          method_train={m: course for m in BLACK_BOX})
    workspace = open_workspace(config)
    out = {}
    for method in BLACK_BOX:
        features._CACHE.clear()  # this method's first trial extracts the features again (cold)
        times = timed_runs(1 + warm_trials, device,
                           lambda method=method: run_trial(workspace, method, {}, config.train_for(method), progress=False))
        out[method] = {"cold_s": times[0], "warm_s": statistics.median(times[1:]) if warm_trials else None}
    return {"methods": out, "images": len(workspace.data.train) + len(workspace.data.val)}


def measure_black_box(children: Children, kit: Path, model_dir: Path, sizes: Sizes, device: str) -> dict:
    return run_logged(
        children, "black_box", f"(c) black-box adapters: cold + {sizes.warm_trials} warm trials each, {sizes.black_box_epochs} epochs",
        lambda result: (f"{method}: cold {fmt(r['cold_s'], 2)} s, warm {fmt(r['warm_s'], 2)} s" for method, r in result.get("methods", {}).items()),
        kit=str(kit), model_dir=str(model_dir), shots=sizes.shots, val_shots=sizes.val_shots,
        epochs=sizes.black_box_epochs, warm_trials=sizes.warm_trials, device=device)


def report_section(results: dict) -> list[str]:
    sizes, bb = results["sizes"], results["black_box"]
    lines = ["## (c) Black-box adapters on the per-process feature cache", "",
             f"Course settings: SGD (momentum 0.9), lr 1e-3, {sizes['black_box_epochs']} epochs, batch 32, precision "
             f"auto. Cold: the first trial after the cache is emptied (extracts the features of "
             f"{bb.get('images', '-')} images); warm: median of the next {sizes['warm_trials']}.", "",
             "| method | cold s | warm s | cold / warm |", "|---|---|---|---|"]
    if "error" in bb:
        lines.append(f"| failed: {bb['error']} ||||")
    for method, r in bb.get("methods", {}).items():
        lines.append(f"| {method} | {fmt(r['cold_s'], 2)} | {fmt(r['warm_s'], 2)} | {ratio(r['cold_s'], r['warm_s'])} |")
    lines.append("")
    return lines
