"""`hpo-peft compare`: black-box adapters vs PEFT across shot counts, fairly.

For every shots x seed, each method gets its own small study (`compare.trials_per_method`) in its
own search space and with its own training defaults, validated within the same label budget at
every K (`data.validation`: kfold, K labels per class; holdout, K + K_val with `compare.val_shots`);
the selected adapter is then rebuilt from MLflow and scored on the test split. Where K is too small
to validate (kfold with K = 1) the method's fixed settings run instead, labelled `fixed defaults`.
Reported per method and shot count: mean and std of test balanced accuracy over seeds, the labels
per class used, the mean validation - test gap and the selection scores' mean standard error (the
gap one study's few validation images explain), as CSV tables and a plot, on one MLflow parent
run. Re-running continues the small studies; one started under other settings stops the
comparison before anything trains (`check_grid_studies`). In the MLflow UI each trial's run name
leads with its grid point (`K4 s1 t000 lora ...`), each small study's pick carries `hpo_peft.best`,
and the printed link opens the comparison's parent run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd

from hpo_peft.study import identity
from hpo_peft.core.config import StudyConfig
from hpo_peft.data import LabelledImages, load_test
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.evaluate import evaluate_as_trained, pyplot
from hpo_peft.methods import get_method
from hpo_peft.models.classifier import load_base_model
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.run_record import RUN_LABEL_ATTR, log_test_result
from hpo_peft.tracking.run_story import TAG_BEST
from hpo_peft.tracking.scoring import evaluate_run
from hpo_peft.fewshot.settings import merged_train
from hpo_peft.study.search_space import searches
from hpo_peft.tracking.selection import STANDARD_ERROR_ATTR, select_best
from hpo_peft.study.session import StudyLocation, create_study, open_storage, optimize
from hpo_peft.tracking.tracker import TAG_KIND, Tracker
from hpo_peft.fewshot.trial import Workspace, open_workspace, run_trial
from hpo_peft.tracking.ui_links import print_links, tracker_links
from hpo_peft.fewshot.validation import grid_point

FIXED = "fixed defaults"
TAG_CELL = "hpo_peft.compare_cell"


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.assign(gap=rows.val_balanced_accuracy - rows.test_balanced_accuracy)
    table = rows.groupby(["method", "shots"]).agg(
        labels_per_class=("labels_per_class", "first"),
        selection=("selection", "first"),
        test_bacc_mean=("test_balanced_accuracy", "mean"),
        test_bacc_std=("test_balanced_accuracy", "std"),
        seeds=("test_balanced_accuracy", "count"),
        val_bacc_mean=("val_balanced_accuracy", "mean"),
        gap_mean=("gap", "mean"),
        val_se_mean=("val_standard_error", "mean"),  # how much of a gap one score's few images explain
    ).reset_index()
    return table


def accuracy_plot(table: pd.DataFrame):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    spread = bool((table["seeds"] > 1).any())  # one seed: no std to draw or name
    for method, part in table.groupby("method"):
        if spread:
            ax.errorbar(part["shots"], part["test_bacc_mean"], yerr=part["test_bacc_std"].fillna(0), marker="o",
                        capsize=3, label=method)
        else:
            ax.plot(part["shots"], part["test_bacc_mean"], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["shots"].unique()), [str(k) for k in sorted(table["shots"].unique())])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test balanced accuracy (%)")
    ax.set_title("mean ± std over sampling seeds" if spread else "one sampling seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def fixed_defaults(tracker: Tracker, parent_id: str, workspace: Workspace, method: str, test: LabelledImages,
                   name: str) -> dict:
    """K too small to validate: the method's fixed settings train on all K shots for max_epochs and
    are scored on test. A finished run of this grid point is reused when compare runs again."""
    found = tracker.find_finished({TAG_CELL: name})
    if found:
        return {"selection": FIXED, "val_balanced_accuracy": math.nan, "val_standard_error": math.nan,
                "test_balanced_accuracy": found[0].data.metrics["test_balanced_accuracy"], "mlflow_run_id": found[0].info.run_id}
    config = workspace.config
    train_config, options = merged_train(config, method), config.methods.get(method, {})
    params = {"method": method, **{f"train.{k}": v for k, v in train_config.model_dump().items()},
              "data.validation": FIXED, "labels_per_class": workspace.plan.labels_per_class}
    run_id = tracker.start_child(parent_id, f"{name} ({FIXED})", params, {TAG_CELL: name, TAG_KIND: "fixed_defaults"})
    status = "FAILED"
    try:
        outcome = run_trial(workspace, method, options, train_config, progress=False)
        metrics = evaluate_as_trained(outcome.classifier, test, workspace.base.preprocessing, config.data.categories,
                                      outcome.settings)
        log_test_result(tracker, run_id, metrics)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(run_id, status)
    return {"selection": FIXED, "val_balanced_accuracy": math.nan, "val_standard_error": math.nan,
            "test_balanced_accuracy": metrics.balanced_accuracy,
            "mlflow_run_id": run_id}


def grid_study_name(prefix: str, shots: int, seed: int, method: str) -> str:
    return f"{prefix}-compare-k{shots}-s{seed}-{method}"


def check_grid_studies(config: StudyConfig, options: StudyLocation) -> None:
    """Re-running compare continues its small studies; if any of them was started under other
    settings, the whole comparison stops before anything trains or is written, naming them."""
    try:
        storage = open_storage(options.storage, create=False)
    except UserError:  # no storage yet: nothing to continue (one that cannot open is reported later)
        return
    existing = set(optuna.get_all_study_names(storage))
    clashes = []
    for shots, seed, method in itertools.product(config.compare.shots, config.compare.seeds, config.compare.methods):
        name = grid_study_name(options.study_name, shots, seed, method)
        if name not in existing:
            continue
        variant = grid_point(config, shots, seed, method)
        if not variant.data.selects:  # K = 1 with kfold runs fixed defaults: no study to continue
            continue
        recorded = optuna.load_study(study_name=name, storage=storage).user_attrs.get(identity.FINGERPRINT_ATTR)
        differ = identity.differences(recorded or {}, identity.fingerprint(variant))
        if recorded is not None and differ:
            clashes.append(f"{name} ({', '.join(differ)})")
    if clashes:
        raise UserError(
            f"compare {options.study_name!r} was run before with other settings: {len(clashes)} of its studies differ, "
            f"{'; '.join(clashes[:4])}{f' and {len(clashes) - 4} more' if len(clashes) > 4 else ''}; run it with "
            f"those settings to continue it, or name a new comparison with --study-name {options.study_name}-2")


def run_compare(config: StudyConfig, options: StudyLocation, out: Path) -> pd.DataFrame:
    compare = config.compare
    check_grid_studies(config, options)
    tracker = Tracker(options.tracking_uri, experiment=f"{options.study_name}-compare")
    base = load_base_model(config.model)
    test = load_test(config.data, base.preprocessing)  # only the final scoring reads it
    parent_id = tracker.start_parent(options.study_name, {TAG_KIND: "compare"})
    tracker.log_dict(parent_id, config.model_dump(mode="json"), "config.json")
    rows, status = [], "FINISHED"
    try:
        for shots in compare.shots:
            for seed in compare.seeds:
                workspace = open_workspace(grid_point(config, shots, seed), base)
                for method in compare.methods:
                    variant = grid_point(config, shots, seed, method)  # same data; the space draws `method`
                    name = grid_study_name(options.study_name, shots, seed, method)
                    point = {"method": method, "shots": shots, "seed": seed, "labels_per_class": workspace.plan.labels_per_class}
                    if not workspace.plan.selects:
                        rows.append({**point, **fixed_defaults(tracker, parent_id, workspace, method, test, name)})
                        continue
                    study = create_study(variant, replace(options, study_name=name))
                    if study.user_attrs.get(RUN_LABEL_ATTR) is None:  # its trials' run names lead with it
                        study.set_user_attr(RUN_LABEL_ATTR, f"K{shots} s{seed}")
                    # a method that trains nothing and draws nothing (zero-shot) needs one trial; Tip-Adapter
                    # trains nothing but searches its alpha and beta
                    budget = compare.trials_per_method if get_method(method).trains or searches(variant, method) else 1
                    done = sum(t.state.is_finished() for t in study.trials)
                    if done < budget:
                        optimize(study, workspace, tracker, parent_id, budget - done, None, variant)
                    best = select_best(study.get_trials(deepcopy=False))
                    run_id = best.user_attrs[RUN_ID_ATTR]
                    metrics, _ = evaluate_run(tracker, run_id, base, test, variant)
                    rows.append({**point, "selection": workspace.plan.scheme.name, "val_balanced_accuracy": best.value,
                                 "val_standard_error": best.user_attrs.get(STANDARD_ERROR_ATTR, math.nan),
                                 "test_balanced_accuracy": metrics.balanced_accuracy, "mlflow_run_id": run_id})
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if rows:
            for row in rows:  # one pick per small study (each study's own marking moved the tag off the others)
                if row["selection"] != FIXED:
                    tracker.set_tags(row["mlflow_run_id"], {TAG_BEST: "true"})
            _report(tracker, parent_id, pd.DataFrame(rows), out)
        tracker.end_run(parent_id, status)
    print_links(tracker_links(tracker, parent_id), "comparison run")
    return summary_table(pd.DataFrame(rows))


def _report(tracker: Tracker, parent_id: str, rows: pd.DataFrame, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    rows.to_csv(out / "compare_runs.csv", index=False)
    table.to_csv(out / "compare_summary.csv", index=False)
    figure = accuracy_plot(table)
    figure.savefig(out / "compare_accuracy.png", dpi=120)
    for name in ("compare_runs.csv", "compare_summary.csv"):
        tracker.log_file(parent_id, out / name)
    tracker.log_figure(parent_id, figure, "compare_accuracy.png")
    for record in table.itertuples():
        tracker.log_metrics(parent_id, {f"test_bacc_mean.{record.method}": record.test_bacc_mean}, step=int(record.shots))
