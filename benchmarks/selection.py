"""Does the study's chosen configuration hold on unseen data? k-fold vs holdout selection on the demo kit.

    python benchmarks/selection.py [--seeds 1 2 3] [--trials 12] [--unseen-per-class 1000] [--setups a b c e d]
                                   [--set KEY=VALUE ...]
                                   [--out benchmarks/out/selection] [--report benchmarks/results/selection-DATE.md]

For each sampling seed (`data.seed`), four studies with the demo config's search space, sampler
and pruner (studies/demo.yaml, `train.precision: fp32`), each in its own fresh Optuna journal and
SQLite MLflow store under --out:

    (a) kfold, 16 labels per class (shots 16, 4 folds)
    (b) holdout at the same budget: 8 training + 8 validation shots per class
    (c) holdout, 16 + 16
    (e) (b) with `data.refit`: the same trials and pick, the kept adapter trained again on all 16
        labels per class for the chosen epochs

The best trial (hpo_peft.tracking.selection's tie-break) is rebuilt from its MLflow adapter and scored by
`hpo-peft evaluate`'s own code (`commands.evaluate_command`) on two test tables: the kit's Test.xlsx
(24 images per class: one image moves balanced accuracy by about 1 point, and a seed's test score
by several) and "unseen", --unseen-per-class more images per class drawn by the kit's own generator
(new random streams, the same distribution) into partition/Test/Unseen.xlsx: with the default
1000 per class a score's standard error from the test images alone is about 0.8 points, against
about 5 on Test.xlsx (and 2.5 with the 100 per class of earlier runs). The goals are judged on
both. Beside them, (d): the course's fixed LoRA settings (studies/course_notebook.yaml: r4, Adam
1e-3, 20 epochs, batch 32, 16 shots, fp32) through the course protocol (`course.run_course_trial`)
on the same kit and seed.
The goals are judged with (b) and again with (e) as the equal-budget holdout. --setups runs some
set-ups only (selection_pool.py pools the reports); --set changes every study's config (a
measurement of another setting, named in the report's header). Prints a Markdown report and writes it to
--report. What it means: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's hpo_peft, not whichever one the venv points at
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the log

import torch
from harness import machine_info  # benchmarks/harness.py

from hpo_peft.app.commands import evaluate_command, prepare_config, prepare_study_config
from hpo_peft.fewshot.course import run_course_trial
from hpo_peft.demo_kit import build_demo_kit
from hpo_peft.study.session import StudyLocation, run_study

DEMO = ROOT / "studies" / "demo.yaml"
COURSE = ROOT / "studies" / "course_notebook.yaml"
SETUPS = {  # key: (label, data overrides)
    "a": ("kfold 16", ["data.shots=16", "data.validation=kfold", "data.folds=4"]),
    "b": ("holdout 8+8", ["data.shots=8", "data.validation=holdout", "data.val_shots=8"]),
    "c": ("holdout 16+16", ["data.shots=16", "data.validation=holdout", "data.val_shots=16"]),
    "e": ("holdout 8+8 refit", ["data.shots=8", "data.validation=holdout", "data.val_shots=8", "data.refit=true"]),
}
HOLDOUTS = ("b", "e")  # the equal-budget holdouts the goals are judged with, each in turn
COURSE_KEY = "d"
COURSE_LABEL = "course LoRA r4 (fixed)"


@dataclass
class Row:
    setup: str  # a | b | c | d
    seed: int
    labels_per_class: int
    method: str
    validation: float | None  # the selection score (None for the course: it selects nothing)
    test: float  # the kit's Test.xlsx
    unseen: float  # Unseen.xlsx (--unseen-per-class images per class)
    corrected: float | None = None  # kfold: the selection score less the best-of-trials bias (selection.py)
    trials: str = ""  # e.g. "12 (5 pruned)"
    seconds: float = 0.0
    epochs: int = 0  # epochs trained by the study's trials (kfold: every fold's and the refits'); the compute

    def score(self, table: str) -> float:
        return self.test if table == "test" else self.unseen

    def gap(self, table: str) -> float | None:
        return None if self.validation is None else self.validation - self.score(table)

    def corrected_gap(self, table: str) -> float | None:
        return None if self.corrected is None else self.corrected - self.score(table)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# One study, one course run
# ---------------------------------------------------------------------------------------------


UNSEEN_TABLE = "partition/Test/Unseen.xlsx"
TABLES = {"test": "kit Test.xlsx", "unseen": "Unseen.xlsx"}


def add_unseen_table(kit: Path, per_class: int) -> int:
    """Unseen.xlsx: `per_class` new test images per class from the kit's generator (image streams
    10000+ of the test split; the kit's own Test images are streams 0-95). Written once per size:
    a kit whose table has another size gets it drawn again."""
    import pandas as pd
    from PIL import Image

    from hpo_peft.demo_kit import tissue

    table, size = kit / "sicapv2" / UNSEEN_TABLE, per_class * len(tissue.CLASSES)
    if not table.exists() or len(pd.read_excel(table)) != size:
        rows = []
        for c, cls in enumerate(tissue.CLASSES):
            for i in range(per_class):
                index = 10_000 + c * per_class + i
                name = f"unseen_{index}.jpg"
                Image.fromarray(tissue.draw_patch(tissue.rng("test", index), cls), "RGB").save(
                    kit / "sicapv2" / "images" / name, format="JPEG", quality=90)
                rows.append({"image_name": name, **{k: int(k == cls) for k in tissue.CLASSES}, "G4C": 0})
        pd.DataFrame(rows).to_excel(table, index=False)
    return size


def kit_overrides(kit: Path, seed: int) -> list[str]:
    return [f"data.root={kit / 'sicapv2'}", f"model.name_or_path={kit / 'model'}", "demo_kit=null", f"data.seed={seed}"]


def fresh_stores(folder: Path) -> dict:
    """A new journal and SQLite MLflow store (a rerun starts the study afresh, never continues it)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {"study_name": "selection", "storage": str(folder / "optuna.journal"),
            "tracking_uri": f"sqlite:///{folder.resolve()}/mlflow.db"}


def epochs_trained(tracking_uri: str) -> int:
    """Epochs the study's trials trained, from their MLflow metrics: a kfold trial's epochs of every
    fold (`fold1.train_loss`, ...) and its refit's (`selected_epoch`), a holdout trial's `train_loss`
    steps; pruned trials up to where they stopped."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    total = 0
    for run in client.search_runs(experiments, max_results=10_000):
        folds = [k for k in run.data.metrics if k.startswith("fold") and k.endswith(".train_loss")]
        if folds:
            total += sum(len(client.get_metric_history(run.info.run_id, k)) for k in folds)
            total += int(run.data.metrics.get("selected_epoch", 0))
        elif "train_loss" in run.data.metrics:
            total += len(client.get_metric_history(run.info.run_id, "train_loss"))
            if run.data.params.get("data.refit") == "True":  # holdout's refit on training + validation images
                total += int(run.data.metrics.get("selected_epoch", 0))
    return total


def trial_counts(study) -> str:
    states = [t.state.name for t in study.trials]
    other = {s: states.count(s) for s in sorted(set(states)) if s != "COMPLETE"}
    return f"{len(states)}" + (f" ({', '.join(f'{n} {s.lower()}' for s, n in other.items())})" if other else "")


def run_setup(key: str, seed: int, kit: Path, out: Path, n_trials: int, extra: list[str]) -> Row:
    """Study (a), (b), (c) or (e) for one seed (`extra`: --set overrides), then `hpo-peft evaluate` on its best trial."""
    overrides = [*kit_overrides(kit, seed), *SETUPS[key][1], "train.precision=fp32", *extra]
    options = fresh_stores(out / f"{key}-seed{seed}")
    config = prepare_study_config(DEMO, overrides)
    started = time.perf_counter()
    study = run_study(config, StudyLocation.of(config, **options), n_trials, None)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its JSON; we keep the dict
        result = evaluate_command(DEMO, overrides, options, run_id=None, register=None, as_json=True)
        unseen = evaluate_command(DEMO, [*overrides, f"data.test_table={UNSEEN_TABLE}"], options,
                                  run_id=result["mlflow_run_id"], register=None, as_json=True)
    return Row(key, seed, config.data.labels_per_class, result["method"]["name"], result["val_balanced_accuracy"],
               result["balanced_accuracy"], unseen["balanced_accuracy"], result["val_balanced_accuracy_corrected"],
               trial_counts(study), time.perf_counter() - started, epochs_trained(options["tracking_uri"]))


def run_course(seed: int, kit: Path) -> Row:
    """(d): the course notebook's experiment with its fixed LoRA settings, on the demo kit."""
    config = prepare_config(COURSE, kit_overrides(kit, seed), method="lora")
    started = time.perf_counter()
    result = run_course_trial(config, "lora")
    unseen = run_course_trial(prepare_config(COURSE, [*kit_overrides(kit, seed), f"data.test_table={UNSEEN_TABLE}"],
                                             method="lora"), "lora")  # the same training (seeded), the other table
    return Row(COURSE_KEY, seed, config.data.shots, "lora", None, result.test.balanced_accuracy,
               unseen.test.balanced_accuracy, None, "fixed", time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Summary and goals
# ---------------------------------------------------------------------------------------------


def label_of(key: str) -> str:
    return COURSE_LABEL if key == COURSE_KEY else SETUPS[key][0]


def summary(rows: list[Row], table: str) -> dict[str, dict]:
    out = {}
    for key in [*SETUPS, COURSE_KEY]:
        mine = [r for r in rows if r.setup == key]
        if not mine:  # a run of some set-ups only (--setups)
            continue
        gaps = [r.gap(table) for r in mine if r.validation is not None]
        corrected = [r.corrected_gap(table) for r in mine if r.corrected is not None]
        out[key] = {"test": statistics.mean(r.score(table) for r in mine),
                    "epochs": statistics.mean(r.epochs for r in mine), "seconds": statistics.mean(r.seconds for r in mine),
                    "corrected_gap": statistics.mean(corrected) if len(corrected) == len(mine) else None,
                    "gap": statistics.mean(gaps) if gaps else None,
                    "abs_gap": statistics.mean(abs(g) for g in gaps) if gaps else None}
    return out


def goals(rows: list[Row], means: dict[str, dict], table: str, holdout: str = "b") -> list[tuple[str, bool, str]]:
    """(statement, passed, the numbers behind it), with `holdout` (b, or e: with its refit) as the
    equal-budget holdout; the studies of the issue's set-ups are kfold's, it and holdout 16+16's.
    The gap goal compares sizes: a mean gap below zero (a pessimistic selection score) counts by its
    size, as an optimistic one does. [] when a set-up the goals need was not run."""
    if not {"a", holdout, COURSE_KEY} <= set(means):
        return []
    a, b, name = means["a"], means[holdout], label_of(holdout)
    by = {(r.setup, r.seed): r for r in rows}

    def paired_se(value) -> str:
        """Standard error of a per-seed difference between kfold's study and the holdout's: how far
        chance alone moves the margin with this many seeds."""
        diffs = [value(by["a", s], by[holdout, s]) for s in sorted({r.seed for r in rows}) if ("a", s) in by and (holdout, s) in by]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        return f"standard error over {len(diffs)} seeds, paired by seed: {se:.2f}"

    course = {r.seed: r.score(table) for r in rows if r.setup == COURSE_KEY}
    mine = [r for r in rows if r.setup in ("a", holdout, "c")]
    losers = [f"{label_of(r.setup)} seed {r.seed}: {r.score(table):.2f} vs {course[r.seed]:.2f}"
              for r in mine if not r.score(table) > course[r.seed]]
    return [
        (f"at equal budget (16 labels/class) kfold's mean test > {name}'s mean test",
         a["test"] > b["test"], f"{a['test']:.2f} vs {b['test']:.2f} ({a['test'] - b['test']:+.2f}; "
         f"{paired_se(lambda x, y: x.score(table) - y.score(table))})"),
        (f"|kfold's mean gap| <= half |{name}'s mean gap|",
         abs(a["gap"]) <= abs(b["gap"]) / 2, f"|{a['gap']:+.2f}| vs |{b['gap']:+.2f}| / 2 = {abs(b['gap']) / 2:.2f} "
         f"(kfold's gap less half holdout's: {paired_se(lambda x, y: x.gap(table) - y.gap(table) / 2)})"),
        (f"|kfold's mean gap| <= half |{name}'s mean gap|, kfold's score corrected for the best-of-trials choice",
         a["corrected_gap"] is not None and abs(a["corrected_gap"]) <= abs(b["gap"]) / 2,
         f"|{fmt(a['corrected_gap'])}| vs |{b['gap']:+.2f}| / 2 = {abs(b['gap']) / 2:.2f}"),
        (f"every study's test (kfold, {name}, holdout 16+16) > the course's fixed LoRA test for the same seed",
         not losers, f"{len(mine) - len(losers)} of {len(mine)} studies above" + (f"; not: {'; '.join(losers)}" if losers else "")),
    ]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    """harness.machine_info (the one machine description of the benchmarks), with this report's keys."""
    info = machine_info("cpu")
    return {**info, "torch": torch.__version__, "load": info["load_average_start"]}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[Row]) -> list[str]:
    lines = ["| set-up | seed | labels/class | trials | best trial's method | validation | corrected | test (kit) | gap | "
             "test (unseen) | gap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.setup}: {label_of(r.setup)} | {r.seed} | {r.labels_per_class} | {r.trials} | {r.method} | "
                     f"{fmt(r.validation)} | {fmt(r.corrected)} | {fmt(r.test)} | {fmt(r.gap('test'))} | {fmt(r.unseen)} | "
                     f"{fmt(r.gap('unseen'))} |")
    return lines


def means_table(means: dict[str, dict]) -> list[str]:
    lines = ["| set-up | mean test | mean gap (val - test) | mean abs(gap) | mean gap (corrected - test) | "
             "epochs trained per study | seconds per study |", "|---|---|---|---|---|---|---|"]
    for key, m in means.items():
        lines.append(f"| {key}: {label_of(key)} | {fmt(m['test'])} | {fmt(m['gap'])} | {fmt(m['abs_gap'])} | "
                     f"{fmt(m['corrected_gap'])} | {'-' if key == COURSE_KEY else round(m['epochs'])} | {m['seconds']:.0f} |")
    return lines


def header(info: dict, args: argparse.Namespace, wall_s: float) -> list[str]:
    seeds = " ".join(map(str, args.seeds))
    command = (f"--seeds {seeds} --trials {args.trials} --unseen-per-class {args.unseen_per_class} --setups {' '.join(args.setups)}"
               + "".join(f" --set {o}" for o in args.overrides))
    return [
        "# Selection on unseen data: kfold vs holdout (demo kit)",
        "",
        (f"- date: {info['date']}; commit {info['commit']}; wall time {wall_s / 60:.1f} min "
         f"(load average at the start {info['load']:.2f})"),
        (f"- machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads); "
         f"torch {info['torch']}, python {info['python']}; CPU, fp32"),
        (f"- `python benchmarks/selection.py {command}`: {args.trials}-trial studies "
         "with studies/demo.yaml's search space, sampler and pruner; the best trial rebuilt from its MLflow adapter "
         "and scored as `hpo-peft evaluate` does on the kit's Test.xlsx (96 images) and on Unseen.xlsx "
         f"({args.unseen_per_class} new images per class from the kit's generator); (d) the course protocol with "
         "studies/course_notebook.yaml's LoRA settings. Scores: balanced accuracy, %."),
        "",
    ]


def goal_lines(found: list[tuple[str, bool, str]]) -> list[str]:
    """`goals`' verdicts as Markdown bullets (this report's and selection_pool.py's)."""
    return [f"- **{'PASS' if ok else 'FAIL'}**: {text}: {numbers}" for text, ok, numbers in found]


def report(rows: list[Row], info: dict, args: argparse.Namespace, wall_s: float) -> str:
    lines = [*header(info, args, wall_s), *table(rows), ""]
    for key, name in TABLES.items():
        means = summary(rows, key)
        lines += [f"## On {name}", "", *means_table(means), ""]
        for holdout in HOLDOUTS:
            if found := goals(rows, means, key, holdout):
                lines += [f"Goals ({label_of(holdout)} as the equal-budget holdout):", "", *goal_lines(found), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="sampling seeds (data.seed)")
    parser.add_argument("--trials", type=int, default=12, help="trials per study")
    parser.add_argument("--setups", nargs="+", choices=[*SETUPS, COURSE_KEY], default=[*SETUPS, COURSE_KEY],
                        help="which set-ups to run (default all; selection_pool.py pools reports of different set-ups)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every study (not the course's run), e.g. search.pruner.n_warmup_steps=30")
    parser.add_argument("--unseen-per-class", type=int, default=1000, help="images per class of Unseen.xlsx")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "selection",
                        help="demo kit and the studies' stores (git-ignored)")
    parser.add_argument("--report", type=Path, help="Markdown report (default benchmarks/results/selection-DATE.md)")
    args = parser.parse_args()
    info = machine()
    out_md = args.report or ROOT / "benchmarks" / "results" / f"selection-{info['date'][:10]}.md"
    started = time.perf_counter()
    log(f"demo kit in {args.out / 'kit'}")
    kit = build_demo_kit((args.out / "kit").resolve(), progress=False)
    log(f"Unseen.xlsx: {add_unseen_table(kit, args.unseen_per_class)} images")
    rows = []
    for seed in args.seeds:
        for key in [k for k in SETUPS if k in args.setups]:
            log(f"seed {seed}: study ({key}) {label_of(key)}, {args.trials} trials")
            rows.append(run_setup(key, seed, kit, args.out, args.trials, args.overrides))
            log(f"  best {rows[-1].method}: validation {rows[-1].validation:.2f}, test {rows[-1].test:.2f}, "
                f"unseen {rows[-1].unseen:.2f} "
                f"({rows[-1].seconds:.0f} s)")
        if COURSE_KEY in args.setups:
            log(f"seed {seed}: ({COURSE_KEY}) {COURSE_LABEL}")
            rows.append(run_course(seed, kit))
            log(f"  test {rows[-1].test:.2f}, unseen {rows[-1].unseen:.2f} ({rows[-1].seconds:.0f} s)")
    rows.sort(key=lambda r: (r.setup, r.seed))
    text = report(rows, info, args, time.perf_counter() - started)
    print("\n" + text)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    out_md.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))  # for further analyses
    log(f"report: {out_md}")


if __name__ == "__main__":
    main()
