"""Does `train.augment: dihedral` help? Fixed settings, with and without, on the demo kit's unseen images.

    python benchmarks/augment.py [--seeds 1 ... 10] [--kit benchmarks/out/selection/kit] [--report FILE.md]

For each sampling seed (`data.seed`; holdout 16 + 16 shots, studies/demo.yaml's training settings,
fp32), a few fixed configurations train twice, `augment: none` and `augment: dihedral`, through the
package's own trial code (`trial.run_trial`: early stopping on the validation images, best epoch
kept), and each is scored on the kit's Unseen.xlsx (selection.py's table of 1000 new images per
class, drawn into --kit if missing). Both runs of a pair see the same shots and the same seed; they
differ by the training images' flips and turns alone. Prints a Markdown report (per seed, then the
mean difference and its standard error over seeds per configuration) and writes it to --report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from harness import machine_info  # benchmarks/harness.py
from selection import (  # benchmarks/selection.py
    DEMO,
    UNSEEN_TABLE,
    add_unseen_table,
    kit_overrides,
)

from hpo_peft.app.commands import prepare_config
from hpo_peft.data import load_test
from hpo_peft.demo_kit import build_demo_kit
from hpo_peft.fewshot.evaluate import evaluate
from hpo_peft.fewshot.trial import open_workspace, run_trial

CONFIGS = {  # label: (method, options, training settings over demo.yaml's)
    "lora r4, Adam 1e-3, 20 epochs (the course's)": ("lora", {"rank": 4}, {"learning_rate": 1e-3, "max_epochs": 20, "patience": 5}),
    "lora r16, Adam 3e-3, 30 epochs": ("lora", {"rank": 16}, {"learning_rate": 3e-3, "max_epochs": 30, "patience": 8}),
    "bias, Adam 3e-3, 20 epochs": ("bias", {}, {"learning_rate": 3e-3, "max_epochs": 20, "patience": 5}),
    "full, Adam 1e-3, 20 epochs": ("full", {}, {"learning_rate": 1e-3, "max_epochs": 20, "patience": 5}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--kit", type=Path, default=ROOT / "out" / "selection" / "kit")
    parser.add_argument("--unseen-per-class", type=int, default=1000)
    parser.add_argument("--report", type=Path, default=ROOT / "results" / f"augment-{datetime.now():%Y-%m-%d}.md")
    args = parser.parse_args()
    build_demo_kit(args.kit)
    add_unseen_table(args.kit, args.unseen_per_class)
    started, base, scores = time.time(), None, {label: [] for label in CONFIGS}
    for seed in args.seeds:
        overrides = [*kit_overrides(args.kit, seed), "train.precision=fp32", "data.validation=holdout",
                     "data.shots=16", "data.val_shots=16", f"data.test_table={UNSEEN_TABLE}"]
        config = prepare_config(DEMO, overrides)
        workspace = open_workspace(config, base)
        base = workspace.base
        unseen = load_test(config.data, base.preprocessing)
        for label, (method, options, train) in CONFIGS.items():
            pair = []
            for augment in ("none", "dihedral"):
                settings = config.train.model_copy(update={**train, "augment": augment})
                outcome = run_trial(workspace, method, options, settings, progress=False)
                pair.append(evaluate(outcome.classifier, unseen, base.preprocessing, config.data.categories).balanced_accuracy)
            scores[label].append((seed, *pair))
            print(f"seed {seed}, {label}: {pair[0]:.2f} -> {pair[1]:.2f}", flush=True)
    report = render(scores, args, time.time() - started)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    print(report)


def render(scores: dict, args: argparse.Namespace, seconds: float) -> str:
    info = machine_info("cpu")
    lines = ["# Dihedral augmentation: fixed settings with and without, on unseen images", "",
             f"- {info['date']}; commit {info['commit']}; {info['cpu']}, {info['cores']} cores ({info['torch_threads']} "
             f"torch threads); torch {info['versions']['torch']}; CPU, fp32; {seconds / 60:.1f} min",
             f"- `python benchmarks/augment.py --seeds {' '.join(map(str, args.seeds))}`: demo kit, holdout 16 + 16 "
             f"shots, early stopping on the validation images; balanced accuracy (%) on Unseen.xlsx "
             f"({args.unseen_per_class} images per class)", "",
             "| configuration | seeds | none | dihedral | difference | SE of the difference | seeds better |",
             "|---|---|---|---|---|---|---|"]
    for label, rows in scores.items():
        diffs = [turned - plain for _, plain, turned in rows]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        lines.append(f"| {label} | {len(rows)} | {statistics.mean(r[1] for r in rows):.2f} | "
                     f"{statistics.mean(r[2] for r in rows):.2f} | {statistics.mean(diffs):+.2f} | {se:.2f} | "
                     f"{sum(d > 0 for d in diffs)} of {len(diffs)} |")
    lines += ["", "Per seed (none -> dihedral):", ""]
    for label, rows in scores.items():
        lines.append(f"- {label}: " + "; ".join(f"{s}: {a:.2f} -> {b:.2f}" for s, a, b in rows))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
