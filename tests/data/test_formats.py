"""Data formats other than SICAPv2's tables (`data.format`: imagefolder, csv, hf), each read from a
tiny generated stand-in; groups kept on one side of every split; prompts for any classes; the
shipped studies for NCT-CRC-HE-100K and MHIST; one `trial` end to end on an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, demo_config_dict
from PIL import Image

from hpo_peft.core.config import DataConfig, StudyConfig
from hpo_peft.core.config_file import load_config
from hpo_peft.data import FewShotSplit, LabelledImages, Preprocessing, few_shot_rows, load_few_shot, load_test
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.validation import fold_of, make_plan

PREP = Preprocessing(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
SIZES = [(24, 40), (40, 24), (30, 30)]  # (height, width): portrait, landscape, square


def save_image(path: Path, seed: int, size=(24, 40), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def make_imagefolder(root: Path, classes=("Class A", "B", "C"), per_class=(6, 2)) -> Path:
    """train/ and test/ with a folder per class: PNG, TIFF and an upper-case .PNG, three aspect
    ratios, a hidden file, a stray text file and one outside the class folders."""
    suffixes = [".png", ".tif", ".PNG"]
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            for i in range(count):
                save_image(root / split / name / f"{split}{i}{suffixes[i % 3]}", 100 * c + i + len(split), SIZES[i % 3],
                           "TIFF" if suffixes[i % 3] == ".tif" else "PNG")
        (root / split / classes[0] / ".DS_Store").write_bytes(b"\0\0")
        (root / split / classes[0] / "notes.txt").write_text("not an image")
        (root / split / "README.md").write_text("loose")
    return root


def make_csv(root: Path, groups: int = 6, per_group=(2, 2)) -> Path:
    """A CSV of relative (and one absolute) image paths with class names as labels, a slide column,
    and rows of a class not studied; a second CSV for the test split."""
    rows = []
    for g in range(groups):
        for label, count in zip(("HP", "SSA"), per_group):
            for i in range(count):
                path = save_image(root / "images" / f"s{g}_{label}_{i}.png", 10 * g + i, SIZES[(g + i) % 3])
                rows.append({"file": f"images/{path.name}", "class": label, "slide": f"slide {g}"})
    rows[0]["file"] = str((root / rows[0]["file"]).resolve())  # an absolute path
    rows.append({"file": "images/other.png", "class": "NORM", "slide": "slide 0"})  # not in categories: skipped
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    test = [{"file": f"images/t{i}.png", "class": ("HP", "SSA")[i % 2], "slide": "slide t"} for i in range(4)]
    for i, row in enumerate(test):
        save_image(root / row["file"], 900 + i, SIZES[i % 3])
    pd.DataFrame(test).to_csv(root / "test.csv", index=False)
    return root


CSV_KEYS = {"format": "csv", "train_table": "train.csv", "test_table": "test.csv", "image_column": "file",
            "label_column": "class", "categories": ["HP", "SSA"]}


# imagefolder ------------------------------------------------------------------------------------


def test_imagefolder_reads_spaces_mixed_formats_and_any_aspect_and_counts_what_it_skips(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "folder")
    config = DataConfig(root=root, format="imagefolder", shots=3, val_shots=2)
    assert config.categories == ["B", "C", "Class A"]  # the class folders, sorted
    split = load_few_shot(config, PREP)
    assert tuple(split.train.images.shape) == (9, 3, 16, 16) and len(split.val) == 6
    assert split.train.images.dtype == torch.uint8
    assert {Path(n).suffix for n in split.train.names + split.val.names} == {".png", ".tif", ".PNG"}
    assert all(n.startswith("train/") for n in split.train.names)
    assert sum(n.startswith("train/Class A/") for n in split.train.names) == 3
    lines = capsys.readouterr().err.splitlines()  # one per folder read (the test folder: the overlap check)
    assert [line.split(": skipped")[0] for line in lines] == [f"hpo-peft: {root / 'train'}", f"hpo-peft: {root / 'test'}"]
    assert lines[0].endswith(": skipped 1 hidden file; 1 file not an image (e.g. 'Class A/notes.txt'; images end in "
                             ".png .jpg .jpeg .tif .tiff .bmp .webp); 1 file outside the class folders")
    test = load_test(config, PREP)
    assert len(test) == 6 and list(test.labels) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_given_categories_set_the_order_and_a_missing_folder_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    config = DataConfig(root=root, format="imagefolder", categories=["Class A", "C"], shots=2, val_shots=1)
    train, _ = few_shot_rows(config)
    assert [Path(n).parent.name for n in train["image_name"]] == ["Class A"] * 2 + ["C"] * 2
    with pytest.raises(UserError, match=r"folder/train/Gone: class folder not found \(data.categories names 'Gone'"):
        few_shot_rows(DataConfig(root=root, format="imagefolder", categories=["C", "Gone"], shots=1, val_shots=1))
    with pytest.raises(UserError, match=r"class 'B' has 6 usable rows, but shots \+ val_shots = 4 \+ 3 = 7"):
        few_shot_rows(DataConfig(root=root, format="imagefolder", shots=4, val_shots=3))


def test_imagefolder_unreadable_image_is_one_line_naming_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "folder", per_class=(2, 1))
    (root / "train" / "B" / "train0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=r"train/B/train0.png: cannot decode image \(in .*folder/train\)"):
        load_few_shot(DataConfig(root=root, format="imagefolder", shots=1, val_shots=1), PREP)


# csv ----------------------------------------------------------------------------------------------


def test_csv_with_class_names_relative_and_absolute_paths_skips_other_classes(tmp_path, capsys):
    root = make_csv(tmp_path / "mhist")
    config = DataConfig(root=root, shots=3, val_shots=2, **CSV_KEYS)
    split = load_few_shot(config, PREP)
    assert list(split.train.labels) == [0, 0, 0, 1, 1, 1] and tuple(split.val.images.shape) == (4, 3, 16, 16)
    assert "train.csv: skipped 1 row whose class is not one of data.categories ('NORM')" in capsys.readouterr().err
    assert len(load_test(config, PREP)) == 4
    table = pd.read_csv(root / "train.csv")
    table.loc[3, "file"] = "images/gone.png"
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(UserError, match=r"images/gone.png: image not found \(row 5 of .*train.csv\)"):
        few_shot_rows(config.model_copy(update={"shots": 5, "val_shots": 1}))
    table.loc[3, "file"] = table.loc[4, "file"]
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(UserError, match=r"train.csv: file '.*' appears in rows 5 and 6; image names must be unique"):
        few_shot_rows(config)


def test_csv_image_in_both_tables_is_refused_unless_allowed(tmp_path):
    root = make_csv(tmp_path / "mhist")
    test = pd.read_csv(root / "test.csv")
    test.loc[0, "file"] = "images/./s1_HP_0.png"
    test.to_csv(root / "test.csv", index=False)
    with pytest.raises(UserError) as err:
        few_shot_rows(DataConfig(root=root, shots=2, val_shots=1, **CSV_KEYS))
    assert str(err.value) == (f"data: 1 image is in both the training table {root / 'train.csv'} and the test table "
                              f"{root / 'test.csv'}: images/s1_HP_0.png; remove it from one, or set data.allow_overlap: true")
    few_shot_rows(DataConfig(root=root, shots=2, val_shots=1, allow_overlap=True, **CSV_KEYS))


def _slides(rows: pd.DataFrame) -> set[str]:
    return set(rows["group"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_group_column_keeps_each_slide_on_one_side_of_holdout_and_of_every_fold(tmp_path, seed):
    root = make_csv(tmp_path / "mhist", groups=8)
    holdout = DataConfig(root=root, shots=4, val_shots=2, seed=seed, group_column="slide", **CSV_KEYS)
    train, val = few_shot_rows(holdout)
    assert list(np.bincount(train.label)) == [4, 4] and list(np.bincount(val.label)) == [2, 2]
    assert not _slides(train) & _slides(val)

    kfold = DataConfig(root=root, shots=6, validation="kfold", folds=3, seed=seed, group_column="slide", **CSV_KEYS)
    shots, nothing = few_shot_rows(kfold)
    assert len(nothing) == 0 and list(np.bincount(shots.label)) == [6, 6]
    images = LabelledImages(list(shots["image_name"]), torch.tensor(shots["label"].to_numpy()), torch.zeros(12, 3, 1, 1))
    plan = make_plan(kfold, FewShotSplit(images, None))  # validation.py's own folds
    slide = dict(zip(shots["image_name"], shots["group"]))
    assert len(plan.splits) == 3
    for split in plan.splits:
        assert list(np.bincount(split.val.labels.numpy())) == [2, 2]
        assert not {slide[n] for n in split.train.names} & {slide[n] for n in split.val.names}
    assert fold_of(images.labels, 3) == [i % 3 for i in range(6)] * 2


def test_groups_that_cannot_be_split_are_refused(tmp_path):
    root = make_csv(tmp_path / "mhist", groups=2, per_group=(4, 4))
    with pytest.raises(UserError, match=r"cannot draw shots \+ val_shots = 5 \+ 3 per class with each group "
                                        r"\(data.group_column\) on one side: class 'HP' has 8 usable rows in 2 groups"):
        few_shot_rows(DataConfig(root=root, shots=5, val_shots=3, group_column="slide", **CSV_KEYS))
    with pytest.raises(UserError, match="use data.sampler: package"):
        few_shot_rows(DataConfig(root=root, shots=2, val_shots=1, group_column="slide", sampler="course", **CSV_KEYS))
    one_shot = DataConfig(root=root, shots=1, validation="kfold", group_column="slide", **CSV_KEYS)
    assert len(few_shot_rows(one_shot)[0]) == 2  # nothing held out: no side to keep a group on


def test_predict_reads_a_labelled_csv_table(tmp_path):
    from hpo_peft.fewshot.predict import labelled_images

    root = make_csv(tmp_path / "mhist")
    paths, labels = labelled_images(root / "test.csv", None, "file", ["HP", "SSA"], "class")
    assert [p.name for p in paths] == [f"t{i}.png" for i in range(4)] and labels == [0, 1, 0, 1]
    assert all(p.is_file() for p in paths)
    assert labelled_images(root / "test.csv", None, "file", ["HP", "SSA"])[1] == labels  # the class-name column found


# hf -----------------------------------------------------------------------------------------------


def make_hf(root: Path, class_label: bool = True) -> Path:
    datasets = pytest.importorskip("datasets")
    classes = ["adipose tissue", "MUS"]
    label = datasets.ClassLabel(names=classes) if class_label else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "label": label, "slide": datasets.Value("string")})

    def split(count, offset):
        images = [Image.fromarray(np.random.default_rng(offset + i).integers(0, 255, (*SIZES[i % 3], 3), dtype=np.uint8))
                  for i in range(count)]
        labels = [i % 2 if class_label else classes[i % 2] for i in range(count)]
        return datasets.Dataset.from_dict({"image": images, "label": labels, "slide": [f"s{i // 2}" for i in range(count)]},
                                          features=features)

    datasets.DatasetDict(train=split(10, 0), test=split(4, 500)).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("class_label", [True, False])
def test_hf_dataset_reads_classlabel_or_strings_and_finds_an_image_in_both_splits(tmp_path, class_label):
    root = make_hf(tmp_path / f"hf{class_label}", class_label)
    keys = {} if class_label else {"categories": ["adipose tissue", "MUS"]}
    config = DataConfig(root=root, format="hf", shots=2, val_shots=2, **keys)
    assert config.categories == ["adipose tissue", "MUS"]  # from the ClassLabel when not given
    split = load_few_shot(config, PREP)
    assert tuple(split.train.images.shape) == (4, 3, 16, 16) and all(n.startswith("train/") for n in split.train.names)
    assert len(load_test(config, PREP)) == 4
    if class_label:
        return
    import datasets

    both = datasets.load_from_disk(str(root))
    shared = datasets.concatenate_datasets([both["test"], both["train"].select([3])])
    datasets.DatasetDict(train=both["train"], test=shared).save_to_disk(str(tmp_path / "shared"))
    with pytest.raises(UserError, match=r"data: 1 image is in both the training split .*shared split 'train' and the "
                                        r"test split .*shared split 'test': train/3; remove it"):
        few_shot_rows(config.model_copy(update={"root": tmp_path / "shared"}))
    twice = datasets.concatenate_datasets([both["train"], both["train"].select([5])])
    datasets.DatasetDict(train=twice, test=both["test"]).save_to_disk(str(tmp_path / "twice"))
    with pytest.raises(UserError, match=r"twice split 'train': rows 5 and 10 hold the same image"):
        few_shot_rows(config.model_copy(update={"root": tmp_path / "twice"}))


# prompts and the shipped studies --------------------------------------------------------------------


def test_prompts_for_any_classes(tmp_path):
    from hpo_peft.models.classifier import prompt_texts

    raw = {"data": {"root": str(tmp_path), "format": "csv", "train_table": "a.csv", "test_table": "b.csv",
                    "categories": ["HP", "SSA"]}, "prompts": {"descriptions": {"SSA": ["sessile serrated adenoma"]}}}
    config = StudyConfig.model_validate(raw)
    texts = prompt_texts(config.prompts, ["HP", "SSA"])
    assert texts["HP"][0] == "a histopathology image of HP." and "an H&E stained image showing sessile serrated adenoma." in texts["SSA"]
    course = StudyConfig.model_validate({"data": {"root": str(tmp_path)}})
    assert course.prompts.templates[0] == "a histopathology slide showing [CLS]"  # the course's four: as before


@pytest.mark.parametrize("study, make, categories", [
    ("nct_crc_imagefolder.yaml", "imagefolder", ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]),
    ("mhist_csv.yaml", "mhist", ["HP", "SSA"]),
])
def test_shipped_studies_read_a_stand_in_in_their_layout(tmp_path, study, make, categories):
    root = tmp_path / "data"
    if make == "imagefolder":  # NCT-CRC-HE-100K/ and CRC-VAL-HE-7K/, a folder per class each
        make_imagefolder(root, classes=categories, per_class=(3, 1))
        shipped = yaml.safe_load((ROOT / "studies" / study).read_text())["data"]
        (root / "train").rename(root / shipped["train_dir"])
        (root / "test").rename(root / shipped["test_dir"])
    else:  # MHIST: annotations.csv and images/, the split in a Partition column
        rows = [{"Image Name": f"MHIST_{c}{i}.png", "Majority Vote Label": c, "Number of Annotators who Selected SSA (Out of 7)": 0,
                 "Partition": "train" if i < 3 else "test"} for c in categories for i in range(4)]
        for i, row in enumerate(rows):
            save_image(root / "images" / row["Image Name"], i, (30, 30))
        pd.DataFrame(rows).to_csv(root / "annotations.csv", index=False)
    config = load_config(ROOT / "studies" / study, [f"data.root={root}", "data.shots=2", "data.val_shots=1"])
    assert config.data.categories == categories and set(config.prompts.descriptions) == set(categories)
    train, val = few_shot_rows(config.data)
    assert list(np.bincount(train.label)) == [2] * len(categories) and len(val) == len(categories)
    assert len(load_test(config.data, PREP)) == len(categories)


def test_a_sicapv2_study_keeps_its_fingerprint_and_an_hf_dataset_is_no_course_protocol(tmp_path):
    import json

    from hpo_peft.core.config import COURSE_TEMPLATES
    from hpo_peft.core.data_config import FORMAT_ONLY_KEYS
    from hpo_peft.study.identity import fingerprint
    from hpo_peft.study.preflight import check_config

    keys = fingerprint(StudyConfig.model_validate({"data": {"root": str(tmp_path)}}))
    assert not {f"data.{key}" for key in ("format", *FORMAT_ONLY_KEYS)} & set(keys)
    assert keys["prompts.templates"] == json.dumps(COURSE_TEMPLATES)
    assert keys["prompts.descriptions.G4"] == json.dumps(["cribriform ill-formed fused papillary patterns"])
    course = StudyConfig.model_validate({"protocol": "course", "train": {"device": "cpu"},
                                         "data": {"root": str(tmp_path), "format": "hf", "categories": ["a", "b"]}})
    with pytest.raises(UserError, match="data.format hf keeps its images inside the dataset: use protocol: study"):
        check_config(course)


# one trial end to end -------------------------------------------------------------------------------


def test_a_trial_runs_on_an_image_folder_with_the_demo_model(demo_kit, tmp_path, capsys):
    from hpo_peft.app.cli import main

    root = make_imagefolder(tmp_path / "folder", classes=("tumour epithelium", "Stroma"), per_class=(4, 2))
    raw = demo_config_dict(demo_kit)
    raw["data"] = {"root": str(root), "format": "imagefolder", "shots": 2, "val_shots": 2}
    raw["prompts"] = {"descriptions": {"Stroma": ["stroma"]}}
    raw["train"] = {**raw["train"], "max_epochs": 2, "device": "cpu", "augment": "none"}
    raw["search"] = {}
    config = tmp_path / "folder.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["trial", str(config), "--method", "clip_adapter", "--save", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "test balanced accuracy" in out and (tmp_path / "adapter" / "hpo_peft_adapter.json").is_file()


def test_the_course_protocol_runs_on_an_image_folder(demo_kit, tmp_path, capsys):
    from hpo_peft.app.cli import main

    root = make_imagefolder(tmp_path / "folder", classes=("tumour epithelium", "Stroma"), per_class=(4, 2))
    raw = demo_config_dict(demo_kit)
    raw["data"] = {"root": str(root), "format": "imagefolder", "shots": 2}
    raw["protocol"] = "course"
    raw["train"] = {"precision": "fp32", "device": "cpu"}
    raw["method_train"] = {"clip_adapter": {"max_epochs": 2}}
    raw["search"] = {}
    config = tmp_path / "course.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["trial", str(config), "--method", "clip_adapter"])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "test ACA (course rounding)" in out


def test_an_image_folder_study_goes_through_every_command(demo_kit, tmp_path, monkeypatch, capsys):
    """study run, evaluate --register, predict on the test/<class>/ tree and on a labelled CSV,
    the registered pyfunc model, and compare: the same commands as on SICAPv2 tables."""
    import json

    import mlflow

    from hpo_peft.app.cli import main

    root = make_imagefolder(tmp_path / "folder", classes=("tumour epithelium", "Stroma"), per_class=(6, 3))
    search = {"n_trials": 2, "sampler": {"name": "random", "seed": 1}, "pruner": {"name": "none"},
              "params": {"method": "zs_linear_probe", "learning_rate": {"low": 0.001, "high": 0.1, "log": True},
                         "max_epochs": 2, "patience": None}}
    raw = demo_config_dict(demo_kit, search)
    raw["data"] = {"root": str(root), "format": "imagefolder", "shots": 2, "val_shots": 2}
    raw["train"] = {**raw["train"], "device": "cpu", "augment": "none"}
    config = tmp_path / "folder.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(config)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(config), "--register", "folder-best", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["registered_version"] == 1 and sum(map(sum, evaluated["confusion_matrix"])) == 6

    assert main(["predict", "models:/folder-best@best", str(root / "test"), "--out", "tree.csv"]) == 0
    tree = pd.read_csv(tmp_path / "tree.csv")
    assert len(tree) == 6 and {Path(p).parent.name for p in tree.iloc[:, 0]} == {"tumour epithelium", "Stroma"}
    labels = pd.DataFrame({"image_name": [str(Path(p).relative_to(root / "test")) for p in tree.iloc[:, 0]],
                           "label": [Path(p).parent.name for p in tree.iloc[:, 0]]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    assert main(["predict", "models:/folder-best@best", str(root / "test"), "--table", "labels.csv",
                 "--out", "table.csv", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"balanced accuracy {evaluated['balanced_accuracy']:.2f}%" in out  # the same images, the same score

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/folder-best@best")
        probabilities = model.predict(pd.DataFrame({"path": [str(p) for p in tree.iloc[:, 0]]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert list(probabilities.columns) == ["Stroma", "tumour epithelium"] and len(probabilities) == 6  # sorted folders

    assert main(["compare", str(config), "--shots", "1", "--seeds", "1", "--methods", "zs_linear_probe",
                 "--trials-per-method", "1", "--out", "compare"]) == 0
    assert (tmp_path / "compare" / "compare_summary.csv").is_file()
