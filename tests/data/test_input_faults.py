"""Input faults ("nothing lost, nothing repeated, nothing hangs"): each one fails through the CLI
with exit code 2 and one line naming the file, row or key, before any model is loaded, and
nothing is written."""

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import demo_config_dict

from hpo_peft.app.cli import main
from hpo_peft.core.config import DataConfig
from hpo_peft.core.config_file import load_config
from hpo_peft.data import Preprocessing, load_test
from hpo_peft.core.errors import UserError

TRAIN = "partition/Test/Train.xlsx"
TEST = "partition/Test/Test.xlsx"


pytestmark = pytest.mark.usefixtures("refuse_model_loading")  # every fault here is found before the model loads


@pytest.fixture
def kit(demo_kit, tmp_path):
    root = tmp_path / "sicapv2"
    shutil.copytree(demo_kit / "sicapv2", root)
    return root


def fails_cleanly(capsys, tmp_path, config, *options) -> str:
    """Runs `trial CONFIG OPTIONS --save DIR`; returns the one error line."""
    adapter = tmp_path / "adapter"
    code = main(["trial", str(config), *map(str, options), "--save", str(adapter)])
    err = capsys.readouterr().err
    assert code == 2, err[-600:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpo-peft: error: "), repr(err[-600:])
    assert "Traceback" not in err
    assert not adapter.exists()
    return lines[0]


def write_text(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# 1. a repeated image name could put one image in both the training and the validation shots


def test_duplicate_image_names_name_the_file_image_and_rows(write_config, kit, tmp_path, capsys):
    table = pd.read_excel(kit / TRAIN)
    nc = int(np.flatnonzero(table.NC.eq(1) & table[["G3", "G4", "G5"]].sum(axis=1).eq(0))[0])
    g5 = int(np.flatnonzero(table.G5.eq(1) & table[["NC", "G3", "G4"]].sum(axis=1).eq(0))[0])
    name = table.image_name[nc]
    table.loc[g5, "image_name"] = name  # the same image labelled NC and G5
    table.to_excel(kit / TRAIN, index=False)
    first, second = sorted([nc + 2, g5 + 2])  # header is spreadsheet row 1
    message = fails_cleanly(capsys, tmp_path, write_config(data={"root": str(kit)}))
    assert f"Train.xlsx: image_name {name!r} appears in rows {first} and {second}" in message
    assert "must be unique" in message


def test_duplicate_image_names_in_the_test_table_are_found_too(kit):
    table = pd.read_excel(kit / "partition/Test/Test.xlsx")
    table.loc[len(table)] = table.loc[0]
    table.to_excel(kit / "partition/Test/Test.xlsx", index=False)
    prep = Preprocessing(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(UserError) as err:
        load_test(DataConfig(root=kit), prep)
    assert f"Test.xlsx: image_name {table.image_name[0]!r} appears in rows 2 and {len(table) + 1}" in str(err.value)


# 2. a key written twice silently dropped the first one (a whole section, at the top level)


@pytest.mark.parametrize("section", [None, "data"])
def test_duplicate_yaml_keys_name_both_lines(demo_kit, tmp_path, capsys, section):
    raw = demo_config_dict(demo_kit)
    if section is None:  # a second `train:` section at the end
        text = yaml.safe_dump(raw) + "train:\n  max_epochs: 1\n"
        key, indent = "train", ""
    else:  # `data.seed` written twice inside the data section
        raw["data"] = {"seed": 1, **raw["data"]}
        text = yaml.safe_dump(raw, sort_keys=False).replace("  seed: 1\n", "  seed: 1\n  seed: 2\n", 1)
        key, indent = "seed", "  "
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.startswith(f"{indent}{key}:")]
    assert len(lines) == 2
    config = write_text(tmp_path, text)
    message = fails_cleanly(capsys, tmp_path, config)
    assert f"{config}: " in message
    assert f"line {lines[1]}, column {len(indent) + 1}: key {key!r} appears twice (first at line {lines[0]})" in message


def test_merge_keys_may_still_be_overridden(tmp_path):
    """Guard for item 2: `<<: *anchor` then a key of the anchor is an override, not a repeat."""
    text = ("data: {root: x}\n"
            "train: &t {batch_size: 8, max_epochs: 3}\n"
            "method_train:\n  lora:\n    <<: *t\n    max_epochs: 5\n")
    config = load_config(write_text(tmp_path, text))
    assert config.method_train["lora"] == {"batch_size": 8, "max_epochs": 5}


# 3. an override whose value is not YAML


def test_an_override_that_is_not_yaml_is_named(write_config, tmp_path, capsys):
    message = fails_cleanly(capsys, tmp_path, write_config(), "--set", "train.learning_rate=[")
    assert "override 'train.learning_rate=[': the value is not valid YAML (column 2:" in message


# 4. a YAML syntax error: one line with file, line, column and the problem


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(demo_kit, tmp_path, capsys):
    text = yaml.safe_dump(demo_config_dict(demo_kit))
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("  learning_rate:"))
    lines[n] += ": 1"  # `learning_rate: 0.003: 1`
    config = write_text(tmp_path, "\n".join(lines) + "\n")
    message = fails_cleanly(capsys, tmp_path, config)
    column = len(lines[n]) - len(": 1") + 1
    assert f"{config}: not valid YAML: line {n + 1}, column {column}: mapping values are not allowed here" in message


# 5. the device string's format is checked with the config (availability is checked elsewhere)


def test_an_unknown_device_is_a_config_error(write_config, tmp_path, capsys):
    message = fails_cleanly(capsys, tmp_path, write_config(), "--set", "train.device=gpu0")
    assert "invalid config: train.device: unknown device 'gpu0'" in message
    assert "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N" in message
    for good in ["auto", "cpu", "cuda", "cuda:1", "mps", "xpu", "xpu:0"]:
        assert load_config(write_config(), [f"train.device={good}"]).train.device == good


# 6. a file named .xlsx that is no workbook


def _truncate(path):
    path.write_bytes(path.read_bytes()[:300])  # the zip's directory is at its end


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda path: pd.read_excel(path).to_csv(path, index=False), "not an Excel .xlsx workbook (it looks like CSV text)"),
        (lambda path: path.write_bytes(b""), "not an Excel .xlsx workbook (it is empty)"),
        (_truncate, "not a readable .xlsx workbook (BadZipFile"),
    ],
    ids=["csv", "empty", "damaged-zip"],
)
def test_a_file_that_is_no_workbook_says_what_it_is(write_config, kit, tmp_path, capsys, damage, expected):
    damage(kit / TRAIN)
    message = fails_cleanly(capsys, tmp_path, write_config(data={"root": str(kit)}))
    assert f"Train.xlsx: cannot read the table: {expected}" in message
    assert "engine" not in message


# 7. the data on a second sheet


def test_data_on_another_sheet_names_the_sheets(write_config, kit, tmp_path, capsys):
    table = pd.read_excel(kit / TRAIN)
    with pd.ExcelWriter(kit / TRAIN) as writer:
        pd.DataFrame({"note": ["exported from the slide database"]}).to_excel(writer, sheet_name="Notes", index=False)
        table.to_excel(writer, sheet_name="Train", index=False)
    message = fails_cleanly(capsys, tmp_path, write_config(data={"root": str(kit)}))
    assert "Train.xlsx: missing column(s) ['image_name', 'NC', 'G3', 'G4', 'G5'] in sheet 'Notes', the first sheet" in message
    assert "sheet 'Train' has them" in message


# 8. a bad 0/1 cell is shown as the user typed it


@pytest.mark.parametrize("value, shown", [(np.nan, "got an empty cell"), (2, "got 2")], ids=["empty", "two"])
def test_a_bad_flag_is_shown_as_typed(write_config, kit, tmp_path, capsys, value, shown):
    table = pd.read_excel(kit / TRAIN).astype({"G5": float})
    table.loc[5, "G5"] = value
    table.to_excel(kit / TRAIN, index=False)
    message = fails_cleanly(capsys, tmp_path, write_config(data={"root": str(kit)}))
    assert f"Train.xlsx: row 7, column 'G5': expected 0 or 1, {shown}" in message
    assert "np." not in message


# 9. an image in both the training and the test table: a test score on images trained on


def _share_train_rows(kit, count: int) -> list[str]:
    """Appends the training table's first `count` single-label rows to the test table (the first
    one written `./NAME`: the same file); returns their names."""
    train = pd.read_excel(kit / TRAIN)
    single = train[train[["NC", "G3", "G4", "G5"]].sum(axis=1).eq(1)].head(count)
    test = pd.read_excel(kit / TEST)
    shared = single.assign(image_name=["./" + n if i == 0 else n for i, n in enumerate(single.image_name)])
    pd.concat([test, shared], ignore_index=True).to_excel(kit / TEST, index=False)
    return list(single.image_name)


@pytest.mark.parametrize("command", ["trial", "course", "study", "compare"])
def test_an_image_in_both_tables_is_refused_before_anything_trains(write_config, kit, tmp_path, capsys, command):
    names = _share_train_rows(kit, 3)
    course = {"protocol": "course", "train": {"augment": "none"}} if command == "course" else {}
    config = write_config(data={"root": str(kit)}, **course)
    stores = ["--storage", str(tmp_path / "o.journal"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    if command in ("trial", "course"):
        message = fails_cleanly(capsys, tmp_path, config)
    else:
        argv = ["study", "run", str(config), *stores] if command == "study" else \
            ["compare", str(config), "--shots", "1", "--seeds", "1", *stores, "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        message = lines[0]
    assert message == (f"hpo-peft: error: data: 3 images are in both the training table {kit / TRAIN} and the test "
                       f"table {kit / TEST}: {', '.join(names)}; remove them from one, or set data.allow_overlap: true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "sicapv2"]  # no study, run or results


def test_allow_overlap_passes_the_check_and_keeps_the_study_fingerprint(write_config, kit):
    from hpo_peft.data import few_shot_rows
    from hpo_peft.study.identity import differences, fingerprint
    from hpo_peft.study.preflight import check_study_data

    names = _share_train_rows(kit, 7)
    config = write_config(data={"root": str(kit)})
    with pytest.raises(UserError, match=r"data: 7 images are in both .*: (.+, ){4}.+, \.\.\. \(2 more\); remove them"):
        few_shot_rows(load_config(config).data)
    allowed = load_config(config, ["data.allow_overlap=true"])
    check_study_data(allowed)  # what `study run` checks before its stores open
    few_shot_rows(allowed.data)
    assert "data.allow_overlap" not in fingerprint(allowed)
    assert differences(fingerprint(load_config(config)), fingerprint(allowed)) == []
