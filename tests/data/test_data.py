import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpo_peft.core.config import DataConfig
from hpo_peft.data import (
    Preprocessing,
    few_shot_rows,
    load_few_shot,
    load_test,
    read_table,
)
from hpo_peft.core.errors import UserError

CATS = ["NC", "G3", "G4", "G5"]
PREP = Preprocessing(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_dataset(root, per_class=12, test_per_class=3):
    """A SICAPv2-shaped dataset: extra columns, a two-label row and a no-label row."""
    (root / "images").mkdir(parents=True)
    (root / "partition" / "Test").mkdir(parents=True)
    rows = []
    for label, cat in enumerate(CATS):
        for i in range(per_class):
            rows.append({"image_name": f"{cat}_{i}.jpg", **{c: int(c == cat) for c in CATS}, "G4C": 0, "note": "x"})
    rows.append({"image_name": "two.jpg", "NC": 1, "G3": 1, "G4": 0, "G5": 0, "G4C": 0, "note": "two labels"})
    rows.append({"image_name": "none.jpg", "NC": 0, "G3": 0, "G4": 0, "G5": 0, "G4C": 1, "note": "no label"})
    test = [{"image_name": f"t{cat}_{i}.jpg", **{c: int(c == cat) for c in CATS}, "G4C": 0}
            for cat in CATS for i in range(test_per_class)]
    for row in rows + test:
        Image.fromarray(np.full((64, 64, 3), 10 * len(row["image_name"]), np.uint8)).save(root / "images" / row["image_name"])
    pd.DataFrame(rows).to_excel(root / "partition/Test/Train.xlsx", index=False)
    pd.DataFrame(test).to_excel(root / "partition/Test/Test.xlsx", index=False)
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "sicap")


def cfg(root, **kw):
    return DataConfig(root=root, **{"shots": 4, "val_shots": 3, **kw})


def test_table_rules(dataset):
    table = read_table(dataset / "partition/Test/Train.xlsx", "image_name", CATS)
    assert len(table) == 48  # the two-label and no-label rows are skipped
    assert "two.jpg" not in set(table.image_name) and "none.jpg" not in set(table.image_name)
    assert list(np.bincount(table.label)) == [12, 12, 12, 12]
    assert table[table.image_name == "G4_0.jpg"].label.item() == 2  # position in category order
    reordered = read_table(dataset / "partition/Test/Train.xlsx", "image_name", ["G5", "G4", "G3", "NC"])
    assert reordered[reordered.image_name == "G4_0.jpg"].label.item() == 1


def test_sampler_is_deterministic_disjoint_and_balanced(dataset):
    train, val = few_shot_rows(cfg(dataset, seed=1))
    train2, val2 = few_shot_rows(cfg(dataset, seed=1))
    other, _ = few_shot_rows(cfg(dataset, seed=2))
    assert list(train.image_name) == list(train2.image_name) and list(val.image_name) == list(val2.image_name)
    assert list(train.image_name) != list(other.image_name)
    assert not set(train.image_name) & set(val.image_name)
    assert list(np.bincount(train.label)) == [4] * 4
    assert list(np.bincount(val.label)) == [3] * 4
    for name, label in zip(train.image_name, train.label):
        assert name.startswith(CATS[label])


def test_images_are_decoded_once_to_uint8(dataset):
    split = load_few_shot(cfg(dataset), PREP)
    assert split.train.images.dtype.is_floating_point is False
    assert tuple(split.train.images.shape) == (16, 3, 32, 32)
    again = load_few_shot(cfg(dataset), PREP)
    assert again.train.images.data_ptr() != 0
    from hpo_peft import data

    cached = [v for k, v in data._IMAGE_CACHE.items() if k[0].endswith(split.train.names[0])]
    assert len(cached) == 1


def test_normalize_matches_processor_convention():
    images = np.full((1, 3, 2, 2), 255, np.uint8)
    import torch

    out = PREP.normalize(torch.from_numpy(images))
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))


def test_test_split_is_separate(dataset):
    test = load_test(cfg(dataset), PREP)
    assert len(test) == 12 and all(n.startswith("t") for n in test.names)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda root: root.rename(root.with_name("gone")), "dataset root not found"),
        (lambda root: (root / "partition/Test/Train.xlsx").unlink(), "Train.xlsx: partition table not found"),
        (lambda root: pd.read_excel(root / "partition/Test/Train.xlsx").drop(columns=["G3"]).to_excel(
            root / "partition/Test/Train.xlsx", index=False), "missing column(s) ['G3']"),
        (lambda root: (root / "partition/Test/Train.xlsx").write_bytes(b"not excel"), "cannot read the table"),
        (lambda root: pd.read_excel(root / "partition/Test/Train.xlsx").assign(G5=lambda t: t.G5.replace(1, 7)).to_excel(
            root / "partition/Test/Train.xlsx", index=False), "column 'G5': expected 0 or 1"),
    ],
)
def test_bad_tables_name_the_file(dataset, break_it, message):
    break_it(dataset)
    with pytest.raises(UserError) as err:
        few_shot_rows(cfg(dataset))
    assert message in str(err.value)


def test_too_few_rows_says_how_many(dataset):
    with pytest.raises(UserError, match=r"class 'NC' has 12 usable rows, but shots \+ val_shots = 10 \+ 3 = 13"):
        few_shot_rows(cfg(dataset, shots=10))


def test_missing_and_unreadable_images_name_file_and_row(dataset):
    table = pd.read_excel(dataset / "partition/Test/Train.xlsx")
    for name in table.image_name:
        if name.startswith(("NC", "G3")):
            (dataset / "images" / name).unlink()
            break
    with pytest.raises(UserError, match=r"NC_\d+\.jpg: image not found \(row \d+ of .*Train.xlsx\)"):
        load_few_shot(cfg(dataset, shots=11, val_shots=1), PREP)
    make = dataset.parent / "other"
    root = make_dataset(make)
    (root / "images" / "G5_3.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UserError, match=r"G5_3.jpg: cannot decode image \(row \d+ of"):
        load_few_shot(cfg(root, shots=11, val_shots=1), PREP)


def test_decoding_shows_a_bar_in_a_terminal_and_none_in_a_log(tmp_path, capsys, monkeypatch):
    """A log file (stderr not a terminal) gets no progress-bar frames; a terminal gets its bar."""
    root = make_dataset(tmp_path / "big", per_class=4, test_per_class=20)  # 80 test images: a bar's worth
    load_test(cfg(root), PREP)
    assert "test images" not in capsys.readouterr().err
    from hpo_peft import data

    data._IMAGE_CACHE.clear()
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    load_test(cfg(root), PREP)
    assert "test images" in capsys.readouterr().err


def test_overlap_is_by_the_file_a_name_resolves_to_and_skips_an_unreadable_test_table(dataset):
    test_table = dataset / "partition/Test/Test.xlsx"
    test = pd.read_excel(test_table)
    test.loc[0, "image_name"] = "../images/./NC_3.jpg"  # the training table's NC_3.jpg
    test.loc[1, "image_name"] = "two.jpg"  # a skipped row of the training table: never trained on
    test.to_excel(test_table, index=False)
    with pytest.raises(UserError) as err:
        few_shot_rows(cfg(dataset))
    assert str(err.value) == (f"data: 1 image is in both the training table {dataset / 'partition/Test/Train.xlsx'} and "
                              f"the test table {test_table}: NC_3.jpg; remove it from one, or set data.allow_overlap: true")
    few_shot_rows(cfg(dataset, allow_overlap=True))
    test_table.write_bytes(b"not a spreadsheet")  # nothing trains on it: evaluate reports it, not the study
    few_shot_rows(cfg(dataset))
