"""How a study spends and starts: a compute budget (`--budget 300e | 20m`, search.budget), the
method race (`search.start: race`), the portfolio (`search.start: portfolio`), and Hyperband on epochs. Cheap trials: a head on cached features."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import demo_config_dict
from mlflow import MlflowClient

from hpo_peft.study import compute_budget
from hpo_peft.study import portfolio
from hpo_peft.study import search_space
from hpo_peft.app.cli import main
from hpo_peft.app.commands import prepare_study_config
from hpo_peft.core.config import Choices, Range, StudyConfig
from hpo_peft.core.config_file import load_config
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.study.samplers import make_pruner
from hpo_peft.study.search_space import clip, portfolio_entries, race_entries, searches
from hpo_peft.study.session import StudyLocation, create_study, load_study, run_study
from hpo_peft.fewshot.train import EpochMetrics
from hpo_peft.fewshot.validation import SCHEMES

HEAD = {  # zs_linear_probe: a head on cached features, a second a trial; every trial trains 2 epochs
    "n_trials": 4,
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "params": {"method": "zs_linear_probe", "learning_rate": {"low": 0.0001, "high": 0.1, "log": True},
               "max_epochs": 2, "patience": None},
    "heartbeat_interval": 1.0,
}


@pytest.fixture
def where(tmp_path):
    return StudyLocation("spend", storage=str(tmp_path / "optuna.journal"),
                         tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))


def options(where: StudyLocation) -> list[str]:
    return ["--study-name", where.study_name, "--storage", where.storage, "--tracking-uri", where.tracking_uri]


def metric(where: StudyLocation, trial: optuna.trial.FrozenTrial, name: str) -> float:
    return MlflowClient(where.tracking_uri).get_run(trial.user_attrs[RUN_ID_ATTR]).data.metrics[name]


# the compute budget ---------------------------------------------------------------------------------
def test_epochs_are_counted_per_fold_and_refit_not_for_the_folds_mean():
    class Outcome:
        refit, selected_epoch = True, 3

    kfold = compute_budget.TrialSpending("parent", SCHEMES["kfold"])
    for epoch in (1, 2, 3, 4):
        for fold in (0, 1, 2):
            kfold.saw(EpochMetrics(epoch, 1.0, 1.0, 50.0, fold=fold))
        kfold.saw(EpochMetrics(epoch, 1.0, 1.0, 50.0))  # the folds' mean trained nothing
    kfold.refit(Outcome())
    assert kfold.epochs == 4 * 3 + 3
    holdout = compute_budget.TrialSpending("parent", SCHEMES["holdout"])
    for epoch in (1, 2):
        holdout.saw(EpochMetrics(epoch, 1.0, 1.0, 50.0))
    assert holdout.epochs == 2


def test_a_time_budget_counts_the_trials_training_seconds():
    trials = [optuna.trial.create_trial(value=1.0, user_attrs={"train_seconds": s, "epochs_trained": 2}) for s in (30, 60)]
    minutes = compute_budget.parse("1m")
    assert minutes.spent(trials) == 1.5
    assert minutes.line(trials) == "budget: 1.5 of 1 minutes spent over 2 trials"
    assert compute_budget.parse("90s").line(trials[:1]) == "budget: 30.0 of 90 seconds spent over 1 trial"
    assert compute_budget.study_line(trials) == "the study so far: 4 epochs and 1.5 minutes of training over 2 trials"


def test_kfold_trials_record_every_fold_and_the_refit(write_config, where):
    config = write_config(search={**HEAD, "n_trials": 1}, data={"validation": "kfold", "folds": 2})
    trial = run_study(prepare_study_config(config, []), where, n_trials=1, timeout=None).trials[0]
    refit = int(metric(where, trial, "selected_epoch"))
    assert trial.user_attrs["epochs_trained"] == 2 * 2 + refit and 1 <= refit <= 2
    assert metric(where, trial, "epochs_trained") == 2 * 2 + refit
    assert trial.user_attrs["train_seconds"] > 0


def test_a_pruned_trial_counts_the_epochs_it_ran(write_config, where):
    config = write_config(search={**HEAD, "n_trials": 1, "params": {**HEAD["params"], "max_epochs": 5},
                                  "pruner": {"name": "threshold", "lower": 101.0}})
    trial = run_study(prepare_study_config(config, []), where, n_trials=1, timeout=None).trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["epochs_trained"] == 1 and metric(where, trial, "epochs_trained") == 1


@pytest.mark.slow
def test_a_session_stops_once_its_budget_is_spent_and_says_so(write_config, where, capsys):
    config = write_config(search=HEAD)  # n_trials 4: a budget lifts it
    assert main(["study", "run", str(config), "--budget", "3e", *options(where)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "budget: 4 of 3 epochs spent over 2 trials"  # the second trial spent it, and finished
    assert [t.user_attrs["epochs_trained"] for t in load_study(where).trials] == [2, 2]
    # resumed, with the budget in the config: its own session's spending, and the study's
    config = write_config(search={**HEAD, "budget": "2e"})
    assert main(["study", "run", str(config), *options(where)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("the study so far: 6 epochs and ") and out[-2].endswith(" over 3 trials")
    assert out[-1] == "budget: 2 of 2 epochs spent over 1 trial"
    # --n-trials still caps a session
    assert main(["study", "run", str(config), "--budget", "100e", "--n-trials", "1", *options(where)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "budget: 2 of 100 epochs spent over 1 trial"


@pytest.mark.parametrize("value", ["300", "2.5e", "0m", "ten minutes"])
def test_a_malformed_budget_is_one_line_naming_the_flag(write_config, where, capsys, value):
    assert main(["study", "run", str(write_config(search=HEAD)), "--budget", value, *options(where)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpo-peft: error: --budget: ") and repr(value) in err[0], err
    assert not Path(where.storage).exists()


def test_a_worker_refuses_a_compute_budget(write_config, where, capsys):
    assert main(["study", "worker", str(write_config(search={**HEAD, "budget": "20m"})), *options(where)]) == 2
    assert "search.budget: `study worker` counts trials" in capsys.readouterr().err


# the method race ------------------------------------------------------------------------------------
def test_the_race_of_the_demo_space_starts_every_method_at_its_prior(demo_kit):
    raw = demo_config_dict(demo_kit)
    raw["search"]["start"] = "race"
    config = StudyConfig.model_validate(raw)
    black_box = {"learning_rate": 0.003, "max_epochs": 30, "patience": 8}  # the demo's train: no method_train for them
    peft = {"learning_rate": 0.001, "max_epochs": 20, "patience": 8}  # the course's Adam 1e-3, 20 epochs
    assert race_entries(config) == [  # lora: the enqueued entry already starts it
        {"method": "zs_linear_probe", **black_box}, {"method": "clip_adapter", **black_box},
        {"method": "clap", **black_box}, {"method": "affine_ln", **peft}, {"method": "bias", **peft},
        {"method": "full", **peft},
    ]
    raw["search"]["enqueue"] = []
    assert race_entries(StudyConfig.model_validate(raw))[-2] == {
        "method": "lora", **peft, "lora.rank": 4, "lora.b_init": "zeros"}


def test_priors_outside_the_space_are_clipped_into_it(demo_kit):
    assert clip(Range(low=0.002, high=0.01, log=True), 0.001) == 0.002
    assert clip(Range(low=10, high=40, step=10), 55) == 40 and clip(Range(low=10, high=40, step=10), 24) == 20
    assert clip(Range(low=1, high=8), 20.0) == 8 and isinstance(clip(Range(low=1, high=8), 2.0), int)
    assert clip(Choices(choices=[8, 16, 64]), 4) == 8 and clip(Choices(choices=[8, 16, 64]), 50) == 64
    assert clip(Choices(choices=["random"]), "zeros") == "random" and clip(Choices(choices=[3, 5]), None) == 3
    search = {"start": "race", "params": {"method": {"choices": ["bias", "lora"]}, "learning_rate": {"low": 0.01, "high": 0.1},
                                          "max_epochs": {"choices": [5, 50]}, "patience": None},
              "methods": {"lora": {"rank": {"choices": [8, 16]}, "b_init": {"choices": ["random"]}}}}
    config = StudyConfig.model_validate(demo_config_dict(demo_kit, search))
    assert race_entries(config) == [
        {"method": "bias", "learning_rate": 0.01, "max_epochs": 5},
        {"method": "lora", "learning_rate": 0.01, "max_epochs": 5, "lora.rank": 8, "lora.b_init": "random"}]


def test_a_new_study_races_after_its_enqueued_trials_and_a_resumed_one_does_not(demo_kit, where):
    raw = demo_config_dict(demo_kit)
    raw["search"]["start"] = "race"
    config = StudyConfig.model_validate(raw)
    study = create_study(config, where)
    waiting = [t.system_attrs["fixed_params"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert waiting == [*config.search.enqueue, *race_entries(config)] and len(waiting) == 7
    create_study(config, where)  # a second session (or worker): nothing enqueued again
    assert len(load_study(where).trials) == 7
    raw["search"].pop("start")  # the default: no race
    assert len(create_study(StudyConfig.model_validate(raw), StudyLocation("plain", where.storage)).trials) == 1


def test_a_method_that_trains_nothing_searches_only_what_its_own_space_draws(demo_kit):
    """compare gives such a method (Tip-Adapter's alpha and beta) its trials, zero-shot one."""
    config = StudyConfig.model_validate(demo_config_dict(demo_kit))
    assert searches(config, "lora") and not searches(config, "zero_shot") and not searches(config, "tip_adapter")
    config.search.methods["tip_adapter"] = {"alpha": Range(low=0.0, high=10.0), "beta": 1.0}
    assert searches(config, "tip_adapter")
    config.search.methods["tip_adapter"] = {"alpha": 2.0}  # fixed: nothing drawn
    assert not searches(config, "tip_adapter")


# the portfolio --------------------------------------------------------------------------------------
def test_the_portfolio_is_taken_into_the_study_space(demo_kit, monkeypatch):
    monkeypatch.setattr(search_space, "PORTFOLIO", [
        {"method": "lora", "learning_rate": 0.05, "max_epochs": 20, "rank": 16, "b_init": "random"},
        {"method": "clap", "learning_rate": 0.002, "max_epochs": 35},
        {"method": "full", "learning_rate": 0.001, "max_epochs": 10},
        {"method": "lora", "learning_rate": 0.02, "max_epochs": 20, "rank": 20, "b_init": "zeros"}])
    search = {"start": "portfolio", "params": {"method": {"choices": ["clap", "lora"]}, "learning_rate": {"low": 0.001, "high": 0.01},
                                               "max_epochs": {"low": 10, "high": 30, "step": 10}, "patience": None},
              "methods": {"lora": {"rank": {"choices": [8, 16]}}}}
    config = StudyConfig.model_validate(demo_config_dict(demo_kit, search))
    # full is not drawn: left out; values clipped into the space; the fourth entry becomes the first: once;
    # lora.b_init is fixed by the space (not drawn), so no parameter names it
    assert portfolio_entries(config) == [
        {"method": "lora", "learning_rate": 0.01, "max_epochs": 20, "lora.rank": 16},
        {"method": "clap", "learning_rate": 0.002, "max_epochs": 30}]


def test_a_new_study_enqueues_the_shipped_portfolio_after_its_own_entries(demo_kit, where):
    raw = demo_config_dict(demo_kit)
    raw["search"]["start"] = "portfolio"
    config = StudyConfig.model_validate(raw)
    entries = portfolio_entries(config)
    # the shipped portfolio was learned on demo.yaml's space: every entry is in it as it stands
    assert len(entries) == len(portfolio.PORTFOLIO) >= 4
    for entry, values in zip(entries, portfolio.PORTFOLIO):
        assert {k.split(".")[-1]: v for k, v in entry.items() if k.split(".")[-1] in values} == values
    study = create_study(config, where)
    waiting = [t.system_attrs["fixed_params"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert waiting == [*config.search.enqueue, *entries]
    create_study(config, where)  # a second session: nothing enqueued again
    assert len(load_study(where).trials) == len(waiting)


SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "studies").glob("*.yaml") if p.name != "course_notebook.yaml")


def benchmark_result() -> dict:
    """The search benchmark's dated result that portfolio.py names (its JSON beside the report)."""
    import json

    return json.loads((Path(__file__).resolve().parents[2] / portfolio.SOURCE).with_suffix(".json").read_text())


def test_the_shipped_portfolio_is_the_one_the_benchmark_learned():
    assert portfolio.PORTFOLIO == benchmark_result()["portfolio_all_kits"]


def pruning_result() -> dict:
    """benchmarks/search_pruning.py: the pruner swept after the chosen start and sampler, scored by the
    study's model (its top trials as one)."""
    import json

    return json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/search-pruning-2026-12-07.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_study_starts_samples_and_prunes_as_the_benchmark_chose(name):
    import yaml

    chosen = benchmark_result()["chosen_settings"]
    search = yaml.safe_load((Path(__file__).resolve().parents[2] / "studies" / name).read_text())["search"]
    assert search.get("start", "sampler") == chosen["start"]
    assert search["sampler"] == {k: v for k, v in chosen["sampler"].items() if k != "seed"}
    assert search["pruner"] == pruning_result()["chosen_pruner"]


def test_the_chosen_pruner_meets_every_goal_it_was_chosen_by():
    """The sweep's pick met the issue's four goals on every kit and sampler-seed set, with more goals
    than the pruner shipped before it, and it is what make_pruner builds from demo.yaml."""
    from optuna.pruners import PercentilePruner

    result = pruning_result()
    goals = result["goals"][result["chosen"]]
    assert all(all(g.values()) for sets in goals.values() for g in sets)
    ranks = result["ranks"]
    assert ranks[result["chosen"]] == min(ranks.values())
    assert ranks[result["chosen"]][0] < ranks["median, warm-up 4"][0]  # more goals than the former pruner
    # chosen on three kits, measured on the fourth: every kit's goals met all the same
    assert all(row["goals"] == 12 for row in result["leave_one_kit_out"].values())
    config = load_config(Path(__file__).resolve().parents[2] / "studies" / "demo.yaml")
    pruner = make_pruner(config)
    assert isinstance(pruner, PercentilePruner)
    assert (pruner._percentile, pruner._n_startup_trials, pruner._n_warmup_steps) == (40.0, 2, 2)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_study_takes_the_ensemble_size_the_benchmark_chose(name):
    """benchmarks/search_ensemble.py measured the top trials as one model under the search the shipped
    studies set (start, sampler and pruner, read from demo.yaml) and chose a size by its rule; the
    pruning sweep checked the size again under the pruner it chose."""
    import json

    import yaml

    root = Path(__file__).resolve().parents[2]
    result = json.loads((root / "benchmarks/results/search-ensemble-2026-12-08-shipped.json").read_text())
    search = yaml.safe_load((root / "studies" / name).read_text())["search"]
    assert result["chosen_size"] > 1  # it measured better than the best trial alone
    assert search["ensemble"] == result["chosen_size"] == pruning_result()["chosen_size"]
    assert result["settings"] == {"start": search["start"], "sampler": search["sampler"], "pruner": search["pruner"]}


# Hyperband on epochs --------------------------------------------------------------------------------
def test_hyperband_takes_its_resources_from_the_epochs_a_trial_can_train(demo_kit):
    config = StudyConfig.model_validate(demo_config_dict(demo_kit, {"pruner": {"name": "hyperband"}}))
    pruner = make_pruner(config)
    assert (pruner._min_resource, pruner._max_resource) == (1, 30)  # the demo's max_epochs: 10-30
    config.search.methods["lora"]["max_epochs"] = Range(low=5, high=60)  # a method's own space counts
    config.search.pruner = {"name": "hyperband", "min_resource": 2, "reduction_factor": 2}
    assert (make_pruner(config)._min_resource, make_pruner(config)._max_resource) == (2, 60)
    config.search.pruner = {"name": "hyperband", "max_resource": 12}
    assert make_pruner(config)._max_resource == 12


@pytest.mark.slow
def test_a_hyperband_study_prunes_on_epochs_and_records_it(write_config, where):
    search = {**HEAD, "n_trials": 6, "pruner": {"name": "hyperband", "reduction_factor": 2},
              "params": {**HEAD["params"], "learning_rate": {"low": 0.00001, "high": 1.0, "log": True}, "max_epochs": 4}}
    study = run_study(prepare_study_config(write_config(search=search), []), where, n_trials=6, timeout=None)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for trial in pruned:
        assert metric(where, trial, "pruned_at_epoch") == trial.last_step == trial.user_attrs["epochs_trained"]
