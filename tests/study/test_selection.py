"""Answers that hold: each method's own search space and defaults, tie-breaking between trials, and
a study that refuses to continue under other settings."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo_peft.app.cli import main
from hpo_peft.app.commands import prepare_study_config
from hpo_peft.study.search_space import sample_plan
from hpo_peft.tracking.selection import (
    FOLD_SCORES_ATTR,
    TRAINABLE_ATTR,
    VAL_LOSS_ATTR,
    corrected_score,
    select_best,
)
from hpo_peft.study.session import StudyLocation, best_and_corrected, load_study

COURSE_SGD = {"optimizer": "sgd", "learning_rate": 0.001, "max_epochs": 100, "patience": 20}


def plans(config_path, n=24):
    config = prepare_study_config(config_path, [])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((sample_plan(trial, config), dict(trial.params)))
        study.tell(trial, 0.0)
    return out


def test_black_box_adapters_keep_their_own_settings_unless_their_space_names_them(write_config):
    search = {"params": {"method": {"choices": ["clap", "lora"]}, "learning_rate": {"low": 0.01, "high": 0.1, "log": True},
                         "max_epochs": {"low": 10, "high": 30, "step": 10}}}
    config = write_config(method_train={"clap": COURSE_SGD}, search=search)
    drawn = plans(config)
    clap = [(p, params) for p, params in drawn if p.method == "clap"]
    lora = [(p, params) for p, params in drawn if p.method == "lora"]
    assert clap and lora
    for plan, params in clap:  # the course's SGD settings, and the shared space is not even drawn
        assert (plan.train.optimizer, plan.train.learning_rate, plan.train.max_epochs, plan.train.patience) == ("sgd", 0.001, 100, 20)
        assert set(params) == {"method"}
    for plan, params in lora:  # the shared space applies to methods without defaults of their own
        assert 0.01 <= plan.train.learning_rate <= 0.1 and plan.train.optimizer == "adam"
        assert plan.train.learning_rate == params["learning_rate"]

    search["methods"] = {"clap": {"learning_rate": {"low": 0.0001, "high": 0.0005, "log": True}}}
    config = write_config("own.yaml", method_train={"clap": COURSE_SGD}, search=search)
    for plan, params in plans(config):
        if plan.method == "clap":  # sampled on purpose, in its own range; the rest stays the course's
            assert plan.train.learning_rate == params["clap.learning_rate"] and 0.0001 <= plan.train.learning_rate <= 0.0005
            assert (plan.train.optimizer, plan.train.max_epochs) == ("sgd", 100)


def test_a_bad_bound_in_a_methods_own_space_names_its_key(write_config, capsys):
    config = write_config(search={"methods": {"clap": {"learning_rate": {"low": -1.0, "high": 0.1}}}})
    assert main(["study", "run", str(config), "--storage", "/nonexistent/x.journal"]) == 2
    assert "search.methods.clap.learning_rate: value -1.0 is invalid" in capsys.readouterr().err



@pytest.mark.parametrize("section, where", [
    ({"search": {"methods": {"clap": {"augment": {"choices": ["none", "dihedral"]}}}}}, "search.methods.clap.augment"),
    ({"method_train": {"zs_linear_probe": {"augment": "dihedral"}}}, "method_train.zs_linear_probe.augment"),
])
def test_augmenting_a_method_that_never_sees_an_image_is_refused(write_config, capsys, section, where):
    """Black-box adapters train on features computed once: an `augment` for them would be recorded
    with the trial and never applied."""
    config = write_config(**section)
    assert main(["study", "run", str(config), "--storage", "/nonexistent/x.journal"]) == 2
    error = capsys.readouterr().err
    assert f"{where}: " in error and "never sees an image to augment" in error


def completed(value, loss, trainable):
    return create_trial(state=TrialState.COMPLETE, value=value, params={"x": 0.5},
                        distributions={"x": FloatDistribution(0, 1)},
                        user_attrs={VAL_LOSS_ATTR: loss, TRAINABLE_ATTR: trainable})


def test_ties_are_broken_by_validation_loss_then_fewer_trainable_parameters():
    study = optuna.create_study(direction="maximize")
    for trial in (completed(75.0, 0.90, 100), completed(75.0, 0.60, 5000), completed(75.0, 0.60, 300), completed(70.0, 0.1, 1)):
        study.add_trial(trial)
    assert study.best_trial.number == 0  # Optuna alone: the first of the tied trials
    assert select_best(study.trials).number == 2  # lower loss (1, 2), then fewer parameters (2)


def with_folds(*scores):
    trial = completed(sum(scores) / len(scores), 1.0, 10)
    trial.user_attrs[FOLD_SCORES_ATTR] = list(scores)
    return trial


def test_the_best_of_many_kfold_trials_is_reported_less_what_choosing_it_adds():
    trials = [with_folds(80, 60, 60, 60), with_folds(50, 90, 50, 50), with_folds(60, 50, 70, 50)]
    best = select_best(trials)
    assert best.value == 65
    # per fold, the best trial there is 0, 30, 10 and 0 points above the chosen one: 10 on average
    assert corrected_score(trials, best) == pytest.approx(55.0)
    assert corrected_score([trials[0]], trials[0]) is None  # one trial: nothing to correct for
    holdout = [completed(70.0, 1.0, 10), completed(60.0, 1.0, 10)]
    assert corrected_score(holdout, holdout[0]) is None  # no folds, no estimate


def test_study_best_uses_the_tie_break(tmp_path):
    options = StudyLocation("ties", storage=str(tmp_path / "t.journal"))
    from hpo_peft.study.session import open_storage

    study = optuna.create_study(study_name="ties", storage=open_storage(options.storage), direction="maximize")
    study.add_trial(completed(80.0, 1.2, 10))
    study.add_trial(completed(80.0, 0.4, 10))
    assert best_and_corrected(options)[0].number == 1


def test_continuing_a_study_under_other_settings_is_refused_before_anything_is_written(write_config, tmp_path, capsys,
                                                                                         monkeypatch):
    search = {"n_trials": 1, "sampler": {"name": "random"}, "pruner": {"name": "none"},
              "params": {"method": "zs_linear_probe", "max_epochs": 2}}
    config = write_config(search=search)
    where = ["--study-name", "s", "--storage", str(tmp_path / "s.journal"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert main(["study", "run", str(config), *where]) == 0
    before = (tmp_path / "s.journal").read_bytes()
    with monkeypatch.context() as patched:  # ... and before the model loads
        from hpo_peft.fewshot import trial

        patched.setattr(trial, "load_base_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
        code = main(["study", "run", str(config), *where, "--set", "data.shots=8", "--set", "prompts.templates=[\"a [CLS]\"]"])
    err = capsys.readouterr().err
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("hpo-peft: error: ")]
    assert len(line) == 1
    assert "data.shots, prompts.templates differ" in line[0] and "(e.g. data.shots: 16 then, 8 now)" in line[0]
    assert "--study-name s-2" in line[0]
    assert (tmp_path / "s.journal").read_bytes() == before
    # what only says how long to run or how to sample may change
    assert main(["study", "run", str(config), *where, "--set", "search.sampler.name=tpe", "--n-trials", "1"]) == 0
    assert len(load_study(StudyLocation("s", storage=str(tmp_path / "s.journal"))).trials) == 2
    # a study whose trials were scored another way (e.g. before the score window) does not mix either
    from hpo_peft.study import identity

    monkeypatch.setattr(identity, "SCORE_RADIUS", 0)
    assert main(["study", "run", str(config), *where]) == 2
    assert "selection.score_radius differ" in capsys.readouterr().err


def test_a_changed_training_table_is_a_changed_study(write_config, demo_kit, tmp_path, capsys):
    import shutil

    import pandas as pd

    root = tmp_path / "data"
    shutil.copytree(demo_kit / "sicapv2", root)
    search = {"n_trials": 1, "params": {"method": "zero_shot"}}
    config = write_config(data={"root": str(root)}, search=search)
    where = ["--study-name", "t", "--storage", str(tmp_path / "t.journal"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert main(["study", "run", str(config), *where]) == 0
    table = root / "partition/Test/Train.xlsx"
    frame = pd.read_excel(table)
    frame.iloc[::-1].to_excel(table, index=False)  # same rows, another order: other shots for the same seed
    assert main(["study", "run", str(config), *where]) == 2
    assert "data.train_table.sha256" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["train.device=cpu", "search.n_trials=3"])
def test_machine_and_budget_keys_do_not_define_the_study(write_config, tmp_path, key):
    from hpo_peft.study.identity import differences, fingerprint

    config = write_config()
    assert differences(fingerprint(prepare_study_config(config, [])), fingerprint(prepare_study_config(config, [key]))) == []


def test_the_standard_error_beside_a_score_is_the_spread_of_balanced_accuracy_over_validation_draws():
    """`study best` and `evaluate` print the selection score with a binomial standard error: over
    many draws of n validation images per class from classes of known accuracy, the error computed
    from one draw's recalls says how far balanced accuracy spreads over draws, from one image per
    class (where every class is all right or all wrong, and the plain recall would say ± 0) to 16,
    and near-certain classes (95 % right) are never called certain."""
    import numpy as np

    from hpo_peft.fewshot.evaluate import balanced_accuracy_se

    rng = np.random.default_rng(0)
    for accuracy in ([0.9, 0.6, 0.75, 0.3], [0.95, 0.9, 0.85, 0.97], [0.5, 0.5, 0.5, 0.5]):
        for n in (1, 2, 4, 8, 16):
            hits = rng.binomial(n, accuracy, size=(20_000, 4))
            spread = (100 * (hits / n).mean(axis=1)).std()
            per_draw = np.array([balanced_accuracy_se(list(100 * h / n), [n] * 4) for h in hits[:2000]])
            assert per_draw.min() > 0, (accuracy, n)
            assert 0.85 * spread < np.sqrt(np.mean(np.square(per_draw))) < 1.7 * spread, (accuracy, n)
            if n >= 8 and accuracy[0] == 0.9:  # classes away from 0 and 100 %: close to exact
                assert np.sqrt(np.mean(np.square(per_draw))) == pytest.approx(spread, rel=0.05)
    # classes without images do not count; each class's recall shrunk by half an image right and half wrong
    assert balanced_accuracy_se([50.0, 100.0, 0.0], [4, 4, 0]) == pytest.approx(100 * ((0.25 + 0.09) / 4) ** 0.5 / 2)
    assert balanced_accuracy_se([50.0, 50.0], [4, 400]) < balanced_accuracy_se([50.0, 50.0], [4, 4])
