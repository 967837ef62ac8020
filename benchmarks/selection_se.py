"""Does the standard error printed beside a selection score say how far it is from unseen images?

    python benchmarks/selection_se.py RESULT.json [RESULT.json ...] --studies DIR [DIR ...] [--report FILE.md]

RESULT.json: what benchmarks/selection.py writes beside its report; DIR: the `--out` folders of
those runs, which hold each study's stores (`{setup}-seed{seed}/mlflow.db`). For every study the
run `evaluate` scored (the study's pick) is read from its MLflow store: its per-class validation
recall (`final_val_recall_*`, logged by every run, also before the package printed the error)
gives the standard error `study best` and `evaluate` print (evaluate.balanced_accuracy_se, the
validation images per class taken from the set-up), and its row the score on Unseen.xlsx. If the
error is honest, the gaps (selection score - unseen score) less their mean, divided by it, spread
by about 1; about 68 % of them lie within one error of the mean gap and 95 % within two. (The mean
gap is the best-of-trials optimism and the refit's gain, which no single study can see.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection as bench  # benchmarks/selection.py: Row, SETUPS


def validation_images(setup: str) -> int:
    """Per class: kfold validates every shot once; holdout its val_shots."""
    values = dict(item.split("=", 1) for item in bench.SETUPS[setup][1])
    return int(values["data.shots"] if values["data.validation"] == "kfold" else values["data.val_shots"])


def picked_recall(store: Path) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "metrics.test_balanced_accuracy >= 0")
    if len(runs) != 1:
        raise SystemExit(f"{store}: expected one evaluated run, found {len(runs)}")
    metrics = runs[0].data.metrics
    return [v for k, v in sorted(metrics.items()) if k.startswith("final_val_recall_")]


def study_rows(rows: list[bench.Row], folders: list[Path]) -> list[tuple[str, int, float, float]]:
    """(setup, seed, gap on Unseen.xlsx, standard error) per study."""
    from hpo_peft.fewshot.evaluate import balanced_accuracy_se

    out = []
    for row in rows:
        if row.validation is None or row.setup not in bench.SETUPS:
            continue
        stores = [f / f"{row.setup}-seed{row.seed}" / "mlflow.db" for f in folders]
        store = next((s for s in stores if s.is_file()), None)
        if store is None:
            raise SystemExit(f"no store for set-up {row.setup} seed {row.seed} in {', '.join(map(str, folders))}")
        recall = picked_recall(store)
        error = balanced_accuracy_se(recall, [validation_images(row.setup)] * len(recall))
        out.append((row.setup, row.seed, row.validation - row.unseen, error))
    return out


def report(studies: list[tuple[str, int, float, float]], paths: list[Path], folders: list[Path]) -> str:
    seeds = sorted({s for _, s, _, _ in studies})
    lines = ["# The standard error beside a selection score, against unseen images", "",
             f"- {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}) from: {', '.join(p.name for p in paths)}; studies in "
             f"{', '.join(str(f) for f in folders)}",
             f"- {datetime.now():%Y-%m-%d}: `python benchmarks/selection_se.py {' '.join(p.name for p in paths)} "
             f"--studies {' '.join(f.name for f in folders)}` (reads the stores; trains nothing)",
             "- gap: selection score - accuracy on Unseen.xlsx; SE: evaluate.balanced_accuracy_se of the pick's "
             "per-class validation recall", "",
             "| set-up | studies | mean gap | SD of gaps | RMS of SE | SD of (gap - mean) / SE | within 1 SE | within 2 SE |",
             "|---|---|---|---|---|---|---|---|"]
    for setup, (label, _) in bench.SETUPS.items():
        mine = [(gap, se) for key, _, gap, se in studies if key == setup]
        if len(mine) < 2:
            continue
        gaps = [g for g, _ in mine]
        mean = statistics.mean(gaps)
        z = [(g - mean) / se for g, se in mine if se > 0]
        rms = math.sqrt(statistics.mean(se * se for _, se in mine))
        within = [sum(abs(g - mean) <= k * se for g, se in mine) / len(mine) for k in (1, 2)]
        lines.append(f"| {setup}: {label} | {len(mine)} | {mean:+.2f} | {statistics.stdev(gaps):.2f} | {rms:.2f} | "
                     f"{statistics.stdev(z):.2f} | {within[0]:.0%} | {within[1]:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--studies", nargs="+", type=Path, required=True)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    rows = [bench.Row(**r) for path in args.results for r in json.loads(path.read_text())]
    text = report(study_rows(rows, args.studies), args.results, args.studies)
    if args.report:
        args.report.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
