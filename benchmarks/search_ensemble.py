"""The study's top trials as one model: how far an ensemble of the k best trials (by selection
score, as `select_best` ranks them) lands from each kit's oracle, against the single best trial.

Over the search benchmark's tables (`search.py grid`), a strategy's study (by default the search the
shipped studies set, read from demo.yaml; `--strategy chosen`: the search benchmark's pick) is replayed as
search_replay.py does; after n trials its completed trials are ranked by selection score (ties: the
lower validation loss) and the top k (k = 1 is today's pick) are trained again as the package trains
them, each trial's folds and refit, and the refits' class probabilities (the softmax of their fp32
logits) on the kit's unseen images averaged: the ensemble's prediction is the arg-max of that mean.
Its balanced accuracy is set against the oracle (the best single configuration of the grid on the
same unseen images, per seed). The member logits are kept in local_data/search-logits (resumable).
Trained cells are checked against the table: the same configuration and seed gives the stored
unseen score again (the runs are deterministic on the CPU), else the benchmark stops.

    python benchmarks/search_ensemble.py --lock /tmp/heavy.lock --tag shipped
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
from datetime import datetime
from pathlib import Path

import torch
from sklearn.metrics import balanced_accuracy_score

from search import (DEMO, KIT_NAMES, RESULTS, ROOT, STRATEGIES, UNSEEN_PER_CLASS, Cell, cell_settings, load_cells, log,
                    open_kit)
from search_replay import learn_portfolio, run_strategy

def shipped_strategy() -> str:
    """The search benchmark's chosen strategy, from the result the shipped portfolio names (its JSON)."""
    from hpo_peft.study.portfolio import SOURCE

    return json.loads((ROOT / SOURCE).with_suffix(".json").read_text())["chosen"]


def shipped_settings() -> tuple[str, dict]:
    """The shipped studies' search as demo.yaml sets it (start, sampler, pruner), registered as a replay
    strategy: its name and the settings."""
    import yaml

    search = yaml.safe_load(DEMO.read_text())["search"]
    settings = {"start": search.get("start", "sampler"), "sampler": search["sampler"], "pruner": search["pruner"]}
    pruner = ", ".join(f"{k} {v}" for k, v in search["pruner"].items() if k != "name")
    name = f"shipped: {settings['start']}, then {search['sampler']['name']} + {search['pruner']['name']} ({pruner})"
    STRATEGIES[name] = (search["sampler"], search["pruner"], {"portfolio": "portfolio", "race": "race"}.get(settings["start"], "none"))
    return name, settings


STRATEGY = shipped_strategy()  # the search benchmark's pick: search_members.py and search_pruning.py start from it
BASELINE = "random"
TRIALS = [4, 8, 12, 16, 24, 32, 48]
SIZES = [1, 3, 5]
CACHE = ROOT / "local_data" / "search-logits"


class Members:
    """A kit and seed's trained cells: their unseen logits, trained on demand and kept on disk."""

    def __init__(self, kit: str, seed: int, lock: Path | None):
        self.kit, self.seed, self.lock = kit, seed, lock
        self.path = CACHE / f"{kit}-seed{seed}.pt"
        self.logits: dict[tuple, torch.Tensor] = torch.load(self.path) if self.path.exists() else {}
        self.workspace = self.unseen = self.config = None

    def _open(self) -> None:
        self.config, self.workspace, self.unseen = open_kit(self.kit, self.seed, UNSEEN_PER_CLASS.get(self.kit, 0))

    def labels(self) -> torch.Tensor:
        key = ("labels",)
        if key not in self.logits:
            if self.unseen is None:
                self._open()
            self.logits[key] = self.unseen.labels
        return self.logits[key]

    def __call__(self, cell: Cell) -> torch.Tensor:
        if cell.key() not in self.logits:
            self._train(cell)
        return self.logits[cell.key()]

    def validation(self, cell: Cell) -> dict:
        """The cell's validation predictions as a study records them (`selection.val_predictions`)."""
        if ("val", *cell.key()) not in self.logits:
            self._train(cell)
        return self.logits[("val", *cell.key())]

    def _train(self, cell: Cell) -> None:
        from hpo_peft.fewshot.evaluate import compute_metrics, forward_in_batches
        from hpo_peft.fewshot.trial import run_trial
        from hpo_peft.tracking.selection import val_predictions

        if self.workspace is None:
            self._open()
        options, train = cell_settings(self.config, *cell.key())
        with open(self.lock or "/dev/null", "a") as handle:
            if self.lock:
                fcntl.flock(handle, fcntl.LOCK_EX)  # other heavy jobs on this machine take turns
            outcome = run_trial(self.workspace, cell.method, options, train, lambda metrics: None, progress=False)
            logits = forward_in_batches(outcome.classifier, self.unseen.images, self.workspace.base.preprocessing,
                                        outcome.settings.train.eval_batch_size, outcome.settings.placement.dtype)
        again = compute_metrics(logits, self.unseen.labels, self.config.data.categories).balanced_accuracy
        if abs(again - cell.unseen) > 1e-6:
            raise SystemExit(f"{self.kit} seed {self.seed} {cell.key()}: unseen {again:.4f}, the table holds "
                             f"{cell.unseen:.4f}: not the run the table stored")
        log(f"  {self.kit} seed {self.seed} {cell.key()}: unseen {again:.2f}")
        self.logits[cell.key()] = logits
        self.logits[("val", *cell.key())] = val_predictions(outcome.fold_validations or [outcome.validation])
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(self.logits, self.path)


def top(cells: list[Cell], k: int) -> list[Cell]:
    return sorted(cells, key=lambda c: (-c.selection, c.val_loss))[:k]


def ensemble_score(members: Members, cells: list[Cell]) -> float:
    probabilities = torch.stack([torch.softmax(members(c), dim=1) for c in cells]).mean(dim=0)
    return 100.0 * balanced_accuracy_score(members.labels().numpy(), probabilities.argmax(dim=1).numpy())


def kit_report(kit: str, seeds: list[int], portfolio: list[tuple], lock: Path | None, strategy: str) -> dict:
    per_seed = {}
    for seed in seeds:
        table, members = load_cells(kit, seed), Members(kit, seed, lock)
        oracle = max(c.unseen for c in table)
        rows = {"oracle": oracle, "exhaustive": {k: oracle - ensemble_score(members, top(table, k)) for k in SIZES}}
        for name in (strategy, BASELINE):
            replay = run_strategy(table, name, max(TRIALS), seed, portfolio)
            rows[name] = {n: {k: oracle - ensemble_score(members, top([r["cell"] for r in replay[:n] if r["cell"]], k))
                              for k in SIZES} for n in TRIALS if any(r["cell"] for r in replay[:n])}
            rows[f"{name}: epochs"] = {n: replay[n - 1]["epochs"] for n in TRIALS}
        per_seed[seed] = rows
        log(f"{kit} seed {seed}: exhaustive " + ", ".join(f"top {k} {v:.1f}" for k, v in rows["exhaustive"].items()))
    def med(get) -> float:
        values = [v for v in (get(r) for r in per_seed.values()) if v is not None]
        return statistics.median(values) if values else None
    summary = {"exhaustive": {k: med(lambda r: r["exhaustive"][k]) for k in SIZES}}
    for name in (strategy, BASELINE):
        summary[name] = {n: {k: med(lambda r: r[name].get(n, {}).get(k)) for k in SIZES} for n in TRIALS}
    epochs = {name: {n: med(lambda r: r[f"{name}: epochs"][n]) for n in TRIALS} for name in (strategy, BASELINE)}
    return {"per_seed": per_seed, "median_below_oracle": summary, "median_epochs": epochs}


def chosen_size(reports: dict, strategy: str) -> int:
    """The size the shipped studies take: most of the issue's distance goals met by the default strategy
    (within 6 points at 12 trials, within 3 at 24, per kit), then the lowest mean distance at 12 and 24."""
    def rank(k: int) -> tuple:
        cells = [(r["median_below_oracle"][strategy][n][k], n) for r in reports.values() for n in (12, 24)]
        return (-sum(v <= (6 if n == 12 else 3) for v, n in cells), statistics.mean(v for v, _ in cells))
    return min(SIZES, key=rank)


def write(reports: dict, seeds: list[int], stem: Path, strategy: str, settings: dict | None) -> None:
    from harness import machine_info

    info, size = machine_info("cpu"), chosen_size(reports, strategy)
    stem.with_suffix(".json").write_text(json.dumps({"kits": reports, "chosen_size": size, "strategy": strategy,
                                                     "settings": settings}, indent=2, default=str))
    lines = [f"# The top trials as one model: ensembles against the oracle, on {len(reports)} kits", "",
             f"- date: {info['date']}; commit {info['commit']}; machine: {info['cpu']}, {info['cores']} cores, "
             f"{info['torch_threads']} torch threads, torch {info['versions'].get('torch')}, CPU fp32",
             f"- tables: results/search-table/*-grid210-seed{{{','.join(map(str, seeds))}}}.json (search.py grid); "
             f"strategies replayed as search_replay.py does, the portfolio learned leave-one-kit-out",
             "- cells: median over seeds of (oracle - the unseen balanced accuracy of the mean class probabilities "
             "of the top k completed trials by selection score), points; k = 1 is the single pick; "
             "negative: the ensemble beats every single configuration of the grid; epochs: trained by n trials "
             "(every fold's and the refit's, pruned trials' as far as they ran), median", ""]
    lines += [f"Chosen for the shipped studies (`search.ensemble`): {size} (most goals met by `{strategy}`: within 6 "
              "points at 12 trials and within 3 at 24 on each kit; then the lowest mean distance at 12 and 24)", ""]
    for kit, report in reports.items():
        summary, epochs = report["median_below_oracle"], report.get("median_epochs", {})
        lines += [f"## {kit}", "", "| strategy | trials | " + " | ".join(f"top {k}" for k in SIZES) + " | epochs |",
                  "|---|---|" + "---|" * (len(SIZES) + 1)]
        lines.append("| exhaustive (all 210) | 210 | " + " | ".join(f"{summary['exhaustive'][k]:.1f}" for k in SIZES) + " | |")
        for name in (strategy, BASELINE):
            for n in TRIALS:
                cells = [summary[name][n][k] for k in SIZES]
                spent = epochs.get(name, {}).get(n)
                lines.append(f"| {name} | {n} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells)
                             + f" | {'' if spent is None else f'{spent:.0f}'} |")
        lines.append("")
    lines.append(f"![ensembles against the oracle]({stem.name}.png)")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(reports: dict, path: Path, strategy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), squeeze=False)
    for ax, (kit, report) in zip(axes[0], reports.items()):
        summary = report["median_below_oracle"]
        for name, style in ((strategy, "-"), (BASELINE, ":")):
            for k, colour in zip(SIZES, ("tab:grey", "tab:blue", "tab:green")):
                ax.plot(TRIALS, [summary[name][n][k] for n in TRIALS], style, color=colour, marker="o", markersize=3,
                        label=f"{name.split(' (')[0]}, {'best trial' if k == 1 else f'top {k}'}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(kit)
        ax.set_xlabel("trials")
        ax.set_ylabel("oracle - pick (points, median over seeds)")
        ax.set_ylim(-6, 32)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--kits", nargs="+", default=KIT_NAMES, choices=KIT_NAMES)
    parser.add_argument("--lock", type=Path, default=None, help="a lock file shared with other heavy jobs")
    parser.add_argument("--strategy", choices=["shipped", "chosen"], default="shipped",
                        help="shipped: the search demo.yaml sets; chosen: the search benchmark's pick (its first run)")
    parser.add_argument("--tag", default="", help="appended to the result's name")
    args = parser.parse_args()
    strategy, settings = shipped_settings() if args.strategy == "shipped" else (STRATEGY, None)
    tables = {kit: [load_cells(kit, s) for s in args.seeds] for kit in KIT_NAMES}
    reports = {}
    for kit in args.kits:
        portfolio = learn_portfolio([t for other in KIT_NAMES if other != kit for t in tables[other]])
        reports[kit] = kit_report(kit, args.seeds, portfolio, args.lock, strategy)
    stem = RESULTS / f"search-ensemble-{datetime.now().date().isoformat()}{'-' + args.tag if args.tag else ''}"
    write(reports, args.seeds, stem, strategy, settings)
    plot(reports, stem.with_suffix(".png"), strategy)
    log(f"written {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
