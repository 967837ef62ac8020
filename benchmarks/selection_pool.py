"""selection.py's runs pooled: the goals over all their seeds, and how often each goal passes on a few seeds.

    python benchmarks/selection_pool.py RESULT.json [RESULT.json ...] [--draw 3] [--samples 20000]
                                        [--report FILE.md]

RESULT.json: what benchmarks/selection.py writes beside its report (one row per set-up and seed).
The runs must share their --trials and --unseen-per-class (the tables are not comparable otherwise;
not checked: the JSON does not hold them) and no seed may appear twice. The report gives, per test
table, selection.py's means and goals over every seed, then the share of `--samples` draws of
`--draw` different seeds (at random from the pooled ones) on which each goal passes: how much a
verdict on the issue's three seeds says about the scheme rather than about those three seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection as bench  # benchmarks/selection.py: Row, summary, goals, goal_lines, means_table


def load(paths: list[Path]) -> list[bench.Row]:
    rows = [bench.Row(**r) for path in paths for r in json.loads(path.read_text())]
    keys = [(r.setup, r.seed) for r in rows]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SystemExit(f"seeds appear in more than one file: {', '.join(f'{s} seed {n}' for s, n in twice)}")
    return rows


def verdicts(rows: list[bench.Row], table: str, holdout: str) -> list[bool]:
    return [ok for _, ok, _ in bench.goals(rows, bench.summary(rows, table), table, holdout)]


def pass_rates(rows: list[bench.Row], table: str, holdout: str, draw: int, samples: int) -> list[float]:
    """Per goal, the share of `samples` random draws of `draw` different seeds on which it passes."""
    seeds = sorted({r.seed for r in rows})
    rng = random.Random(0)
    chosen = [set(rng.sample(seeds, draw)) for _ in range(samples)]
    draws = [verdicts([r for r in rows if r.seed in pick], table, holdout) for pick in chosen]
    return [sum(goal) / samples for goal in zip(*draws)]


def report(rows: list[bench.Row], paths: list[Path], draw: int, samples: int) -> str:
    seeds = sorted({r.seed for r in rows})
    lines = ["# Selection on unseen data, pooled", "",
             f"- {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}) from: {', '.join(p.name for p in paths)}",
             f"- `python benchmarks/selection_pool.py {' '.join(p.name for p in paths)} --draw {draw} --samples {samples}`", ""]
    for key, name in bench.TABLES.items():
        means = bench.summary(rows, key)
        lines += [f"## On {name}", "", *bench.means_table(means), ""]
        for holdout in bench.HOLDOUTS:
            found = bench.goals(rows, means, key, holdout)
            if not found:
                continue
            lines += [f"Goals over all {len(seeds)} seeds ({bench.label_of(holdout)} as the equal-budget holdout):", ""]
            lines += bench.goal_lines(found)
            lines += ["", f"Share of {samples} draws of {draw} seeds on which each goal passes:", ""]
            rates = pass_rates(rows, key, holdout, draw, samples)
            lines += [f"- {100 * rate:.1f} %: {text}" for (text, _, _), rate in zip(found, rates)]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="selection.py's JSON results")
    parser.add_argument("--draw", type=int, default=3, help="seeds per draw (the issue's protocol: 3)")
    parser.add_argument("--samples", type=int, default=20_000, help="random draws")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    text = report(load(args.results), args.results, args.draw, args.samples)
    print(text)
    if args.report:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
