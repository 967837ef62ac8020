import pytest
import yaml

from hpo_peft.app.commands import prepare_config
from hpo_peft.core.config_file import apply_overrides, load_config
from hpo_peft.core.errors import UserError


def write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {"data": {"root": "somewhere"}}


def test_defaults_are_the_course_settings(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.model.name_or_path == "vinid/plip"
    assert config.data.categories == ["NC", "G3", "G4", "G5"]
    assert (config.data.shots, config.data.seed) == (16, 1)
    assert (config.train.optimizer, config.train.learning_rate, config.train.batch_size) == ("adam", 1e-3, 32)
    assert config.prompts.descriptions["G3"] == ["atrophic dense glands"]
    assert len(config.prompts.templates) == 4


@pytest.mark.parametrize(
    "raw, key",
    [
        ({**BASE, "trian": {}}, "trian: unknown key"),
        ({"data": {"root": "x", "shot": 4}}, "data.shot: unknown key"),
        ({"data": {"root": "x", "shots": "many"}}, "data.shots"),
        ({"data": {"root": "x", "shots": 0}}, "data.shots"),
        ({**BASE, "train": {"learning_rate": -1}}, "train.learning_rate"),
        ({**BASE, "train": {"optimizer": "adamm"}}, "train.optimizer"),
        ({}, "data: Field required"),
        ({"data": {"root": "x", "categories": ["NC", "G3"]}}, "prompts.descriptions"),
        ({"data": {"root": "x", "validation": "kfold", "refit": True}}, "data: refit: kfold always refits"),
        ({**BASE, "protocol": "course", "method_train": {"lora": {"augment": "dihedral"}}},
         "method_train.lora.augment: the course protocol trains on the images as they are"),
        ({**BASE, "train": {"augment": "rotate"}}, "train.augment"),
        ({**BASE, "compare": {"seeds": [1, 2, 2]}}, "compare.seeds: 2 is listed more than once in [1, 2, 2]"),
        ({**BASE, "compare": {"shots": [4, 1, 4]}}, "compare.shots: 4 is listed more than once"),
        ({**BASE, "compare": {"methods": ["clap", "clap"]}}, "compare.methods: 'clap' is listed more than once"),
        ({**BASE, "search": {"ensemble": 0}}, "search.ensemble: Input should be greater than or equal to 1"),
        ({**BASE, "search": {"ensemble": "top"}}, "search.ensemble: Input should be a valid integer"),
    ],
)
def test_bad_config_names_the_key(tmp_path, raw, key):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, raw))
    assert key in str(err.value)
    assert str(tmp_path / "c.yaml") in str(err.value)


def test_unknown_method_and_method_option(tmp_path):
    with pytest.raises(UserError, match=r"method.name: unknown method 'loar'"):
        prepare_config(write(tmp_path, {**BASE, "method": {"name": "loar"}}), [])
    with pytest.raises(UserError, match=r"methods.lora.rnak: unknown key"):
        prepare_config(write(tmp_path, {**BASE, "methods": {"lora": {"rnak": 4}}}), [])
    with pytest.raises(UserError, match=r"methods.lora.rank"):
        prepare_config(write(tmp_path, {**BASE, "methods": {"lora": {"rank": 0}}}), [])


def test_overrides_are_typed_and_checked(tmp_path):
    config = load_config(write(tmp_path, BASE), ["train.learning_rate=0.01", "data.shots=4"])
    assert config.train.learning_rate == 0.01 and config.data.shots == 4
    with pytest.raises(UserError, match="not of the form"):
        apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(UserError, match="train.max_epoch: unknown key"):
        load_config(write(tmp_path, BASE), ["train.max_epoch=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", ["demo.yaml", "sicapv2_plip.yaml"])
def test_shipped_study_configs_are_valid(name, monkeypatch):
    from pathlib import Path

    from hpo_peft import demo_kit

    monkeypatch.setattr(demo_kit, "build_demo_kit", lambda out, **kw: out)  # validation only
    config = prepare_config(Path(__file__).resolve().parents[2] / "studies" / name, [], study=True)
    assert config.data.shots == 16 and config.data.seed == 1
    assert "lora" in config.search.params["method"].choices
    if name == "sicapv2_plip.yaml":
        assert config.model.name_or_path == "vinid/plip"
        assert config.train_for("clap").optimizer == "sgd" and config.train_for("lora").optimizer == "adam"


ENQUEUE_SPACE = {"params": {"method": {"choices": ["bias", "lora"]}, "learning_rate": {"low": 0.0001, "high": 0.01, "log": True}},
                 "methods": {"lora": {"rank": {"choices": [1, 2, 4]}}}}


@pytest.mark.parametrize("entry, message", [
    ({"method": "lora", "lora.rank": 3}, "search.enqueue[0]: lora.rank = 3 is not among its choices [1, 2, 4]"),
    ({"learning_rate": 0.5}, "search.enqueue[0]: learning_rate = 0.5 is outside its range [0.0001, 0.01]"),
    ({"method": "bias", "lora.rank": 4}, "search.enqueue[0]: 'lora.rank' is not a parameter the search space draws in a bias trial"),
    ({"patience": 5}, "search.enqueue[0]: 'patience' is not a parameter the search space draws"),
])
def test_an_enqueued_trial_outside_the_search_space_is_refused_naming_it(tmp_path, entry, message):
    with pytest.raises(UserError) as err:
        prepare_config(write(tmp_path, {**BASE, "search": {**ENQUEUE_SPACE, "enqueue": [entry]}}), [], study=True)
    assert message in str(err.value)


def test_a_new_study_runs_its_enqueued_trials_first_and_once(tmp_path):
    import optuna

    from hpo_peft.study.search_space import sample_plan
    from hpo_peft.study.session import StudyLocation, create_study

    entry = {"method": "lora", "learning_rate": 0.0005, "lora.rank": 2}
    config = load_config(write(tmp_path, {**BASE, "search": {**ENQUEUE_SPACE, "enqueue": [entry],
                                                             "sampler": {"name": "random", "seed": 3}}}))
    options = StudyLocation("q", storage=str(tmp_path / "optuna.journal"))
    study = create_study(config, options)
    create_study(config, options)  # a second session, or a second worker: not enqueued again
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.WAITING]
    plans = [sample_plan(study.ask(), config) for _ in range(3)]
    assert (plans[0].method, plans[0].train.learning_rate, plans[0].method_options["rank"]) == ("lora", 0.0005, 2)
    assert all(p.train.learning_rate != 0.0005 for p in plans[1:])  # then the sampler's own draws
