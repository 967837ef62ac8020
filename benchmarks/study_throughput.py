"""(b) Study throughput: `run_study` in a fresh process and fresh storage, without pruning and with
the median pruner, on the demo kit config and on the PLIP architecture with the sicapv2_plip space:
trials (pruned, failed), wall time, set-up, trials/h, best value and time to target."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from harness import ROOT, Children, Sizes, fmt, log


def child_study(config_path, overrides, n_trials, folder) -> dict:
    from hpo_peft.core.config_file import load_config
    from hpo_peft.study.session import StudyLocation, run_study

    config = load_config(config_path, overrides)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = StudyLocation("benchmark", storage=str(folder / "o.journal"), tracking_uri=f"sqlite:///{folder}/mlflow.db")
    start = datetime.now()
    started = time.perf_counter()
    study = run_study(config, options, n_trials, None)
    wall_s = time.perf_counter() - started
    trials = [{
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "method": t.params.get("method"),
        "start_s": (t.datetime_start - start).total_seconds() if t.datetime_start else None,
        "end_s": (t.datetime_complete - start).total_seconds() if t.datetime_complete else None,
    } for t in study.trials]
    return {"wall_s": wall_s, "trials": trials}


def study_overrides(kit: Path, model_dir: Path, device: str, pruner: str, extra: list[str]) -> list[str]:
    return [f"data.root={kit / 'sicapv2'}", f"model.name_or_path={model_dir}", "demo_kit=null",
            f"train.device={device}", f"search.pruner={pruner}", *extra]


def summarize_study(result: dict, target: float | None) -> dict:
    trials = result["trials"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    first_start = min((t["start_s"] for t in trials if t["start_s"] is not None), default=0.0)
    last_end = max((t["end_s"] for t in trials if t["end_s"] is not None), default=0.0)
    reached = [t["end_s"] for t in complete if target is not None and t["value"] >= target]
    return {
        "n_trials": len(trials),
        "n_complete": len(complete),
        "n_pruned": sum(t["state"] == "PRUNED" for t in trials),
        "n_failed": sum(t["state"] == "FAIL" for t in trials),
        "best": max((t["value"] for t in complete), default=None),
        "wall_s": result["wall_s"],
        "setup_s": first_start,
        "trials_per_hour": 3600 * len(trials) / result["wall_s"],
        "trials_per_hour_trials_only": 3600 * len(trials) / max(last_end - first_start, 1e-9),
        "target": target,
        "time_to_target_s": min(reached) if reached else None,
        "peak_rss_mib": result.get("peak_rss_mib"),
    }


def measure_study_pair(children: Children, label: str, config: Path, kit: Path, model_dir: Path, device: str,
                       pruner: str, n_trials: int, extra: list[str]) -> dict:
    """The same study without and with pruning, each in a fresh process and fresh storage."""
    raw = {}
    for name, spec in (("none", "{name: none}"), ("pruned", pruner)):
        log(f"(b) {label}: {n_trials} trials, pruner {spec}")
        raw[name] = children.run("study", config_path=str(config), n_trials=n_trials,
                                 overrides=study_overrides(kit, model_dir, device, spec, extra),
                                 folder=str(children.tmp / f"study-{label}-{name}"))
        if "error" in raw[name]:
            return {"error": raw[name]["error"], "pruner": pruner}
    best = max((t["value"] for t in raw["none"]["trials"] if t["state"] == "COMPLETE"), default=None)
    target = None if best is None else best - 2.0
    out = {"pruner": pruner, "none": summarize_study(raw["none"], target), "pruned": summarize_study(raw["pruned"], target)}
    for name in ("none", "pruned"):
        s = out[name]
        log(f"    {name}: {s['n_trials']} trials ({s['n_pruned']} pruned) in {s['wall_s']:.0f} s = "
            f"{s['trials_per_hour']:.0f}/h; target {fmt(target)} reached at {fmt(s['time_to_target_s'])} s")
    return out


def measure_studies(children: Children, kit: Path, model_dir: Path, sizes: Sizes, device: str) -> dict:
    out = {"demo": measure_study_pair(
        children, "demo", ROOT / "studies" / "demo.yaml", kit, kit / "model", device,
        "{name: median, n_startup_trials: 2, n_warmup_steps: 4}", sizes.demo_trials,
        [] if sizes.full_arch else ["search.params.max_epochs=2"])}
    if sizes.plip_trials:
        out["plip"] = measure_study_pair(
            children, "plip", ROOT / "studies" / "sicapv2_plip.yaml", kit, model_dir, device,
            "{name: median, n_startup_trials: 1, n_warmup_steps: 0}", sizes.plip_trials,
            [f"search.params.max_epochs={sizes.epochs}"])
    return out


def report_section(results: dict) -> list[str]:
    sizes = results["sizes"]
    lines = ["## (b) Study throughput (`run_study`)", ""]
    names = {"demo": "demo kit (`studies/demo.yaml`, tiny model, fp32)",
             "plip": f"{'PLIP architecture' if sizes['full_arch'] else 'tiny CLIP'} (`studies/sicapv2_plip.yaml` space, "
                     f"epochs {sizes['epochs']}, precision auto)"}
    lines += ["Trials/h counts every trial (pruned ones too) over the whole `run_study` call (model load, decoding, "
              "MLflow set-up included) and over the trials alone. Time to target: seconds from the call until a "
              "completed trial first reaches the no-pruning study's best validation balanced accuracy minus 2 points.",
              "",
              "| study | pruner | trials (pruned, failed) | wall s | set-up s | trials/h | trials/h, trials only | best val bacc | target | time to target s | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, pair in results["studies"].items():
        if "error" in pair:
            lines.append(f"| {names[key]} | failed: {pair['error']} ||||||||||")
            continue
        for label in ("none", "pruned"):
            s = pair[label]
            lines.append(
                f"| {names[key]} | {'none' if label == 'none' else pair['pruner'].strip('{}')} | {s['n_trials']} ({s['n_pruned']}, {s['n_failed']}) | "
                f"{fmt(s['wall_s'])} | {fmt(s['setup_s'])} | {fmt(s['trials_per_hour'], 0)} | "
                f"{fmt(s['trials_per_hour_trials_only'], 0)} | {fmt(s['best'])} | {fmt(s['target'])} | "
                f"{fmt(s['time_to_target_s'])} | {fmt(s['peak_rss_mib'], 0)} |")
    if "plip" not in results["studies"]:
        lines.append("\nPLIP-architecture study: skipped in quick mode.")
    lines.append("")
    return lines
