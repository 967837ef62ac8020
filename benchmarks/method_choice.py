"""Which methods a study draws, prunes and picks when its space holds every method: 48-trial studies on
the demo kit, one per seed, with demo.yaml's search settings and every registered method in its space.

    python benchmarks/method_choice.py run [--work DIR] [--seeds 1 2 3] [--trials 48]
    python benchmarks/method_choice.py report [--work DIR] [--out FILE.md]

`run` writes demo.yaml with `search.params.method.choices` widened to every registered method (LoRA
also searches `use_dora`, KgCoOp its `kg_lambda`) into the work folder, then for each seed runs the
package's own commands as a user types them: `hpo-peft study run` (data.seed = the seed, the study named
by it) and `hpo-peft evaluate` (the pick's score on the unseen test table). `report` reads the Optuna
studies: per method, how often it was drawn, pruned, completed, and picked (the package's selection
rule), and its best validation score.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml
from harness import ROOT, log, machine_info

DEMO = ROOT / "studies" / "demo.yaml"


def widened_config(work: Path) -> Path:
    from hpo_peft.methods import METHODS

    raw = yaml.safe_load(DEMO.read_text())
    raw["search"]["params"]["method"] = {"choices": list(METHODS)}
    raw["search"]["methods"]["lora"]["use_dora"] = {"choices": [False, True]}
    raw["search"]["methods"]["kgcoop"] = {"kg_lambda": {"low": 1.0, "high": 16.0, "log": True}}
    path = work / "demo_all_methods.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "hpo_peft.app.cli", *args, "--storage", str(work / "optuna.journal"),
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]


def run(work: Path, seeds: list[int], trials: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    config = widened_config(work)
    (work / "machine.json").write_text(json.dumps(machine_info("cpu"), indent=1))
    seconds = {}
    for seed in seeds:
        name, started = f"demo-all-methods-s{seed}", time.perf_counter()
        common = [str(config), "--study-name", name, "--set", f"data.seed={seed}"]
        with open(work / f"{name}.log", "w") as stream:
            log(f"{name}: {trials} trials")
            subprocess.run(cli(work, "study", "run", *common, "--n-trials", str(trials)), cwd=ROOT, stdout=stream,
                           stderr=subprocess.STDOUT, check=True)
        evaluated = subprocess.run(cli(work, "evaluate", *common, "--json"), cwd=ROOT, capture_output=True, text=True, check=True)
        (work / f"{name}.evaluate.json").write_text(evaluated.stdout[evaluated.stdout.index("{"):])
        seconds[name] = time.perf_counter() - started
    (work / "seconds.json").write_text(json.dumps(seconds, indent=1))


def counts(work: Path) -> tuple[dict, list[dict]]:
    import optuna

    from hpo_peft.methods import METHODS
    from hpo_peft.tracking.selection import select_best

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(work / "optuna.journal")))
    table = {m: {"drawn": 0, "pruned": 0, "complete": 0, "failed": 0, "picked": 0, "best_val": None} for m in METHODS}
    picks = []
    for summary in sorted(work.glob("demo-all-methods-s*.evaluate.json")):
        name = summary.name.removesuffix(".evaluate.json")
        trials = optuna.load_study(study_name=name, storage=storage).trials
        for trial in trials:
            row = table[trial.params["method"]]
            row["drawn"] += 1
            state = {"PRUNED": "pruned", "COMPLETE": "complete", "FAIL": "failed"}.get(trial.state.name)
            if state:
                row[state] += 1
            if trial.state.name == "COMPLETE" and (row["best_val"] is None or trial.value > row["best_val"]):
                row["best_val"] = trial.value
        best = select_best(trials)
        table[best.params["method"]]["picked"] += 1
        evaluated = json.loads(summary.read_text())
        picks.append({"study": name, "trials": len(trials), "method": best.params["method"], "params": best.params,
                      "val": best.value, "test": evaluated.get("balanced_accuracy")})
    return table, picks


def report(work: Path, out: Path) -> None:
    machine = json.loads((work / "machine.json").read_text())
    seconds = json.loads((work / "seconds.json").read_text())
    table, picks = counts(work)
    total = sum(row["drawn"] for row in table.values())
    lines = [
        f"# Method choice in {picks[0]['trials']}-trial demo studies with every method in the space", "",
        f"- date: {machine['date']}; commit {machine['commit']}; {machine['cpu']}, {machine['cores']} cores, CPU fp32; "
        f"optuna {machine['versions']['optuna']}; minutes per study (study run + evaluate): "
        + ", ".join(f"{s / 60:.0f}" for s in seconds.values()),
        "- what ran: `benchmarks/method_choice.py run`: studies/demo.yaml's search (portfolio start, TPE with 4 "
        "random trials first, the median pruner) with `search.params.method.choices` widened to every registered "
        "method, LoRA's `use_dora` and KgCoOp's `kg_lambda` searched too; `hpo-peft study run` then "
        f"`hpo-peft evaluate`, one study per seed ({len(picks)} seeds: data.seed sets the shots and the sampler)",
        "- drawn: trials of that method over all studies; picked: studies whose selected trial is that method; best "
        "validation: the best completed trial's validation balanced accuracy, % (16 + 16 shots per class)", "",
        "| method | drawn | share | pruned | complete | failed | picked | best validation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, row in sorted(table.items(), key=lambda item: -item[1]["drawn"]):
        best = "" if row["best_val"] is None else f"{row['best_val']:.1f}"
        lines.append(f"| {method} | {row['drawn']} | {100 * row['drawn'] / total:.0f} % | {row['pruned']} | "
                     f"{row['complete']} | {row['failed']} | {row['picked']} | {best} |")
    lines += ["", "| study | pick | its parameters | validation | unseen test |", "|---|---|---|---:|---:|"]
    for pick in picks:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in pick["params"].items() if k != "method")
        test = "" if pick["test"] is None else f"{pick['test']:.1f}"
        lines.append(f"| {pick['study']} | {pick['method']} | {params} | {pick['val']:.1f} | {test} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "methods": table, "picks": picks}, indent=1) + "\n")
    log(f"wrote {out} and its .json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["run", "report"])
    parser.add_argument("--work", type=Path, default=ROOT / "local_data" / "bench-method-choice")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / f"method-choice-demo-{date.today().isoformat()}.md")
    args = parser.parse_args()
    run(args.work, args.seeds, args.trials) if args.what == "run" else report(args.work, args.out)


if __name__ == "__main__":
    main()
