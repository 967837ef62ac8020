"""Which trials make the ensemble: the top k by selection score, or members chosen by the ensemble's
own validation score (ensemble selection, Caruana et al. 2004, ICML: forward selection of models by
the score of their averaged predictions).

Over the search benchmark's tables, the shipped strategy's study is replayed as search_ensemble.py
does; after n trials its completed trials are the candidates. Each rule names a list of members (a
member may repeat where the rule allows it: it then weighs more in the mean); the members' refits'
class probabilities on the kit's unseen images are averaged and the balanced accuracy of their
arg-max is set against the oracle. The validation predictions a rule reads are the ones a study
records for every trial (`selection.val_predictions`: per fold, each image's class probabilities
averaged over the score window), scored as `selection.ensemble_score` scores an ensemble. Cells are
trained as search_ensemble.py trains them (the same cache, local_data/search-logits, checked
against the table).

    python benchmarks/search_members.py --lock /tmp/heavy.lock
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch
from sklearn.metrics import balanced_accuracy_score

from search import KIT_NAMES, RESULTS, Cell, load_cells, log
from search_ensemble import STRATEGY, Members, top
from search_replay import learn_portfolio, run_strategy

TRIALS = [8, 12, 16, 24]
SIZE = 3


def val_score(members: Members, cells: list[Cell]) -> float:
    from hpo_peft.tracking.selection import VAL_PREDICTIONS_ATTR, ensemble_score

    return ensemble_score([SimpleNamespace(user_attrs={VAL_PREDICTIONS_ATTR: members.validation(c)}) for c in cells])


def greedy(members: Members, ranked: list[Cell], start: list[Cell], steps: int, repeat: bool, stop: bool) -> list[Cell]:
    """Forward selection: each step adds the candidate whose addition scores best on validation (ties:
    the earlier in the selection order); `repeat` lets a member be added again, `stop` ends the
    selection when no addition raises the score."""
    chosen = list(start)
    for _ in range(steps):
        pool = [c for c in ranked if repeat or c not in chosen]
        if not pool:
            break
        scores = [val_score(members, chosen + [c]) for c in pool]
        best = max(range(len(pool)), key=lambda i: (scores[i], -i))
        if stop and chosen and scores[best] <= val_score(members, chosen):
            break
        chosen.append(pool[best])
    return chosen


RULES = {
    "top 1 (the best trial)": lambda m, r: r[:1],
    "top 3 (shipped)": lambda m, r: r[:SIZE],
    "best, then 2 greedy, distinct": lambda m, r: greedy(m, r, r[:1], SIZE - 1, repeat=False, stop=False),
    "best, then up to 2 greedy while it rises": lambda m, r: greedy(m, r, r[:1], SIZE - 1, repeat=False, stop=True),
    "3 greedy with repeats (Caruana)": lambda m, r: greedy(m, r, [], SIZE, repeat=True, stop=False),
    "5 greedy with repeats (Caruana)": lambda m, r: greedy(m, r, [], 5, repeat=True, stop=False),
    "best, then 2 greedy of top 5": lambda m, r: greedy(m, r[:5], r[:1], SIZE - 1, repeat=False, stop=False),
}


def unseen_distance(members: Members, cells: list[Cell], oracle: float) -> float:
    probabilities = torch.stack([torch.softmax(members(c), dim=1) for c in cells]).mean(dim=0)
    return oracle - 100.0 * balanced_accuracy_score(members.labels().numpy(), probabilities.argmax(dim=1).numpy())


def kit_report(kit: str, seeds: list[int], portfolio: list[tuple], lock: Path | None) -> dict:
    per_seed = {}
    for seed in seeds:
        table, members = load_cells(kit, seed), Members(kit, seed, lock)
        oracle = max(c.unseen for c in table)
        replay = run_strategy(table, STRATEGY, max(TRIALS), seed, portfolio)
        rows = {}
        for n in TRIALS:
            ranked = top([r["cell"] for r in replay[:n] if r["cell"]], len(replay))
            rows[n] = {}
            for name, rule in RULES.items():
                chosen = rule(members, ranked)
                rows[n][name] = {"distance": unseen_distance(members, chosen, oracle),
                                 "validation": val_score(members, chosen), "members": [list(c.key()) for c in chosen]}
        per_seed[seed] = rows
        log(f"{kit} seed {seed} at {max(TRIALS)}: " + ", ".join(f"{k} {v['distance']:.1f}" for k, v in rows[max(TRIALS)].items()))
    summary = {n: {name: statistics.median(per_seed[s][n][name]["distance"] for s in seeds) for name in RULES} for n in TRIALS}
    return {"per_seed": per_seed, "median_below_oracle": summary}


def write(reports: dict, seeds: list[int], stem: Path) -> None:
    from harness import machine_info

    info = machine_info("cpu")
    goals = {name: sum((r["median_below_oracle"][12][name] <= 6) + (r["median_below_oracle"][24][name] <= 3)
                       for r in reports.values()) for name in RULES}
    means = {name: statistics.mean(r["median_below_oracle"][n][name] for r in reports.values() for n in (12, 24))
             for name in RULES}
    stem.with_suffix(".json").write_text(json.dumps({"kits": reports, "goals": goals, "mean_12_24": means}, indent=2))
    lines = [f"# Which trials make the ensemble: member rules against the oracle, on {len(reports)} kits", "",
             f"- date: {info['date']}; commit {info['commit']}; machine: {info['cpu']}, {info['cores']} cores, "
             f"torch {info['versions'].get('torch')}, CPU fp32",
             f"- tables: results/search-table/*-grid210-seed{{{','.join(map(str, seeds))}}}.json; the study replayed: "
             f"`{STRATEGY}` (the portfolio learned leave-one-kit-out); candidates: its completed trials after n",
             "- cells: median over seeds of (oracle - the unseen balanced accuracy of the members' mean class "
             "probabilities), points; greedy rules read the trials' validation predictions only", "",
             "| rule | goals met (of 8) | mean at 12 and 24 |", "|---|---|---|"]
    lines += [f"| {name} | {goals[name]} | {means[name]:.2f} |" for name in RULES]
    for kit, report in reports.items():
        lines += ["", f"## {kit}", "", "| rule | " + " | ".join(f"{n} trials" for n in TRIALS) + " |",
                  "|---|" + "---|" * len(TRIALS)]
        lines += [f"| {name} | " + " | ".join(f"{report['median_below_oracle'][n][name]:.1f}" for n in TRIALS) + " |"
                  for name in RULES]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--kits", nargs="+", default=KIT_NAMES, choices=KIT_NAMES)
    parser.add_argument("--lock", type=Path, default=None, help="a lock file shared with other heavy jobs")
    args = parser.parse_args()
    tables = {kit: [load_cells(kit, s) for s in args.seeds] for kit in KIT_NAMES}
    reports = {}
    for kit in args.kits:
        portfolio = learn_portfolio([t for other in KIT_NAMES if other != kit for t in tables[other]])
        reports[kit] = kit_report(kit, args.seeds, portfolio, args.lock)
    stem = RESULTS / f"search-members-{datetime.now().date().isoformat()}"
    write(reports, args.seeds, stem)
    log(f"written {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
