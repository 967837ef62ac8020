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
# demo.yaml's space on a grid: every method, 5 learning rates over its log range, every epoch count,
# and for LoRA 4 of its 7 ranks with both B initialisations: 6 x 5 x 3 + 4 x 2 x 5 x 3 = 210 configurations
GRID = {
    "method": ["zs_linear_probe", "clip_adapter", "clap", "affine_ln", "bias", "lora", "full"],
    "learning_rate": [3e-4, 7e-4, 1.7e-3, 4e-3, 1e-2],
    "max_epochs": [10, 20, 30],
    "lora.rank": [1, 4, 16, 64],
    "lora.b_init": ["zeros", "random"],
}
GRID_NAME = "grid210"
PATIENCE = 8  # fixed (the demo space's larger choice)
FOLDS = 4
LOCKED_CELLS = 10  # cells trained in one turn of the heavy-jobs lock
BUDGETS = [4, 8, 12, 16, 24, 32, 48]
MEDIAN = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 4}
HYPERBAND = {"name": "hyperband", "min_resource": 2, "max_resource": 30, "reduction_factor": 3}
SAMPLERS = {  # name: (sampler spec, first trials: none | demo (demo.yaml's enqueue) | race | portfolio)
    "random": ({"name": "random"}, "none"),
    "tpe (10 random first)": ({"name": "tpe"}, "none"),
    "tpe, 4 first": ({"name": "tpe", "n_startup_trials": 4}, "none"),
    "tpe independent, 4 first": ({"name": "tpe", "n_startup_trials": 4, "multivariate": False, "group": False}, "none"),
    "gp, 4 first": ({"name": "gp", "n_startup_trials": 4}, "none"),
    "race, then tpe": ({"name": "tpe", "n_startup_trials": 0}, "race"),
    "portfolio, then tpe": ({"name": "tpe", "n_startup_trials": 4}, "portfolio"),  # 4: counts the portfolio's
}
PRUNERS = {"": {"name": "none"}, " + median": MEDIAN, " + hyperband": HYPERBAND, " + fold-1 median": "folds"}
STRATEGIES = {f"{sampler}{suffix}": (spec, pruner, first)
              for sampler, (spec, first) in SAMPLERS.items() for suffix, pruner in PRUNERS.items()}
TODAY = "demo.yaml before: course LoRA, tpe 4 first, median pruner"
STRATEGIES[TODAY] = ({"name": "tpe", "n_startup_trials": 4}, MEDIAN, "demo")
PORTFOLIO_SIZE = 6  # at most: the greedy stops when no configuration brings the picks closer


def first_trials(kind: str, portfolio: list[dict] | None = None) -> list[dict]:
    """What a strategy's study runs before its sampler: demo.yaml's former course-LoRA enqueue (`demo`),
    the package's race (`search.start: race` on demo.yaml's space: every method at its prior settings),
    or a portfolio (configurations learned on other kits)."""
    from hpo_peft.core.config_file import load_config
    from hpo_peft.study.search_space import first_trials as package_first_trials

    if kind == "demo":
        return [{"method": "lora", "learning_rate": 1e-3, "max_epochs": 20, "lora.rank": 4, "lora.b_init": "zeros"}]
    if kind == "race":
        return package_first_trials(load_config(DEMO, ["search.start=race", "search.enqueue=[]"]))
    if kind == "portfolio":
        return list(portfolio or [])
    return []


@dataclass
class Cell:
    """One configuration trained once for one seed."""

    seed: int
    method: str
    learning_rate: float
    max_epochs: int
    rank: int | None
    b_init: str | None
    selection: float  # the trial's objective (validation balanced accuracy, kfold's fold mean)
    val_loss: float
    curve: list[float]  # the folds' mean validation balanced accuracy per epoch (what the pruner sees)
    fold_curves: list[list[float]]  # each fold's validation balanced accuracy per epoch
    epochs: int  # epochs trained: every fold's, and the refit's
    seconds: float  # measured holding the heavy-jobs lock (nothing else training on the cores)
    unseen: float  # balanced accuracy of the kept adapter on the unseen images

    def key(self) -> tuple:
        return (self.method, self.learning_rate, self.max_epochs, self.rank, self.b_init)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def configurations() -> list[dict]:
    out = []
    for method in GRID["method"]:
        for lr in GRID["learning_rate"]:
            for epochs in GRID["max_epochs"]:
                lora = [(r, b) for r in GRID["lora.rank"] for b in GRID["lora.b_init"]]
                for rank, b_init in (lora if method == "lora" else [(None, None)]):
                    out.append({"method": method, "learning_rate": lr, "max_epochs": epochs, "rank": rank, "b_init": b_init})
    return out


def config_key(cfg: dict) -> tuple:
    return (cfg["method"], cfg["learning_rate"], cfg["max_epochs"], cfg["rank"], cfg["b_init"])


def table_path(kit_name: str, seed: int) -> Path:
    return RESULTS / "search-table" / f"{kit_name}-{GRID_NAME}-seed{seed}.json"


def load_cells(kit_name: str, seed: int) -> list[Cell]:
    path = table_path(kit_name, seed)
    if not path.exists():
        return []
    grid = {config_key(c) for c in configurations()}  # a table may hold cells of a larger grid: kept to the grid's
    return [cell for cell in (Cell(**row) for row in json.loads(path.read_text())) if cell.key() in grid]


def kit_setup(kit_name: str, seed: int, unseen_per_class: int) -> tuple[list[str], dict]:
    """The kit's overrides of demo.yaml and how its unseen images are named (a DataConfig update)."""
    if kit_name == "demo-kit":
        from selection import UNSEEN_TABLE, add_unseen_table, kit_overrides

        kit = ROOT / "local_data" / "demo"
        add_unseen_table(kit, unseen_per_class)
        return kit_overrides(kit, seed), {"test_table": UNSEEN_TABLE}
    import kits

    kits.build_kit(kit_name)
    return kits.overrides(kit_name, seed), {"test_dir": "unseen"}


def open_kit(kit_name: str, seed: int, unseen_per_class: int):
    """The scenario's config on the kit, its workspace (model and few-shot data) and its unseen images."""
    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.data import load_test
    from hpo_peft.fewshot.trial import open_workspace

    overrides, unseen_update = kit_setup(kit_name, seed, unseen_per_class)
    config = prepare_study_config(DEMO, [*overrides, *SCENARIO])
    workspace = open_workspace(config)
    return config, workspace, load_test(config.data.model_copy(update=unseen_update), workspace.base.preprocessing)


def cell_settings(config, method: str, learning_rate: float, max_epochs: int, rank: int | None, b_init: str | None):
    """A grid cell's method options and training settings, as a study's trial would merge them."""
    from hpo_peft.fewshot.settings import merged_train

    options = dict(config.methods.get(method, {}))
    if rank is not None:
        options.update(rank=rank, b_init=b_init)
    return options, merged_train(config, method, learning_rate=learning_rate, max_epochs=max_epochs, patience=PATIENCE)


def run_grid(kit_name: str, seed: int, unseen_per_class: int, lock: Path | None, limit: int | None = None) -> None:
    """Every grid configuration for one seed; resumable (cells already in the table are kept)."""
    import fcntl

    from hpo_peft.fewshot.evaluate import evaluate_as_trained
    from hpo_peft.fewshot.trial import run_trial

    config, workspace, unseen = open_kit(kit_name, seed, unseen_per_class)
    cells = load_cells(kit_name, seed)
    done = {c.key() for c in cells}
    todo = [c for c in configurations() if config_key(c) not in done]
    todo = todo[:limit] if limit else todo
    log(f"{kit_name} seed {seed}: {len(done)} cells stored, {len(todo)} to train, {len(unseen.labels)} unseen images")
    handle = None
    for number, cfg in enumerate(todo, 1):
        options, train = cell_settings(config, **cfg)
        curve, folds = [], [[] for _ in range(FOLDS)]

        def on_epoch(metrics) -> None:
            (curve if metrics.fold is None else folds[metrics.fold]).append(metrics.val_balanced_accuracy)

        if lock and handle is None:  # other heavy jobs on this machine take turns with each 10 cells
            handle = open(lock, "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
        outcome = run_trial(workspace, cfg["method"], options, train, on_epoch, progress=False)
        score = evaluate_as_trained(outcome.classifier, unseen, workspace.base.preprocessing,
                                    config.data.categories, outcome.settings)
        if handle and (number % LOCKED_CELLS == 0 or number == len(todo)):
            handle.close()  # releases the lock
            handle = None
        trained = sum(len(f) for f in folds) + (outcome.selected_epoch or 0) if outcome.folds else len(curve)
        cells.append(Cell(seed, cfg["method"], cfg["learning_rate"], cfg["max_epochs"], cfg["rank"], cfg["b_init"],
                          outcome.validation.balanced_accuracy, outcome.validation.loss, curve, folds, trained,
                          outcome.seconds, score.balanced_accuracy))
        table_path(kit_name, seed).parent.mkdir(parents=True, exist_ok=True)
        table_path(kit_name, seed).write_text(json.dumps([asdict(c) for c in cells]))
        log(f"  {number}/{len(todo)} {cfg}: selection {outcome.validation.balanced_accuracy:.2f}, "
            f"unseen {score.balanced_accuracy:.2f}, {trained} epochs, {outcome.seconds:.1f} s")


KIT_NAMES = ["demo-kit", "three-class-untrained", "five-class-pretrained", "four-class-untrained"]
UNSEEN_PER_CLASS = {"demo-kit": 500}  # the generated kits' unseen folders are drawn with the kit (kits.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["grid", "curves"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--kits", nargs="+", default=KIT_NAMES, choices=KIT_NAMES)
    parser.add_argument("--trials", type=int, default=48, help="the longest study each strategy runs")
    parser.add_argument("--lock", type=Path, default=None, help="a lock file shared with other heavy jobs")
    parser.add_argument("--tag", default="a")
    parser.add_argument("--limit", type=int, default=None, help="grid: at most this many new cells per seed")
    args = parser.parse_args()
    if args.step == "grid":
        for seed in args.seeds:  # a seed on every kit, then the next: stopped early, every kit has as many seeds
            for kit in args.kits:
                run_grid(kit, seed, UNSEEN_PER_CLASS.get(kit, 0), args.lock, args.limit)
    else:
        from search_replay import report_all

        log(f"written {report_all(args.kits, args.seeds, args.trials, args.tag)}")


if __name__ == "__main__":
    main()
