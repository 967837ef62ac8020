"""A sweep around the shipped search default, replayed on the grid150 tables (search_replay.py's
`add_sweep` strategies): the medians at 12 / 24 / 48 trials (study seed = table seed, as compare()
runs it), all four of the issue's goals per kit, and a robustness check: the same studies with 4
other sampler seeds per table (study seed = table seed + 1000 k).

    python benchmarks/search_sweep.py OUT.md      # about 2 minutes; OUT.json beside it
"""
import json, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_replay as sr  # noqa: E402

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/replay-sweep.md")
from search import load_cells

KITS = ["demo-kit", "three-class-untrained", "five-class-pretrained"]
SEEDS = [1, 2, 3, 4, 5]
OFFSETS = [0, 1, 2, 3, 4]
SHOWN = [12, 24, 48]
BASE = "portfolio, then tpe + median"
names = ["random", *sr.add_sweep()]
names = [BASE] + [n for n in names if n != BASE]

tables = {kit: {s: load_cells(kit, s) for s in SEEDS} for kit in KITS}
portfolios = {kit: sr.learn_portfolio([t for o in KITS if o != kit for t in tables[o].values()]) for kit in KITS}
oracle = {kit: {s: max(c.unseen for c in t) for s, t in tables[kit].items()} for kit in KITS}

# runs[k][kit][name][seed] = list of rows
runs = {}
t0 = time.perf_counter()
for k in OFFSETS:
    runs[k] = {kit: {name: {s: sr.run_strategy(tables[kit][s], name, 48, s + 1000 * k, portfolios[kit]) for s in SEEDS}
                     for name in names} for kit in KITS}
    print(f"offset {k} done {time.perf_counter() - t0:.0f} s", flush=True)

def point(k, kit, name, n):
    r = runs[k][kit][name]
    d = {s: oracle[kit][s] - r[s][n - 1]["pick_unseen"] for s in SEEDS if r[s][n - 1]["pick_unseen"] is not None}
    return {"below_oracle": statistics.median(d.values()), "epochs": statistics.median(r[s][n - 1]["epochs"] for s in SEEDS),
            "per_seed": d}

def goals(k):
    out = {}
    for name in names:
        out[name] = {}
        for kit in KITS:
            p = {n: point(k, kit, name, n) for n in (12, 24)}
            b24 = point(k, kit, BASE, 24)["epochs"]
            r12 = point(k, kit, "random", 12)["below_oracle"]
            out[name][kit] = {"within 6 at 12": p[12]["below_oracle"] <= 6, "within 3 at 24": p[24]["below_oracle"] <= 3,
                              "epochs <= default at 24": p[24]["epochs"] <= b24, "ahead of random at 12": p[12]["below_oracle"] < r12}
    return out

main = {kit: {name: {n: point(0, kit, name, n) for n in SHOWN} for name in names} for kit in KITS}
g = {k: goals(k) for k in OFFSETS}
count = lambda gk, name, first3=False: sum(sum(list(v.values())[:3] if first3 else v.values()) for v in gk[name].values())
pooled = {kit: {name: {n: statistics.median(oracle[kit][s] - runs[k][kit][name][s][n - 1]["pick_unseen"]
                                            for k in OFFSETS for s in SEEDS) for n in SHOWN} for name in names} for kit in KITS}
pooled_ep = {kit: {name: statistics.median(runs[k][kit][name][s][23]["epochs"] for k in OFFSETS for s in SEEDS)
                   for name in names} for kit in KITS}
total_ep24 = {name: sum(main[kit][name][24]["epochs"] for kit in KITS) for name in names}

json.dump({"kits": KITS, "seeds": SEEDS, "sampler_seed_offsets": [1000 * k for k in OFFSETS], "baseline": BASE,
           "portfolios": {kit: [sr.entry(x) for x in p] for kit, p in portfolios.items()},
           "strategies": {n: {"sampler": sr.STRATEGIES[n][0], "pruner": sr.STRATEGIES[n][1], "start": sr.STRATEGIES[n][2]} for n in names},
           "main": main, "goals_main": g[0], "goals_by_offset": {1000 * k: g[k] for k in OFFSETS},
           "passed_by_offset": {n: {1000 * k: count(g[k], n) for k in OFFSETS} for n in names},
           "passed3_by_offset": {n: {1000 * k: count(g[k], n, True) for k in OFFSETS} for n in names},
           "pooled_median_25_studies": pooled, "pooled_epochs24": pooled_ep},
          open(OUT.with_suffix(".json"), "w"), indent=2, default=str)

short = lambda n: n.replace("portfolio, then ", "")
L = ["# Sweep around the shipped default: median pruner's warmup / first trials, TPE's first trials, TPE independent", "",
     f"- replay (benchmarks/search_replay.py --sweep, compare()) of the grid150 tables: kits {KITS}, table seeds {SEEDS}, "
     "studies of 48 trials, all with the portfolio start learned leave-one-kit-out (demo-kit 5, three-class-untrained 3, "
     "five-class-pretrained 4 configurations)",
     f"- default (baseline): **{BASE}** = TPE n_startup_trials 4 (multivariate, group: make_sampler's TPE defaults) + "
     "MedianPruner(n_startup_trials 2, n_warmup_steps 4)",
     "- `median S first, warmup W` = MedianPruner(n_startup_trials=S, n_warmup_steps=W), TPE as the default; "
     "`tpe 8 first` = TPE n_startup_trials 8 (the portfolio's trials count among the 8); `tpe independent` = "
     "TPE multivariate=False, group=False (the requested multivariate=True, group=True IS the default already: "
     "hpo_peft/study/samplers.py make_sampler sets them for every TPE)",
     "- cells: median over the 5 table seeds of (oracle - pick's unseen balanced accuracy), points; [epochs at 24 trials, median]",
     "- goals per kit (4): within 6 at 12 / within 3 at 24 / epochs at 24 <= the default's / ahead of random at 12 (strictly)", ""]
L += ["## Distance to the oracle at 12 / 24 / 48 trials [epochs at 24]", "",
      "| strategy | " + " | ".join(KITS) + " | goals (of 12) | first 3 goals (of 9) | epochs at 24, 3 kits summed |",
      "|---|" + "---|" * (len(KITS) + 3)]
for name in names:
    cells = [" / ".join(f"{main[kit][name][n]['below_oracle']:.1f}" for n in SHOWN) + f" [{main[kit][name][24]['epochs']:.0f}]" for kit in KITS]
    L.append(f"| {short(name)} | " + " | ".join(cells) + f" | {count(g[0], name)} | {count(g[0], name, True)} | {total_ep24[name]:.0f} |")
L += ["", "## Goals per kit (y/n: within 6 at 12, within 3 at 24, epochs <= default at 24, ahead of random at 12)", "",
      "| strategy | " + " | ".join(KITS) + " | passed |", "|---|" + "---|" * (len(KITS) + 1)]
for name in names:
    L.append(f"| {short(name)} | " + " | ".join(" ".join("y" if v else "n" for v in g[0][name][kit].values()) for kit in KITS)
             + f" | {count(g[0], name)} |")
L += ["", "## Per seed at 24 trials (oracle - pick; seeds 1..5)", "", "| strategy | " + " | ".join(KITS) + " |",
      "|---|" + "---|" * len(KITS)]
for name in names:
    L.append(f"| {short(name)} | " + " | ".join(" ".join(f"{v:.1f}" for v in main[kit][name][24]["per_seed"].values()) for kit in KITS) + " |")
L += ["", "## Robustness: other sampler seeds", "",
      "The same 15 (kit, table seed) studies replayed with study seeds table seed + 1000 k, k = 0..4 (k = 0 is the table above). "
      "Goals passed (of 12) per k, and the median distance over all 25 studies per kit at 12 / 24 / 48 [median epochs at 24].", "",
      "| strategy | goals k=0..4 | mean | " + " | ".join(KITS) + " |", "|---|---|---|" + "---|" * len(KITS)]
for name in names:
    per = [count(g[k], name) for k in OFFSETS]
    L.append(f"| {short(name)} | {' '.join(map(str, per))} | {statistics.mean(per):.1f} | " + " | ".join(
        " / ".join(f"{pooled[kit][name][n]:.1f}" for n in SHOWN) + f" [{pooled_ep[kit][name]:.0f}]" for kit in KITS) + " |")
OUT.write_text("\n".join(L) + "\n")
print("\n".join(L))
