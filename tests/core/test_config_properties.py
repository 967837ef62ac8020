"""Property-based: every bad config fails with one clear UserError naming the key or file, before
any model is loaded; good configs pass."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_peft.app.commands import prepare_study_config
from hpo_peft.core.errors import UserError
from hpo_peft.study.preflight import check_study_data

SEARCH = {
    "params": {"method": {"choices": ["bias", "lora"]}, "learning_rate": {"low": 0.001, "high": 0.01, "log": True}},
    "methods": {"lora": {"rank": {"choices": [1, 2, 4]}}},
}

# (path in the config, a bad value, what the message must name)
BAD_VALUES = [
    (("data", "shots"), 0, "data.shots"),
    (("data", "shots"), "sixteen", "data.shots"),
    (("data", "shots"), 1000, "usable rows"),
    (("data", "val_shots"), -3, "data.val_shots"),
    (("data", "categories"), ["NC", "G3", "G4", "G9"], "prompts.descriptions"),
    (("data", "root"), "/nonexistent/sicap", "dataset root not found"),
    (("data", "train_table"), "partition/Test/Nope.xlsx", "Nope.xlsx: partition table not found"),
    (("data", "image_column"), "image", "missing column(s) ['image']"),
    (("train", "learning_rate"), 0, "train.learning_rate"),
    (("train", "learning_rate"), -0.1, "train.learning_rate"),
    (("train", "batch_size"), 0, "train.batch_size"),
    (("train", "optimizer"), "adamm", "train.optimizer"),
    (("train", "max_epochs"), 2.5, "train.max_epochs"),
    (("method", "name"), "lorra", "unknown method 'lorra'"),
    (("methods", "lora", "rank"), 0, "methods.lora.rank"),
    (("methods", "lora", "b_init"), "ones", "methods.lora.b_init"),
    (("methods", "bias", "rank"), 4, "methods.bias.rank: unknown key"),
    (("methods", "lorra"), {}, "unknown method 'lorra'"),
    (("search", "sampler"), {"name": "tpee"}, "search.sampler.name: unknown sampler 'tpee'"),
    (("search", "sampler"), {"name": "tpe", "n_startup": 3}, "search.sampler"),
    (("search", "pruner"), {"name": "medain"}, "search.pruner.name: unknown pruner 'medain'"),
    (("search", "params", "method"), {"choices": ["bias", "lorra"]}, "unknown method 'lorra'"),
    (("search", "params", "learning_rate"), {"low": -1, "high": 0.1}, "search.params.learning_rate"),
    (("search", "params", "learning_rate"), {"low": 0.1, "high": 0.01}, "search.params.learning_rate"),
    (("search", "params", "learnin_rate"), 0.01, "unknown search parameter 'learnin_rate'"),
    (("search", "methods", "lora", "rank"), {"choices": [0, 4]}, "search.methods.lora.rank"),
    (("search", "methods", "lora", "rank"), {"low": 0, "high": 8}, "search.methods.lora.rank"),
    (("search", "n_trials"), 0, "search.n_trials"),
    (("prompts", "templates"), ["no placeholder"], "prompts.templates"),
    (("compare", "methods"), ["clapp"], "unknown method 'clapp'"),
    (("method_train", "clap", "lr"), 0.1, "method_train.clap.lr: unknown key"),
]
TYPO_SECTIONS = ["data", "train", "model", "search", "tracking", "prompts", "compare", None]


@pytest.fixture(scope="module")
def base_raw(demo_kit):
    from conftest import demo_config_dict

    return demo_config_dict(demo_kit, search=SEARCH)


pytestmark = pytest.mark.usefixtures("refuse_model_loading")  # the config is fully checked before any model loads


def check(raw, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = prepare_study_config(path, [])
    check_study_data(config)
    return path


def set_path(raw, path, value):
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def test_the_base_config_is_valid(base_raw, tmp_path):
    check(copy.deepcopy(base_raw), tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.sampled_from(range(len(BAD_VALUES))), min_size=1, max_size=3, unique=True))
def test_bad_values_fail_only_with_a_message_naming_the_key(base_raw, tmp_path, picks):
    raw = copy.deepcopy(base_raw)
    for index in picks:
        path, value, _ = BAD_VALUES[index]
        set_path(raw, path, value)
    with pytest.raises(UserError) as err:
        check(raw, tmp_path)
    message = str(err.value)
    assert any(BAD_VALUES[i][2] in message for i in picks), message
    assert "\n" not in message.strip()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(TYPO_SECTIONS),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
       value=st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.booleans(), st.none()))
def test_unknown_keys_are_named(base_raw, tmp_path, section, key, value):
    raw = copy.deepcopy(base_raw)
    target = raw if section is None else raw.setdefault(section, {})
    if key in target or (section == "model" and key in {"name_or_path", "revision"}):
        return
    from hpo_peft.core.config import (
        CompareConfig,
        DataConfig,
        ModelConfig,
        PromptConfig,
        SearchConfig,
        StudyConfig,
        TrackingConfig,
        TrainConfig,
    )

    known = {None: StudyConfig, "data": DataConfig, "train": TrainConfig, "model": ModelConfig, "search": SearchConfig,
             "tracking": TrackingConfig, "prompts": PromptConfig, "compare": CompareConfig}[section].model_fields
    if key in known:
        return
    target[key] = value
    with pytest.raises(UserError) as err:
        check(raw, tmp_path)
    assert f"{section + '.' if section else ''}{key}: unknown key" in str(err.value)
