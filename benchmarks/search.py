"""Search efficiency against the space's oracle (issue: find the good configuration in few trials).

A tabular benchmark, as HPO benchmarks do it: every configuration of a grid over the study's space
is trained once per seed, exactly as a study's trial is (`trial.run_trial`, the study's validation),
and its selection score, validation curve (the folds' mean per epoch), epochs trained, seconds and
balanced accuracy on unseen images are stored. Then each search strategy (an Optuna sampler, with
or without a pruner, with or without a method race first) runs as an Optuna study whose objective
looks its configuration up in that table: the pruner sees the stored curve epoch by epoch, a pruned
trial costs the epochs it ran. The pick after n trials is the completed trial with the best
selection score (ties: the lower validation loss); its unseen score against the oracle (the best
unseen score the grid holds for that seed) is the figure of merit.

    python benchmarks/search.py grid --seeds 1 2 3 4 5          # the table (resumable, slow)
    python benchmarks/search.py curves --seeds 1 2 3 4 5        # strategies over the table (fast)

The grid snaps each strategy's draws to its nearest grid value: learning rate (log scale), epochs,
LoRA rank; so every strategy searches the same finite space whose best the oracle knows.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "studies" / "demo.yaml"
RESULTS = HERE / "results"
SCENARIO = ["data.shots=16", "data.validation=kfold", "data.folds=4", "train.precision=fp32"]
GRID = {
    "method": ["zs_linear_probe", "clip_adapter", "clap", "affine_ln", "bias", "lora", "full"],
    "learning_rate": [1e-3, 3e-3, 1e-2],
    "max_epochs": [10, 20, 30],
    "lora.rank": [1, 4, 16],
}
PATIENCE = 8  # fixed (the demo space's larger choice)
BUDGETS = [4, 8, 12, 16, 24, 32, 48]
STRATEGIES = {  # name: (sampler spec, pruner spec, first trials: none | demo (its enqueue) | race)
    "random": ({"name": "random"}, {"name": "none"}, "none"),
    "tpe (package default: 10 random first)": ({"name": "tpe"}, {"name": "none"}, "none"),
    "tpe, 4 random first": ({"name": "tpe", "n_startup_trials": 4}, {"name": "none"}, "none"),
    "demo.yaml today: course LoRA, tpe 4 first, median pruner": (
        {"name": "tpe", "n_startup_trials": 4}, {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 4}, "demo"),
    "tpe independent, 4 first": ({"name": "tpe", "n_startup_trials": 4, "multivariate": False, "group": False},
                                 {"name": "none"}, "none"),
    "gp, 4 first": ({"name": "gp", "n_startup_trials": 4}, {"name": "none"}, "none"),
    "race, then tpe": ({"name": "tpe", "n_startup_trials": 0}, {"name": "none"}, "race"),
    "race, then tpe + median pruner": ({"name": "tpe", "n_startup_trials": 0},
                                       {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 4}, "race"),
    "race, then gp": ({"name": "gp", "n_startup_trials": 0}, {"name": "none"}, "race"),
    "tpe, 4 first + hyperband": ({"name": "tpe", "n_startup_trials": 4}, {"name": "hyperband", "min_resource": 2,
                                                                          "max_resource": 30, "reduction_factor": 3}, "none"),
}


def first_trials(kind: str) -> list[dict]:
    """What a new study enqueues before its sampler: demo.yaml's course LoRA (`search.enqueue`), or the
    package's race (`search.start: race`: the enqueue, then every other method at its prior settings)."""
    from hpo_peft.config_file import load_config
    from hpo_peft.search_space import first_trials as package_first_trials

    if kind == "none":
        return []
    config = load_config(DEMO, ["search.start=race"] if kind == "race" else [])
    return package_first_trials(config)


@dataclass
class Cell:
    """One configuration trained once for one seed."""

    seed: int
    method: str
    learning_rate: float
    max_epochs: int
    rank: int | None
    selection: float  # the trial's objective (validation balanced accuracy, kfold's fold mean)
    val_loss: float
    curve: list[float]  # the folds' mean validation balanced accuracy per epoch (what the pruner sees)
    epochs: int  # epochs trained: every fold's, and the refit's
    seconds: float
    unseen: float  # balanced accuracy of the kept adapter on the unseen images

    def key(self) -> tuple:
        return (self.method, self.learning_rate, self.max_epochs, self.rank)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def configurations() -> list[dict]:
    out = []
    for method in GRID["method"]:
        for lr in GRID["learning_rate"]:
            for epochs in GRID["max_epochs"]:
                for rank in (GRID["lora.rank"] if method == "lora" else [None]):
                    out.append({"method": method, "learning_rate": lr, "max_epochs": epochs, "rank": rank})
    return out


def table_path(kit_name: str, seed: int) -> Path:
    return RESULTS / "search-table" / f"{kit_name}-seed{seed}.json"


def load_cells(kit_name: str, seed: int) -> list[Cell]:
    path = table_path(kit_name, seed)
    return [Cell(**row) for row in json.loads(path.read_text())] if path.exists() else []


def run_grid(kit: Path, kit_name: str, seed: int, unseen_per_class: int, lock: Path | None, limit: int | None = None) -> None:
    """Every grid configuration for one seed; resumable (cells already in the table are kept)."""
    import fcntl

    from selection import UNSEEN_TABLE, add_unseen_table, kit_overrides

    from hpo_peft.commands import prepare_study_config
    from hpo_peft.data import load_test
    from hpo_peft.evaluate import evaluate_as_trained
    from hpo_peft.search_space import train_settings
    from hpo_peft.trial import open_workspace, run_trial

    add_unseen_table(kit, unseen_per_class)
    config = prepare_study_config(DEMO, [*kit_overrides(kit, seed), *SCENARIO])
    workspace = open_workspace(config)
    unseen = load_test(config.data.model_copy(update={"test_table": UNSEEN_TABLE}), workspace.base.preprocessing)
    cells = load_cells(kit_name, seed)
    done = {c.key() for c in cells}
    todo = [c for c in configurations() if (c["method"], c["learning_rate"], c["max_epochs"], c["rank"]) not in done]
    todo = todo[:limit] if limit else todo
    log(f"{kit_name} seed {seed}: {len(done)} cells stored, {len(todo)} to train")
    for number, cfg in enumerate(todo, 1):
        options = dict(config.methods.get(cfg["method"], {}))
        if cfg["rank"] is not None:
            options.update(rank=cfg["rank"], b_init="zeros")
        train = train_settings(config, cfg["method"], learning_rate=cfg["learning_rate"],
                               max_epochs=cfg["max_epochs"], patience=PATIENCE)
        curve, fold_epochs = [], []

        def on_epoch(metrics) -> None:
            (fold_epochs if metrics.fold is not None else curve).append(
                metrics.val_balanced_accuracy if metrics.fold is None else metrics.epoch)

        handle = open(lock, "a") if lock else None
        if handle:  # other heavy jobs on this machine take turns with each cell
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            outcome = run_trial(workspace, cfg["method"], options, train, on_epoch, progress=False)
            score = evaluate_as_trained(outcome.classifier, unseen, workspace.base.preprocessing,
                                        config.data.categories, outcome.train_config)
        finally:
            if handle:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
        trained = len(fold_epochs) + (outcome.selected_epoch or 0) if outcome.folds else len(curve)
        cells.append(Cell(seed, cfg["method"], cfg["learning_rate"], cfg["max_epochs"], cfg["rank"],
                          outcome.validation.balanced_accuracy, outcome.validation.loss, curve, trained,
                          outcome.seconds, score.balanced_accuracy))
        table_path(kit_name, seed).parent.mkdir(parents=True, exist_ok=True)
        table_path(kit_name, seed).write_text(json.dumps([asdict(c) for c in cells]))
        log(f"  {number}/{len(todo)} {cfg}: selection {outcome.validation.balanced_accuracy:.2f}, "
            f"unseen {score.balanced_accuracy:.2f}, {trained} epochs, {outcome.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# strategies over the table
# ---------------------------------------------------------------------------------------------
def nearest(value: float, grid: list, log_scale: bool) -> float:
    measure = (lambda v: math.log(v)) if log_scale else (lambda v: v)
    return min(grid, key=lambda g: abs(measure(g) - measure(value)))


def run_strategy(cells: list[Cell], name: str, n_trials: int, seed: int) -> list[dict]:
    """One strategy's study over the table: per trial, its state, and the pick so far."""
    import optuna

    from hpo_peft.config import StudyConfig
    from hpo_peft.samplers import make_pruner, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler_spec, pruner_spec, first = STRATEGIES[name]
    config = StudyConfig.model_validate({"data": {"root": ".", "seed": seed}, "search": {"sampler": {**sampler_spec, "seed": seed},
                                                                              "pruner": pruner_spec}})
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config), pruner=make_pruner(config))
    for params in first_trials(first):
        study.enqueue_trial({k: v for k, v in params.items() if k in ("method", "learning_rate", "max_epochs", "lora.rank")})
    by_key = {c.key(): c for c in cells}
    lrs = GRID["learning_rate"]
    rows = []

    def objective(trial) -> float:
        method = trial.suggest_categorical("method", GRID["method"])
        lr = nearest(trial.suggest_float("learning_rate", 3e-4, 1e-2, log=True), lrs, True)
        epochs = trial.suggest_int("max_epochs", 10, 30, step=10)
        rank = int(trial.suggest_categorical("lora.rank", GRID["lora.rank"])) if method == "lora" else None
        cell = by_key[(method, lr, epochs, rank)]
        folds = 4
        for epoch, value in enumerate(cell.curve, 1):
            trial.report(value, epoch)
            if trial.should_prune():
                rows.append({"state": "PRUNED", "epochs": epoch * folds, "seconds": cell.seconds * epoch / len(cell.curve)})
                raise optuna.TrialPruned()
        rows.append({"state": "COMPLETE", "epochs": cell.epochs, "seconds": cell.seconds, "cell": cell})
        return cell.selection

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=n_trials)
    best, spent, seconds, out = None, 0, 0.0, []
    for row in rows:
        spent, seconds = spent + row["epochs"], seconds + row["seconds"]
        cell = row.get("cell")
        if cell is not None and (best is None or (cell.selection, -cell.val_loss) > (best.selection, -best.val_loss)):
            best = cell
        out.append({"pick_unseen": best.unseen if best else None, "pick": best.key() if best else None,
                    "epochs": spent, "seconds": seconds})
    return out


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def curves(kit_name: str, seeds: list[int], n_max: int) -> dict:
    tables = {seed: load_cells(kit_name, seed) for seed in seeds}
    full = len(configurations())
    missing = [s for s, t in tables.items() if len(t) < full]
    if missing:
        raise SystemExit(f"seeds {missing}: the table is incomplete (run `grid` first)")
    oracle = {seed: max(c.unseen for c in t) for seed, t in tables.items()}
    # every configuration tried, the best selection score picked: what no search can beat with these labels
    exhaustive = {seed: max(t, key=lambda c: (c.selection, -c.val_loss)).unseen for seed, t in tables.items()}
    report = {"oracle": oracle, "oracle_median": median(list(oracle.values())), "exhaustive": exhaustive,
              "exhaustive_below_oracle": median([oracle[s] - exhaustive[s] for s in seeds]),
              "grid_epochs": median([sum(c.epochs for c in t) for t in tables.values()]), "strategies": {}}
    for name in STRATEGIES:
        runs = {seed: run_strategy(tables[seed], name, n_max, seed) for seed in seeds}
        points = {}
        for n in [b for b in BUDGETS if b <= n_max]:
            points[n] = {
                "pick_unseen": median([runs[s][n - 1]["pick_unseen"] for s in seeds]),
                "below_oracle": median([oracle[s] - runs[s][n - 1]["pick_unseen"] for s in seeds
                                        if runs[s][n - 1]["pick_unseen"] is not None]),
                "epochs": median([runs[s][n - 1]["epochs"] for s in seeds]),
                "seconds": median([runs[s][n - 1]["seconds"] for s in seeds]),
            }
        report["strategies"][name] = points
        log(f"{name}: " + ", ".join(f"n={n} {p['below_oracle']:.2f} below" for n, p in points.items()
                                    if p["below_oracle"] is not None))
    return report


def write_report(kit_name: str, seeds: list[int], report: dict, tag: str) -> Path:
    from harness import machine_info

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = machine_info("cpu")
    stem = RESULTS / f"search-{date.today().isoformat()}-{kit_name}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    figure, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in report["strategies"].items():
        ns = list(points)
        ax.plot(ns, [points[n]["below_oracle"] for n in ns], marker="o", label=name)
        bx.plot([points[n]["epochs"] for n in ns], [points[n]["below_oracle"] for n in ns], marker="o", label=name)
    for axis, xlabel in ((ax, "trials"), (bx, "epochs trained (median over seeds)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("oracle - pick, unseen balanced accuracy (points)")
        axis.axhline(3, color="grey", lw=0.8, ls="--")
        axis.axhline(6, color="grey", lw=0.8, ls=":")
        axis.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.suptitle(f"{kit_name}: distance of each strategy's pick from the grid's oracle (median over seeds {seeds})")
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=110)
    lines = [
        f"# Search efficiency against the oracle: {kit_name}",
        "",
        f"- date: {info['date']}; commit {info['commit']}; machine: {info['cpu']}, {info['cores']} cores, "
        f"{info['torch_threads']} torch threads, torch {info['versions'].get('torch')}, CPU fp32; seconds were "
        "measured with other jobs taking turns on the same cores (epochs are the compute figure to compare)",
        f"- scenario: studies/demo.yaml's space on the demo kit, {' '.join(SCENARIO)}; grid {GRID}, patience {PATIENCE}",
        f"- oracle (best unseen balanced accuracy in the grid), per seed: "
        + ", ".join(f"{s}: {v:.2f}" for s, v in report["oracle"].items()) + f"; median {report['oracle_median']:.2f}",
        "- first trials: `demo` enqueues demo.yaml's course LoRA (lr 1e-3, 20 epochs, rank 4); `race` is the package's "
        "`search.start: race` on demo.yaml: that entry, then every other method at its prior settings (black-box "
        "adapters lr 3e-3, 30 epochs; Affine-LN, bias, full lr 1e-3, 20 epochs), 7 trials",
        f"- the exhaustive pick (all {len(configurations())} configurations trained, the best selection score picked): "
        + ", ".join(f"{s}: {v:.2f}" for s, v in report["exhaustive"].items())
        + f"; median {report['exhaustive_below_oracle']:.2f} points below the oracle, for "
        f"{report['grid_epochs']:.0f} epochs: the distance that selection on these labels leaves, whatever the search",
        "- cells: median over seeds of (oracle - the pick's unseen score), points; in brackets the median epochs trained",
        "",
        "| strategy | " + " | ".join(f"n={n}" for n in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for name, points in report["strategies"].items():
        cells = [f"{points[n]['below_oracle']:.2f} ({points[n]['epochs']:.0f})" if n in points and
                 points[n]["below_oracle"] is not None else "-" for n in BUDGETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"![curves]({stem.with_suffix('.png').name})", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem.with_suffix(".md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["grid", "curves"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--kit", type=Path, default=ROOT / "local_data" / "demo")
    parser.add_argument("--kit-name", default="demo-kit")
    parser.add_argument("--unseen-per-class", type=int, default=250)
    parser.add_argument("--trials", type=int, default=48, help="the longest study each strategy runs")
    parser.add_argument("--lock", type=Path, default=None, help="a lock file shared with other heavy jobs")
    parser.add_argument("--tag", default="a")
    parser.add_argument("--limit", type=int, default=None, help="grid: at most this many new cells per seed")
    args = parser.parse_args()
    if args.step == "grid":
        from hpo_peft.demo_kit import build_demo_kit

        build_demo_kit(args.kit)
        for seed in args.seeds:
            run_grid(args.kit, args.kit_name, seed, args.unseen_per_class, args.lock, args.limit)
    else:
        report = curves(args.kit_name, args.seeds, args.trials)
        log(f"written {write_report(args.kit_name, args.seeds, report, args.tag)}")


if __name__ == "__main__":
    main()
