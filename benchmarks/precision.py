"""Demo-kit accuracy, fp32 vs bf16: `run_trial` on `studies/demo.yaml` (its tiny model and learning
rate) for several methods, once with `precision: fp32` and once with `bf16`, without early stopping:
validation balanced accuracy per method and the mean, to check that bf16 does not cost accuracy."""

from __future__ import annotations

import statistics
from pathlib import Path

from harness import ROOT, Children, Sizes, run_logged


def child_accuracy(kit, methods, epochs, device) -> dict:
    from hpo_peft.core.config_file import load_config
    from hpo_peft.fewshot.trial import open_workspace, run_trial

    config = load_config(ROOT / "studies" / "demo.yaml", [
        f"data.root={Path(kit) / 'sicapv2'}", f"model.name_or_path={Path(kit) / 'model'}", "demo_kit=null", f"train.device={device}"])
    workspace = open_workspace(config)
    rows = []
    for method in methods:
        for precision in ("fp32", "bf16"):
            train = config.train_for(method, max_epochs=epochs, patience=None, precision=precision)
            outcome = run_trial(workspace, method, config.methods.get(method, {}), train, progress=False)
            rows.append({"method": method, "precision": precision, "val_bacc": outcome.validation.balanced_accuracy,
                         "seconds": outcome.seconds})
    return {"rows": rows, "learning_rate": config.train.learning_rate}


def measure_accuracy(children: Children, kit: Path, sizes: Sizes, device: str) -> dict:
    return run_logged(
        children, "accuracy", f"demo-kit accuracy: {list(sizes.accuracy_methods)} x fp32/bf16, {sizes.accuracy_epochs} epochs",
        lambda result: (f"{row['method']} {row['precision']}: {row['val_bacc']:.1f}%" for row in result.get("rows", [])),
        kit=str(kit), methods=list(sizes.accuracy_methods), epochs=sizes.accuracy_epochs, device=device)


def report_section(results: dict) -> list[str]:
    sizes, acc = results["sizes"], results["accuracy"]
    lines = ["## Demo-kit accuracy: fp32 vs bf16", "",
             f"`run_trial` on `studies/demo.yaml` (tiny demo model, lr {acc.get('learning_rate', '-')}), "
             f"epochs {sizes['accuracy_epochs']} without early stopping (best epoch kept), validation balanced accuracy %.", "",
             "| method | fp32 | bf16 | bf16 - fp32 |", "|---|---|---|---|"]
    if "error" in acc:
        lines.append(f"| failed: {acc['error']} ||||")
    by_method: dict[str, dict[str, float]] = {}
    for row in acc.get("rows", []):
        by_method.setdefault(row["method"], {})[row["precision"]] = row["val_bacc"]
    for method, v in by_method.items():
        lines.append(f"| {method} | {v['fp32']:.1f} | {v['bf16']:.1f} | {v['bf16'] - v['fp32']:+.1f} |")
    if by_method:
        mean = {p: statistics.mean(v[p] for v in by_method.values()) for p in ("fp32", "bf16")}
        lines.append(f"| mean | {mean['fp32']:.1f} | {mean['bf16']:.1f} | {mean['bf16'] - mean['fp32']:+.1f} |")
    return lines
