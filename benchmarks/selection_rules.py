"""Which trial to pick: the selection rules compared on every trial of `benchmarks/selection.py`'s studies.

    python benchmarks/selection_rules.py OUT [OUT ...] [--report FILE.md]

OUT: a `--out` folder of benchmarks/selection.py (its kit/ and one folder per set-up and seed). Every
completed trial whose adapter was kept is rebuilt from MLflow and scored on the kit's Unseen.xlsx
(the same code as `hpo-peft evaluate`); then, per set-up (a: kfold 16, b: holdout 8+8, c: holdout
16+16), each rule picks a trial per study from what the study knew (scores, fold scores, validation
loss, trainable parameters), and the report gives the mean unseen accuracy of the picks and the mean
gap between the pick's own selection score and its unseen accuracy:

- package: `hpo_peft.tracking.selection.select_best` as it is in this checkout (the highest score; equal
  scores by the lower validation loss, then fewer trainable parameters, then the earlier trial);
- one standard error (kfold only; holdout has no folds and keeps the package's pick): every trial
  within one standard error of the highest score (the standard error of that trial's fold scores)
  ties with it, and the package's tie-break chooses among them (Hastie, Tibshirani & Friedman,
  *Elements of Statistical Learning*, 7.10);
- course default unless beaten (kfold only): trial 0, which studies/demo.yaml enqueues with the
  course's LoRA settings, unless the package's pick beats it by more than one standard error of
  their fold-by-fold score differences;
- lowest validation loss, whatever the score;
- oracle: the trial with the best unseen accuracy (what no rule can know: the ceiling).

Full fine-tunings beyond the best three lose their adapter in a study (`search.keep_adapters`): a
rule that picks one of those counts it as missing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import selection as bench  # benchmarks/selection.py: the set-ups, the kit overrides, the Unseen table
from optuna.trial import TrialState

from hpo_peft.app.commands import prepare_config
from hpo_peft.data import load_test
from hpo_peft.core.errors import UserError
from hpo_peft.models.classifier import load_base_model
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.scoring import evaluate_run
from hpo_peft.tracking.selection import (
    FOLD_SCORES_ATTR,
    VAL_LOSS_ATTR,
    select_best,
    selection_key,
)
from hpo_peft.study.session import StudyLocation, load_study
from hpo_peft.tracking.tracker import Tracker


def one_standard_error(trials):
    top = min(trials, key=selection_key)
    folds = top.user_attrs.get(FOLD_SCORES_ATTR) or []
    error = statistics.stdev(folds) / math.sqrt(len(folds)) if len(folds) > 1 else 0.0
    return min((t for t in trials if t.value >= top.value - error), key=lambda t: selection_key(t)[1:])


def default_unless_beaten(trials):
    """The study's trial 0 (studies/demo.yaml enqueues the course's LoRA settings first) unless the
    package's pick beats it by more than one standard error of their fold-by-fold differences (kfold
    only; holdout, or a trial 0 that was pruned, keeps the package's pick)."""
    best = select_best(trials)
    default = next((t for t in trials if t.number == 0), None)
    mine, theirs = (t.user_attrs.get(FOLD_SCORES_ATTR) or [] for t in (best, default or best))
    if default is None or len(mine) < 2 or len(mine) != len(theirs):
        return best
    diffs = [a - b for a, b in zip(mine, theirs)]
    return best if statistics.mean(diffs) > statistics.stdev(diffs) / math.sqrt(len(diffs)) else default


RULES = {
    "package (hpo_peft.tracking.selection)": select_best,
    "one standard error": one_standard_error,
    "course default unless beaten by one standard error": default_unless_beaten,
    "lowest validation loss": lambda trials: min(trials, key=lambda t: t.user_attrs.get(VAL_LOSS_ATTR, math.inf)),
}


def scored_studies(out: Path) -> list[tuple[str, int, list, dict[int, float | None]]]:
    """(set-up, seed, completed trials, trial number -> unseen balanced accuracy or None)."""
    studies = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and "-seed" in p.name):
        key, seed = folder.name.split("-seed")[0], int(folder.name.split("-seed")[1])
        overrides = [*bench.kit_overrides(out / "kit", seed), *bench.SETUPS[key][1], "train.precision=fp32",
                     f"data.test_table={bench.UNSEEN_TABLE}"]
        config = prepare_config(bench.DEMO, overrides)
        where = StudyLocation.of(config, study_name="selection", storage=str(folder / "optuna.journal"),
                                 tracking_uri=f"sqlite:///{folder.resolve()}/mlflow.db")
        trials = [t for t in load_study(where).trials if t.state == TrialState.COMPLETE]
        tracker = Tracker(where.tracking_uri, experiment=where.study_name, create=False)
        base = load_base_model(config.model)
        test = load_test(config.data, base.preprocessing)
        unseen = {}
        for trial in trials:
            try:
                metrics, _ = evaluate_run(tracker, trial.user_attrs[RUN_ID_ATTR], base, test, config)
                unseen[trial.number] = metrics.balanced_accuracy
            except UserError:  # its adapter was dropped (search.keep_adapters)
                unseen[trial.number] = None
        studies.append((key, seed, trials, unseen))
        bench.log(f"{folder}: {len(trials)} completed trials scored")
    return studies


def report(studies, command: str) -> str:
    info = bench.machine()
    lines = [f"# Selection rules on every trial ({command})", "",
             f"- date: {info['date']}; commit {info['commit']}; {info['cpu']}, {info['cores']} cores; torch "
             f"{info['torch']}; {len(studies)} studies from benchmarks/selection.py", "",
             "Mean over the studies of each set-up: the picked trial's unseen balanced accuracy (%), the gap "
             "between its selection score and that accuracy, and the mean absolute gap.", "",
             "| set-up | rule | studies | unseen | gap | abs gap | picks without an adapter |", "|---|---|---|---|---|---|---|"]
    rules = {**RULES, "oracle (knows the unseen scores)": None}
    for key in bench.SETUPS:
        mine = [s for s in studies if s[0] == key]
        if not mine:  # a set-up selection.py did not run (--setups)
            continue
        for name, rule in rules.items():
            picks, missing = [], 0
            for _, _, trials, unseen in mine:
                pick = (max((t for t in trials if unseen[t.number] is not None), key=lambda t: unseen[t.number])
                        if rule is None else rule(trials))
                if unseen[pick.number] is None:
                    missing += 1
                else:
                    picks.append((pick.value, unseen[pick.number]))
            gaps = [v - u for v, u in picks]
            lines.append(f"| {bench.SETUPS[key][0]} | {name} | {len(mine)} | {statistics.mean(u for _, u in picks):.2f} | "
                         f"{statistics.mean(gaps):+.2f} | {statistics.mean(map(abs, gaps)):.2f} | {missing} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="+", help="benchmarks/selection.py --out folders")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    studies = [s for out in args.out for s in scored_studies(out)]
    text = report(studies, "python benchmarks/selection_rules.py " + " ".join(map(str, args.out)))
    print(text)
    if args.report:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
