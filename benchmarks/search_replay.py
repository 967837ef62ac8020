"""Search strategies replayed over the search benchmark's tables (`search.py grid`): anytime curves
against each kit's oracle, a portfolio learned leave-one-kit-out, the goals, and the report.

A strategy is an Optuna sampler, a pruner and what it runs first. Its study draws from demo.yaml's
space (method, learning rate 3e-4..1e-2 log, epochs 10..30 step 10, LoRA rank and B init) and each
draw is snapped to the nearest grid value, so the configuration is looked up in the table:
- epoch pruners (median, Hyperband) see the stored fold-mean curve epoch by epoch; a trial pruned at
  epoch e cost e epochs on each of the 4 folds (the package trains the folds in lockstep);
- "fold-1 median" is folds as a fidelity: the trial reports its first fold's best score, then the
  first two folds' mean, ..., and a median pruner may stop it after any fold; a trial stopped after
  k folds cost those folds' epochs (folds run one after another here, as the package does not);
- "median within method" is Optuna's MedianPruner (demo.yaml's settings) judging a trial only against
  the trials of its own method (`WithinMethodPruner`): its n_startup_trials and median count per method,
  so a method whose curves rise slowly early is not pruned for being unlike LoRA's or full's;
- the pick after n trials is the completed trial with the best selection score (ties: the lower
  validation loss); the figure of merit is the oracle's unseen score minus the pick's.
The portfolio for kit X is learned on the other kits' tables only (greedy: each next configuration is
the one that most lowers the mean distance of the pick among the portfolio from the oracle).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from datetime import date

import optuna

from search import (BUDGETS, FOLDS, GRID, GRID_NAME, MEDIAN, PORTFOLIO_SIZE, RESULTS, SCENARIO, STRATEGIES, TODAY,
                    Cell, configurations, first_trials, load_cells, log)

WITHIN_METHOD = "median within method"  # the pruner spec of the strategies below: MEDIAN, per method
STRATEGIES["portfolio, then tpe + median within method"] = ({"name": "tpe", "n_startup_trials": 4}, WITHIN_METHOD,
                                                            "portfolio")
STRATEGIES["tpe, 4 first + median within method"] = ({"name": "tpe", "n_startup_trials": 4}, WITHIN_METHOD, "none")


def add_sweep() -> list[str]:
    """The sweep around the shipped default (portfolio start, TPE 4 first, MedianPruner 2 first / warmup 4):
    MedianPruner's n_warmup_steps 4, 8, 12 x n_startup_trials 2, 4; at the default pruner, TPE 8 first and TPE
    independent (make_sampler's TPE is multivariate and grouped by default). Registered only on asking, so the
    full report (`report_all`) runs what it always did. Returns the names, the default first."""
    names = ["portfolio, then tpe + median"]
    for warmup in (4, 8, 12):
        for startup in (2, 4):
            if (startup, warmup) != (2, 4):
                name = f"portfolio, then tpe + median {startup} first, warmup {warmup}"
                STRATEGIES[name] = ({"name": "tpe", "n_startup_trials": 4},
                                    {"name": "median", "n_startup_trials": startup, "n_warmup_steps": warmup}, "portfolio")
                names.append(name)
    for name, spec in (("portfolio, then tpe 8 first + median", {"name": "tpe", "n_startup_trials": 8}),
                       ("portfolio, then tpe independent + median",
                        {"name": "tpe", "n_startup_trials": 4, "multivariate": False, "group": False})):
        STRATEGIES[name] = (spec, MEDIAN, "portfolio")
        names.append(name)
    return names


RANKS = [1, 2, 4, 8, 16, 32, 64]  # demo.yaml's choices (the grid holds 1, 4, 16, 64)
SHOWN = ["random", TODAY, "tpe, 4 first", "tpe, 4 first + hyperband", "gp, 4 first", "race, then tpe + hyperband",
         "portfolio, then tpe", "portfolio, then tpe + hyperband", "tpe, 4 first + fold-1 median"]


class _SameParamStudy:
    """A view of a study whose get_trials returns only the trials with params[param] == value; every
    other attribute (direction, ...) is the study's."""

    def __init__(self, study, param: str, value):
        self._study, self._param, self._value = study, param, value

    def get_trials(self, deepcopy: bool = True, states=None):
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.params.get(self._param) == self._value]

    def __getattr__(self, name: str):
        return getattr(self._study, name)


class WithinMethodPruner(optuna.pruners.BasePruner):
    """Wraps a pruner (Optuna's MedianPruner here) so that it judges a trial only against the trials of
    the same method: it sees a view of the study whose get_trials holds just those (MedianPruner /
    PercentilePruner call only study.get_trials(deepcopy=False, states=(COMPLETE,)) and study.direction),
    so n_startup_trials, n_min_trials and the median at each step count per method. A trial with no
    `param` yet is judged against the whole study."""

    def __init__(self, pruner, param: str = "method"):
        self._pruner, self._param = pruner, param

    def prune(self, study, trial) -> bool:
        if self._param not in trial.params:
            return self._pruner.prune(study, trial)
        return self._pruner.prune(_SameParamStudy(study, self._param, trial.params[self._param]), trial)


def nearest(value: float, grid: list, log_scale: bool) -> float:
    measure = (lambda v: math.log(v)) if log_scale else (lambda v: v)
    return min(grid, key=lambda g: abs(measure(g) - measure(value)))


def entry(key: tuple) -> dict:
    """A grid configuration as a study's enqueued parameters."""
    method, lr, epochs, rank, b_init = key
    out = {"method": method, "learning_rate": lr, "max_epochs": epochs}
    return out | ({"lora.rank": rank, "lora.b_init": b_init} if method == "lora" else {})


def pick(cells: list[Cell]) -> Cell:
    return max(cells, key=lambda c: (c.selection, -c.val_loss))


def learn_portfolio(tables: list[list[Cell]], size: int = PORTFOLIO_SIZE) -> list[tuple]:
    """Greedy portfolio over (kit, seed) tables: configurations whose pick (by selection score, as a
    study would) lands closest to each table's oracle, on average."""
    if not tables:
        return []
    indexed = [({c.key(): c for c in table}, max(c.unseen for c in table)) for table in tables]
    keys = [k for k in indexed[0][0] if all(k in by_key for by_key, _ in indexed)]
    def regret(portfolio: list[tuple]) -> float:
        return statistics.mean(oracle - pick([by_key[k] for k in portfolio]).unseen for by_key, oracle in indexed)

    chosen: list[tuple] = []
    for _ in range(size):
        best = min((k for k in keys if k not in chosen), key=lambda k: regret([*chosen, k]))
        if chosen and regret([*chosen, best]) >= regret(chosen):
            break  # nothing brings the picks closer: the sampler takes over
        chosen.append(best)
    return chosen


def run_strategy(cells: list[Cell], name: str, n_trials: int, seed: int, portfolio: list[tuple] | None = None) -> list[dict]:
    """One strategy's study over a table: per trial, the pick so far, the compute spent, the trial's
    method and state."""
    from hpo_peft.core.config import StudyConfig
    from hpo_peft.study.samplers import make_pruner, make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # GP falls back to random for lora.rank: said in the report
    sampler_spec, pruner_spec, first = STRATEGIES[name]
    by_folds, within = pruner_spec == "folds", pruner_spec == WITHIN_METHOD
    pruner_spec = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0} if by_folds else pruner_spec
    pruner_spec = MEDIAN if within else pruner_spec
    config = StudyConfig.model_validate({"data": {"root": ".", "seed": seed},
                                         "search": {"sampler": {**sampler_spec, "seed": seed}, "pruner": pruner_spec}})
    pruner = make_pruner(config)
    if within:
        pruner = WithinMethodPruner(pruner)
    # named: Hyperband assigns a trial's bracket from a hash of the study's name and the trial's number, so an
    # unnamed study (a random name) would replay differently in every process
    study = optuna.create_study(study_name=f"replay {name}, seed {seed}", direction="maximize",
                                sampler=make_sampler(config), pruner=pruner)
    for params in first_trials(first, [entry(k) for k in portfolio or []]):
        study.enqueue_trial({k: v for k, v in params.items()
                             if k in ("method", "learning_rate", "max_epochs", "lora.rank", "lora.b_init")})
    by_key = {c.key(): c for c in cells}
    rows = []

    def objective(trial) -> float:
        method = trial.suggest_categorical("method", GRID["method"])
        lr = nearest(trial.suggest_float("learning_rate", 3e-4, 1e-2, log=True), GRID["learning_rate"], True)
        epochs = trial.suggest_int("max_epochs", 10, 30, step=10)
        rank = b_init = None
        if method == "lora":
            rank = nearest(int(trial.suggest_categorical("lora.rank", RANKS)), GRID["lora.rank"], True)
            b_init = trial.suggest_categorical("lora.b_init", GRID["lora.b_init"])
        cell = by_key[(method, lr, epochs, rank, b_init)]
        steps = fold_steps(cell) if by_folds else [(e, v, e * FOLDS) for e, v in enumerate(cell.curve, 1)]
        for step, value, spent in steps:
            trial.report(value, step)
            if step < len(steps) and trial.should_prune():
                share = spent / max(1, sum(len(f) for f in cell.fold_curves))
                rows.append({"state": "PRUNED", "method": method, "epochs": spent,
                             "seconds": cell.seconds * min(1.0, share)})
                raise optuna.TrialPruned()
        rows.append({"state": "COMPLETE", "method": method, "epochs": cell.epochs, "seconds": cell.seconds, "cell": cell})
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
        out.append({"pick_unseen": best.unseen if best else None, "epochs": spent, "seconds": seconds,
                    "method": row["method"], "state": row["state"], "cell": cell})
    return out


def fold_steps(cell: Cell) -> list[tuple[int, float, int]]:
    """Folds as a fidelity: after k folds, the best epoch of the first k folds' mean curve, and the
    epochs those folds trained."""
    out = []
    for k in range(1, FOLDS + 1):
        curves = cell.fold_curves[:k]
        length = min(len(c) for c in curves)
        mean = [statistics.mean(c[e] for c in curves) for e in range(length)]
        out.append((k, max(mean), sum(len(c) for c in curves)))
    return out


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def trial_states(runs: dict[int, list[dict]], n: int) -> dict[str, dict[str, int]]:
    """Per method, the trials among each run's first n that completed and that were pruned, summed over runs."""
    out = {m: {"COMPLETE": 0, "PRUNED": 0} for m in GRID["method"]}
    for rows in runs.values():
        for row in rows[:n]:
            out[row["method"]][row["state"]] += 1
    return out


def kit_curves(kit: str, tables: dict[int, list[Cell]], n_max: int, portfolio: list[tuple],
               names: list[str] | None = None) -> dict:
    oracle = {seed: max(c.unseen for c in t) for seed, t in tables.items()}
    exhaustive = {seed: pick(t).unseen for seed, t in tables.items()}
    seeds = list(tables)
    report = {"oracle": oracle, "oracle_median": median(list(oracle.values())), "exhaustive": exhaustive,
              "exhaustive_below_oracle": median([oracle[s] - exhaustive[s] for s in seeds]),
              "grid_epochs": median([sum(c.epochs for c in t) for t in tables.values()]),
              "grid_seconds": median([sum(c.seconds for c in t) for t in tables.values()]),
              "portfolio": [entry(k) for k in portfolio], "strategies": {}, "trial_states": {},
              "per_seed": {}}
    for name in names or STRATEGIES:
        started = time.perf_counter()
        runs = {seed: run_strategy(tables[seed], name, n_max, seed, portfolio) for seed in seeds}
        report["strategies"][name] = {n: {
            "below_oracle": median([oracle[s] - runs[s][n - 1]["pick_unseen"] for s in seeds
                                    if runs[s][n - 1]["pick_unseen"] is not None]),
            "epochs": median([runs[s][n - 1]["epochs"] for s in seeds]),
            "seconds": median([runs[s][n - 1]["seconds"] for s in seeds]),
        } for n in BUDGETS if n <= n_max}
        report["trial_states"][name] = trial_states(runs, n_max)
        report["per_seed"][name] = {n: {s: oracle[s] - runs[s][n - 1]["pick_unseen"] for s in seeds
                                        if runs[s][n - 1]["pick_unseen"] is not None} for n in BUDGETS if n <= n_max}
        log(f"{kit} / {name} ({time.perf_counter() - started:.0f} s): " + ", ".join(
            f"n={n} {p['below_oracle']:.1f}" for n, p in report["strategies"][name].items() if p["below_oracle"] is not None))
    return report


def goals(reports: dict[str, dict]) -> dict[str, dict]:
    """Per strategy and kit: within 3 of the oracle at 24 trials, within 6 at 12, no more epochs than
    demo.yaml's former settings at 24 trials, ahead of random search at 12 trials."""
    out = {}
    for name in STRATEGIES:
        per_kit = {}
        for kit, report in reports.items():
            s, today, rnd = report["strategies"][name], report["strategies"][TODAY], report["strategies"]["random"]
            per_kit[kit] = {"within 3 at 24": s[24]["below_oracle"] <= 3, "within 6 at 12": s[12]["below_oracle"] <= 6,
                            "compute <= before at 24": s[24]["epochs"] <= today[24]["epochs"],
                            "ahead of random at 12": s[12]["below_oracle"] < rnd[12]["below_oracle"]}
        out[name] = {"kits": per_kit, "passed": sum(sum(g.values()) for g in per_kit.values()),
                     "mean_12_24": statistics.mean(r["strategies"][name][n]["below_oracle"]
                                                   for r in reports.values() for n in (12, 24))}
    return out


def best_strategy(table: dict[str, dict]) -> str:
    """The default the curves choose: most goals passed over all kits, then the lowest mean distance at 12 and 24;
    among the strategies a study can run (the package trains a trial's folds in lockstep, not one after another)."""
    runnable = [name for name in table if isinstance(STRATEGIES[name][1], dict)]  # not folds, not within method
    return min(runnable, key=lambda name: (-table[name]["passed"], table[name]["mean_12_24"]))


def report_all(kits: list[str], seeds: list[int], n_max: int, tag: str):
    import json

    tables = {kit: {seed: load_cells(kit, seed) for seed in seeds} for kit in kits}
    full = len(configurations())
    missing = [(k, s) for k, t in tables.items() for s, cells in t.items() if len(cells) < full]
    if missing:
        raise SystemExit(f"{missing}: the table is incomplete (run `grid` first)")
    portfolios = {kit: learn_portfolio([t for other in kits if other != kit for t in tables[other].values()])
                  for kit in kits}
    shipped = learn_portfolio([t for kit in kits for t in tables[kit].values()])
    reports = {kit: kit_curves(kit, tables[kit], n_max, portfolios[kit]) for kit in kits}
    table = goals(reports)
    chosen = best_strategy(table)
    stem = RESULTS / f"search-{date.today().isoformat()}-{len(kits)}-kits-{GRID_NAME}-{tag}"
    sampler, pruner, first = STRATEGIES[chosen]
    settings = {"sampler": sampler, "pruner": pruner, "start": {"race": "race", "portfolio": "portfolio"}.get(first, "sampler")}
    stem.with_suffix(".json").write_text(json.dumps({
        "kits": reports, "goals": table, "chosen": chosen, "chosen_settings": settings,
        # what hpo_peft/study/portfolio.py ships: the space's bare keys
        "portfolio_all_kits": [{k.removeprefix("lora."): v for k, v in entry(key).items()} for key in shipped]},
        indent=2, default=str))
    plot(reports, chosen, stem.with_suffix(".png"))
    write_markdown(reports, table, chosen, shipped, seeds, stem)
    return stem.with_suffix(".md")


def plot(reports: dict[str, dict], chosen: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(reports), figsize=(6 * len(reports), 9), squeeze=False)
    for col, (kit, report) in enumerate(reports.items()):
        for name in dict.fromkeys([*SHOWN, chosen]):
            points = report["strategies"][name]
            ns = list(points)
            style = {"lw": 3, "color": "black"} if name == chosen else {}
            label = f"{name} (chosen)" if name == chosen else name
            axes[0][col].plot(ns, [points[n]["below_oracle"] for n in ns], marker="o", label=label, **style)
            axes[1][col].plot([points[n]["epochs"] for n in ns], [points[n]["below_oracle"] for n in ns], marker="o", **style)
        axes[0][col].set_title(f"{kit}: oracle {report['oracle_median']:.1f}, exhaustive pick "
                               f"{report['exhaustive_below_oracle']:.1f} below")
        for row, xlabel in ((0, "trials"), (1, "epochs trained (median over seeds)")):
            axis = axes[row][col]
            axis.set_xlabel(xlabel)
            axis.set_ylabel("oracle - pick, unseen balanced accuracy (points)")
            axis.axhline(3, color="grey", lw=0.8, ls="--")
            axis.axhline(6, color="grey", lw=0.8, ls=":")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Distance of each strategy's pick from the grid's oracle (median over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


KIT_WORDS = {
    "demo-kit": "4 classes, pre-trained tiny CLIP, 2,000 unseen images",
    "three-class-untrained": "3 look-alike grades blended and noisy, the same tiny CLIP with random weights: "
                             "zero-shot is chance; 2,100 unseen",
    "five-class-pretrained": "the demo's 4 classes and stroma, the demo's pre-trained model; 2,000 unseen",
    "four-class-untrained": "the demo's 4 classes lightly blended and noisier, a tiny CLIP with random weights of "
                            "its own; 2,000 unseen",
}


def write_markdown(reports: dict, table: dict, chosen: str, shipped: list[tuple], seeds: list[int], stem) -> None:
    from harness import machine_info

    info = machine_info("cpu")
    lines = [
        f"# Search efficiency against the oracle, on {len(reports)} kits",
        "",
        f"- date: {info['date']}; commit {info['commit']}; machine: {info['cpu']}, {info['cores']} cores, "
        f"{info['torch_threads']} torch threads, torch {info['versions'].get('torch')}, CPU fp32; each cell's seconds "
        "were measured holding the heavy-jobs lock (nothing else training on the cores)",
        f"- scenario: studies/demo.yaml's space, {' '.join(SCENARIO)}, patience 8; grid {GRID} "
        f"({len(configurations())} configurations), each trained once per seed {seeds}",
        "- kits (benchmarks/kits.py): " + ", ".join(f"`{kit}` ({KIT_WORDS[kit]})" for kit in reports),
        "- cells: median over seeds of (oracle - the pick's unseen balanced accuracy), points; in brackets median "
        "epochs trained (every fold's, and the refit's) and seconds",
        f"- `portfolio` strategies: the portfolio learned on the {len(reports) - 1} other kits (leave-one-kit-out), "
        f"up to {PORTFOLIO_SIZE} configurations, then the sampler (TPE's 4 random first trials count the portfolio's)",
        "",
    ]
    for kit, report in reports.items():
        lines += [f"## {kit}", "",
                  f"- oracle per seed: " + ", ".join(f"{s}: {v:.2f}" for s, v in report["oracle"].items())
                  + f"; median {report['oracle_median']:.2f}",
                  f"- the exhaustive pick (all {len(configurations())} trained, best selection score): "
                  f"{report['exhaustive_below_oracle']:.2f} below the oracle, for {report['grid_epochs']:.0f} epochs, "
                  f"{report['grid_seconds']:.0f} s: what selection on these labels leaves, whatever the search",
                  f"- portfolio learned without this kit: " + "; ".join(
                      ", ".join(f"{k} {v}" for k, v in e.items()) for e in report["portfolio"]),
                  "", "| strategy | " + " | ".join(f"n={n}" for n in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
        for name, points in report["strategies"].items():
            cells = [f"{p['below_oracle']:.1f} ({p['epochs']:.0f} ep, {p['seconds']:.0f} s)" if (p := points.get(n))
                     and p["below_oracle"] is not None else "-" for n in BUDGETS]
            lines.append(f"| {'**' + name + '**' if name == chosen else name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Goals", "",
              "Per kit: within 3 points of the oracle at 24 trials / within 6 at 12 / no more epochs than demo.yaml's "
              "former settings at 24 trials / ahead of random search at 12 trials: y or n each, 4 goals per kit.", "",
              "| strategy | " + " | ".join(reports) + " | goals passed | mean distance at 12 and 24 |",
              "|---|" + "---|" * (len(reports) + 2)]
    for name, row in sorted(table.items(), key=lambda kv: (-kv[1]["passed"], kv[1]["mean_12_24"])):
        marks = [" ".join("y" if ok else "n" for ok in row["kits"][kit].values()) for kit in reports]
        lines.append(f"| {name} | " + " | ".join(marks) + f" | {row['passed']} | {row['mean_12_24']:.2f} |")
    lines += ["", f"Chosen by the curves (most goals passed, then the lowest mean distance at 12 and 24 trials, among "
              f"what a study can run: not the fold-1 strategies, as the package trains a trial's folds in lockstep): "
              f"**{chosen}**.", "",
              f"Portfolio learned on all {len(reports)} kits (what `search.start: portfolio` enqueues): "
              + "; ".join(", ".join(f"{k} {v}" for k, v in entry(key).items()) for key in shipped), "",
              f"![curves]({stem.with_suffix('.png').name})", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


def compare(kits: list[str], seeds: list[int], names: list[str], baseline: str, n_max: int, stem,
            shown: tuple[int, ...] = (12, 24, 48)):
    """A few strategies replayed against a baseline (the shipped default): per kit and n, the median distance
    to the oracle and the compute side by side, the baseline's goals (within 6 at 12 trials, within 3 at 24,
    no more epochs than the baseline at 24), and per method the trials that completed and were pruned."""
    import json
    from pathlib import Path

    stem, shown = Path(stem), [n for n in shown if n <= n_max]
    names = list(dict.fromkeys([baseline, *names]))
    tables = {kit: {seed: load_cells(kit, seed) for seed in seeds} for kit in kits}
    portfolios = {kit: learn_portfolio([t for other in kits if other != kit for t in tables[other].values()])
                  for kit in kits}
    reports = {kit: kit_curves(kit, tables[kit], n_max, portfolios[kit], names) for kit in kits}
    goals_met = {name: {kit: {
        "within 6 at 12": r["strategies"][name][12]["below_oracle"] <= 6,
        "within 3 at 24": r["strategies"][name][24]["below_oracle"] <= 3,
        "epochs <= default at 24": r["strategies"][name][24]["epochs"] <= r["strategies"][baseline][24]["epochs"]}
        for kit, r in reports.items()} for name in names}
    stem.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "trials": n_max, "baseline": baseline,
                                                     "kits": reports, "goals": goals_met}, indent=2, default=str))
    lines = [f"# Median within method against the shipped default (replay of the {GRID_NAME} tables)", "",
             f"- kits {kits}, seeds {seeds}, studies of {n_max} trials; cells: median over seeds of (oracle - pick's "
             "unseen balanced accuracy), points; in brackets median epochs (every fold's, and the refit's) and seconds",
             f"- default (baseline): **{baseline}**; `median` = MedianPruner{tuple(MEDIAN.items())[1:]}; "
             "`median within method` = the same pruner judging a trial only against trials of its own method", ""]
    for kit, r in reports.items():
        lines += [f"## {kit}", "", f"- oracle median {r['oracle_median']:.2f}; exhaustive pick "
                  f"{r['exhaustive_below_oracle']:.2f} below; portfolio (leave-one-kit-out): {len(r['portfolio'])} "
                  "configurations", "",
                  "| strategy | " + " | ".join(f"n={n}" for n in shown) + " |", "|---|" + "---|" * len(shown)]
        for name in names:
            p = r["strategies"][name]
            lines.append(f"| {name} | " + " | ".join(
                f"{p[n]['below_oracle']:.1f} ({p[n]['epochs']:.0f} ep, {p[n]['seconds']:.0f} s)" for n in shown) + " |")
        lines += ["", "Per seed (oracle - pick), and the mean over seeds", "",
                  "| strategy | " + " | ".join(f"n={n}" for n in shown) + " |", "|---|" + "---|" * len(shown)]
        for name in names:
            d = r["per_seed"][name]
            lines.append(f"| {name} | " + " | ".join(
                " ".join(f"{v:.1f}" for v in d[n].values()) + f" (mean {statistics.mean(d[n].values()):.1f})"
                for n in shown) + " |")
        lines += ["", f"Trials per method over the {n_max} of each seed's study, summed over {len(seeds)} seeds: "
                  "completed / pruned", "", "| strategy | " + " | ".join(GRID["method"]) + " |",
                  "|---|" + "---|" * len(GRID["method"])]
        for name in names:
            s = r["trial_states"][name]
            lines.append(f"| {name} | " + " | ".join(f"{s[m]['COMPLETE']} / {s[m]['PRUNED']}" for m in GRID["method"]) + " |")
        lines.append("")
    lines += ["## Goals", "", "Per kit: within 6 at 12 trials / within 3 at 24 / epochs at 24 no more than the default's",
              "", "| strategy | " + " | ".join(kits) + " | passed |", "|---|" + "---|" * (len(kits) + 1)]
    for name in names:
        g = goals_met[name]
        lines.append(f"| {name} | " + " | ".join(" ".join("y" if ok else "n" for ok in g[k].values()) for k in kits)
                     + f" | {sum(sum(v.values()) for v in g.values())} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="replay a few strategies against the shipped default")
    parser.add_argument("--strategies", nargs="+", default=["random", "portfolio, then tpe + median within method",
                                                            "tpe, 4 first + median within method"])
    parser.add_argument("--baseline", default="portfolio, then tpe + median")
    parser.add_argument("--kits", nargs="+", default=["demo-kit", "three-class-untrained", "five-class-pretrained"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--out", default="/tmp/replay-within-method")
    parser.add_argument("--sweep", action="store_true", help="the sweep around the default (add_sweep), and random")
    args = parser.parse_args()
    strategies = ["random", *add_sweep()] if args.sweep else args.strategies
    log(f"written {compare(args.kits, args.seeds, strategies, args.baseline, args.trials, args.out)}")
