"""`hpo-peft compare` on a small grid of the demo kit."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from hpo_peft.app.cli import main


@pytest.mark.slow
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


def test_a_compare_rerun_under_other_settings_stops_before_anything_trains(write_config, tmp_path, capsys, monkeypatch):
    """Its small studies were started with holdout validation; the re-run asks for kfold and a new
    shot count first in the grid: without the check up front, K = 2 would train before K = 4's
    study refused. K = 1 with kfold runs fixed defaults, so its old holdout studies do not clash."""
    config = write_config(search={"params": {"max_epochs": 2}})
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    where = ["--study-name", "cmp", "--storage", str(tmp_path / "o.journal"), "--tracking-uri", store,
             "--out", str(tmp_path / "out"), "--seeds", "1", "--methods", "zero_shot", "bias", "--trials-per-method", "1"]
    assert main(["compare", str(config), "--shots", "1", "4", *where]) == 0
    journal = (tmp_path / "o.journal").read_bytes()
    client = MlflowClient(store)
    runs = len(client.search_runs([client.get_experiment_by_name("cmp-compare").experiment_id]))
    capsys.readouterr()

    from hpo_peft.app import compare

    monkeypatch.setattr(compare, "load_base_model", lambda *a: pytest.fail("the check comes before any model loads"))
    assert main(["compare", str(config), "--shots", "1", "2", "4", *where, "--set", "data.validation=kfold"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("hpo-peft: error: compare 'cmp' was run before with other settings: 2 of its studies differ")
    assert "cmp-compare-k4-s1-zero_shot (data.val_shots, data.validation)" in error and "cmp-compare-k4-s1-bias" in error
    assert error.endswith("--study-name cmp-2") and "-k1-" not in error
    assert (tmp_path / "o.journal").read_bytes() == journal  # no study created, no trial
    assert len(client.search_runs([client.get_experiment_by_name("cmp-compare").experiment_id])) == runs


@pytest.mark.parametrize("flags, key, value", [
    (["--seeds", "1", "2", "2"], "compare.seeds", "2"),
    (["--shots", "2", "2", "--seeds", "1", "1"], "compare.shots", "2"),
    (["--methods", "lora", "clap", "lora"], "compare.methods", "'lora'"),
], ids=["seeds", "shots-and-seeds", "methods"])
def test_a_value_listed_twice_is_refused_before_anything_is_written(write_config, tmp_path, capsys, refuse_model_loading,
                                                                    flags, key, value):
    """A repeated seed ran its grid points twice and counted them twice ("seeds 3", std 0.00)."""
    config = write_config()
    argv = ["compare", str(config), *flags, "--study-name", "cmp", "--storage", str(tmp_path / "o.journal"),
            "--tracking-uri", "sqlite:///" + str(tmp_path / "mlflow.db"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hpo-peft: error: {config}: invalid config: {key}: "), lines
    assert f"{key}: {value} is listed more than once" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]  # no journal, no MLflow store, no results


def test_the_accuracy_plot_claims_no_spread_from_one_seed():
    import math

    import matplotlib.pyplot as plt

    from hpo_peft.app.compare import accuracy_plot

    table = pd.DataFrame({"method": ["lora", "lora"], "shots": [2, 4], "test_bacc_mean": [50.0, 60.0],
                          "test_bacc_std": [math.nan, math.nan], "seeds": [1, 1]})
    figure = accuracy_plot(table)
    assert figure.axes[0].get_title() == "one sampling seed" and not figure.axes[0].containers  # no error bars
    plt.close(figure)
    figure = accuracy_plot(table.assign(seeds=2, test_bacc_std=1.0))
    assert "± std" in figure.axes[0].get_title() and figure.axes[0].containers
    plt.close(figure)


def test_compare_names_runs_by_grid_point_marks_each_studys_pick_and_links_its_parent(write_config, tmp_path, capsys):
    import re

    config = write_config(search={"params": {"max_epochs": 2}})
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    assert main(["compare", str(config), "--shots", "2", "--seeds", "1", "--methods", "zero_shot", "bias",
                 "--trials-per-method", "2", "--study-name", "cmp", "--storage", str(tmp_path / "o.journal"),
                 "--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("cmp-compare").experiment_id
    runs = client.search_runs([experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "compare"]
    assert (f"comparison run: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
            "?workflowType=machine_learning") in printed
    trials = [r for r in runs if r.data.tags.get("hpo_peft.run_kind") == "trial"]
    assert len(trials) == 3 and all(re.match(r"^(★ )?K2 s1 t\d{3} (zero_shot|bias)", r.info.run_name) for r in trials)
    picks = [r for r in runs if r.data.tags.get("hpo_peft.best") == "true"]
    assert sorted(r.data.tags["hpo_peft.study.session"] for r in picks) == ["cmp-compare-k2-s1-bias", "cmp-compare-k2-s1-zero_shot"]
    assert all(r.info.run_name.startswith("★ K2 s1 ") for r in picks)
