"""`hpo-peft compare`: black-box adapters vs PEFT across shot counts, fairly.

For every shots x seed, each method gets its own small study on that seed's validation shots
(`compare.trials_per_method`); the selected adapter is then rebuilt from MLflow and scored on
the test split. Reported per method and shot count: mean and std of test balanced accuracy over
seeds, as a CSV table and a plot, on one MLflow parent run. Re-running continues the small studies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from hpo_peft.config import Choices, StudyConfig
from hpo_peft.data import load_test
from hpo_peft.methods import get_method
from hpo_peft.model import load_base_model
from hpo_peft.study import (
    RUN_ID_ATTR,
    StudyOptions,
    create_study,
    evaluate_run,
    optimize,
)
from hpo_peft.selection import select_best
from hpo_peft.tracking import Tracker
from hpo_peft.trial import open_workspace


def config_for(config: StudyConfig, shots: int, seed: int, method: str) -> StudyConfig:
    variant = config.model_copy(deep=True)
    variant.data.shots, variant.data.seed = shots, seed
    variant.search.params["method"] = Choices(choices=[method])
    return variant


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    table = rows.groupby(["method", "shots"])["test_balanced_accuracy"].agg(["mean", "std", "count"]).reset_index()
    return table.rename(columns={"mean": "test_bacc_mean", "std": "test_bacc_std", "count": "seeds"})


def accuracy_plot(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, part in table.groupby("method"):
        ax.errorbar(part["shots"], part["test_bacc_mean"], yerr=part["test_bacc_std"].fillna(0), marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["shots"].unique()), [str(k) for k in sorted(table["shots"].unique())])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test balanced accuracy (%)")
    ax.set_title("mean +- std over sampling seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def run_compare(config: StudyConfig, options: StudyOptions, out: Path) -> pd.DataFrame:
    compare = config.compare
    tracker = Tracker(options.tracking_uri, experiment=f"{options.study_name}-compare")
    base = load_base_model(config.model)
    test = load_test(config.data, base.preprocessing)  # only the final scoring reads it
    parent_id = tracker.start_parent(options.study_name, {"hpo_peft.run_kind": "compare"})
    tracker.log_dict(parent_id, config.model_dump(mode="json"), "config.json")
    rows, status = [], "FINISHED"
    try:
        for shots in compare.shots:
            for seed in compare.seeds:
                workspace = open_workspace(config_for(config, shots, seed, compare.methods[0]), base)
                for method in compare.methods:
                    variant = config_for(config, shots, seed, method)
                    workspace.config = variant
                    name = f"{options.study_name}-compare-k{shots}-s{seed}-{method}"
                    study = create_study(variant, replace(options, study_name=name))
                    budget = compare.trials_per_method if get_method(method).trains else 1
                    done = sum(t.state.is_finished() for t in study.trials)
                    if done < budget:
                        optimize(study, workspace, tracker, parent_id, budget - done, None)
                    best = select_best(study.get_trials(deepcopy=False))
                    metrics, _ = evaluate_run(tracker, best.user_attrs[RUN_ID_ATTR], base, test, variant)
                    rows.append({"method": method, "shots": shots, "seed": seed, "val_balanced_accuracy": best.value,
                                 "test_balanced_accuracy": metrics.balanced_accuracy, "mlflow_run_id": best.user_attrs[RUN_ID_ATTR]})
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if rows:
            _report(tracker, parent_id, pd.DataFrame(rows), out)
        tracker.end_run(parent_id, status)
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
