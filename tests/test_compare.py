"""`hpo-peft compare` on a small grid of the demo kit."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from hpo_peft.cli import main


def test_compare_writes_table_plot_and_one_mlflow_parent(write_config, tmp_path, capsys):
    config = write_config(train={"max_epochs": 4, "patience": None})
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    argv = ["compare", str(config), "--shots", "2", "4", "--seeds", "1", "2", "--methods", "zero_shot", "clap", "lora",
            "--trials-per-method", "2", "--study-name", "cmp", "--storage", str(tmp_path / "o.journal"),
            "--tracking-uri", store, "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "out" / "compare_summary.csv")
    runs = pd.read_csv(tmp_path / "out" / "compare_runs.csv")
    assert len(runs) == 2 * 2 * 3
    assert set(zip(summary.method, summary.shots)) == {(m, k) for m in ("zero_shot", "clap", "lora") for k in (2, 4)}
    assert (summary.seeds == 2).all()
    for row in summary.itertuples():
        part = runs[(runs.method == row.method) & (runs.shots == row.shots)]
        assert abs(row.test_bacc_mean - part.test_balanced_accuracy.mean()) < 1e-9
        assert abs(row.test_bacc_std - part.test_balanced_accuracy.std()) < 1e-9
        assert abs(row.val_se_mean - part.val_standard_error.mean()) < 1e-9
    zero_shot = runs[runs.method == "zero_shot"]
    assert zero_shot.test_balanced_accuracy.nunique() == 1  # no training: the same model at every grid point
    assert "test_bacc_mean" in printed and "clap" in printed
    assert (tmp_path / "out" / "compare_accuracy.png").stat().st_size > 10_000

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cmp-compare")
    runs_logged = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs_logged if r.data.tags.get("hpo_peft.run_kind") == "compare"]
    assert len(parents) == 1
    files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"compare_summary.csv", "compare_runs.csv", "compare_accuracy.png"} <= files
    children = [r for r in runs_logged if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 * 2 * (1 + 2 + 2)  # zero-shot needs a single trial
    for run_id, error in zip(runs.mlflow_run_id, runs.val_standard_error):
        logged = client.get_run(run_id).data.metrics
        assert "test_balanced_accuracy" in logged
        assert error == pytest.approx(logged["objective_standard_error"], rel=1e-5)  # the pick's score's own

    # a second call continues the small studies: no new trials, the same table
    assert main(argv) == 0
    capsys.readouterr()
    again = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len([r for r in again if r.data.tags.get("hpo_peft.run_kind") == "trial"]) == len(children)
    assert pd.read_csv(tmp_path / "out" / "compare_summary.csv").equals(summary)
