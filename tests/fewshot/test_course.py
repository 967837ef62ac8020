"""The course protocol (`protocol: course`): the notebook's sampler, transform and loops, checked
against independent re-implementations of the course's code on the demo kit."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, demo_config_dict
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from hpo_peft.core.config import ModelConfig, StudyConfig
from hpo_peft.core.config_file import load_config
from hpo_peft.fewshot.course import course_shots, course_transform, run_course_trial
from hpo_peft.data import load_image, read_table, sample_few_shot
from hpo_peft.core.errors import UserError
from hpo_peft.methods import get_method, method_config
from hpo_peft.models.classifier import (
    build_classifier,
    count_trainable,
    load_base_model,
    text_prototypes,
)

CATEGORIES = ["NC", "G3", "G4", "G5"]


@pytest.fixture(scope="module")
def base(demo_kit):
    return load_base_model(ModelConfig(name_or_path=str(demo_kit / "model")))


def train_xlsx(kit: Path) -> Path:
    return kit / "sicapv2" / "partition" / "Test" / "Train.xlsx"


def course_config(kit: Path, **method_train) -> StudyConfig:
    raw = demo_config_dict(kit)
    raw["protocol"] = "course"
    raw["data"]["shots"] = 8
    # patience 1 must be ignored: the course trains fixed epochs
    raw["train"].update(optimizer="adam", learning_rate=1e-3, batch_size=16, max_epochs=2, patience=1, precision="fp32",
                        augment="none")
    raw["method_train"] = method_train
    return StudyConfig.model_validate(raw)


# --------------------------------------------------------------------------------------
# The course's code, re-written from its notebook and `vlms` helpers (REFERENCE.md)
# --------------------------------------------------------------------------------------


def notebook_shots(xlsx: Path, shots: int, seed: int) -> list[str]:
    """`few_shot_loader`'s selection: pandas rows in order, exactly one label, random.shuffle."""
    frame = pd.read_excel(xlsx)
    data = []
    for i in range(len(frame)):
        sample = frame.loc[i, :].to_dict()
        labels = [sample[c] for c in CATEGORIES]
        if np.sum(labels) == 1:
            data.append((sample["image_name"], int(np.argmax(labels))))
    state = random.getstate()
    random.seed(seed)
    random.shuffle(data)
    random.setstate(state)
    labels = [label for _, label in data]
    selected = []
    for label in np.unique(labels):
        selected += [name for name, other in data if other == label][:shots]
    return selected


def notebook_transforms(prep) -> transforms.Compose:
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(std=list(prep.std), mean=list(prep.mean)),
        transforms.Resize([prep.height, prep.width]),
    ])


class NotebookDataset(Dataset):
    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return {"image": self.transform(Image.open(self.paths[index])), "label": self.labels[index]}


def notebook_setup(config: StudyConfig, base, method: str):
    """Seeds 42, the shots' loader, the prepared model: the notebook's order of events."""
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    data = config.data
    table = read_table(data.root / data.train_table, data.image_column, data.categories)
    shots = course_shots(table, data.categories, data.shots, data.seed)
    options = method_config(method, config.methods.get(method, {}))
    model = get_method(method).prepare_as_notebook(build_classifier(base, text_prototypes(base, config.prompts, data.categories)), options)
    dataset = NotebookDataset([data.root / data.images_dir / n for n in shots["image_name"]], list(shots["label"]),
                              notebook_transforms(base.preprocessing))
    loader = DataLoader(dataset, batch_size=config.train_for(method).batch_size, shuffle=True, num_workers=0)
    return model, loader


def notebook_train_ft(config: StudyConfig, base, method: str):
    model, loader = notebook_setup(config, base, method)
    train = config.train_for(method)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.learning_rate)
    for _ in range(train.max_epochs):
        for batch in loader:
            loss = F.cross_entropy(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def notebook_train_adapter(config: StudyConfig, base, method: str):
    model, loader = notebook_setup(config, base, method)
    train = config.train_for(method)
    with torch.no_grad():
        batches = [(model.encoder(b["image"]), b["label"]) for b in loader]
    features, labels = torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])
    head = model.head
    if hasattr(head, "initialize_from_shots"):
        head.initialize_from_shots(features, labels)
    optimizer = torch.optim.SGD(head.parameters(), lr=train.learning_rate, momentum=0.9)
    n, bs = len(features), train.batch_size
    for _ in range(train.max_epochs):
        order = np.random.rand(n).argsort()
        for i in range(max(n // bs, 1)):
            idx = order[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            if (penalty := head.penalty()) is not None:  # the head's contract: CLAP's term, else None
                loss = loss + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def notebook_test_confusion(config: StudyConfig, base, model) -> list[list[int]]:
    data = config.data
    table = read_table(data.root / data.test_table, data.image_column, data.categories)
    dataset = NotebookDataset([data.root / data.images_dir / n for n in table["image_name"]], list(table["label"]),
                              notebook_transforms(base.preprocessing))
    predictions, truth = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=8, shuffle=False):
            predictions.append(model(batch["image"]).argmax(1))
            truth.append(batch["label"])
    predictions, truth = torch.cat(predictions), torch.cat(truth)
    classes = len(data.categories)
    return [[int(((truth == t) & (predictions == p)).sum()) for p in range(classes)] for t in range(classes)]


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def course_aca_of(confusion) -> float:
    matrix = np.asarray(confusion, dtype=float)
    return round(float(np.mean(np.diag(matrix / matrix.sum(axis=1, keepdims=True)))) * 100, 2)


# --------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------


def test_course_shots_are_the_notebooks_few_shot_loader_selection(demo_kit):
    path = train_xlsx(demo_kit)
    table = read_table(path, "image_name", CATEGORIES)
    random.seed(123)
    state = random.getstate()
    picked = {}
    for seed in (1, 2):
        rows = course_shots(table, CATEGORIES, 4, seed)
        picked[seed] = list(rows["image_name"])
        assert picked[seed] == notebook_shots(path, 4, seed)
        assert list(rows.columns) == list(table.columns)
        assert list(rows["label"]) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
        package_train, _ = sample_few_shot(table, CATEGORIES, 4, 4, seed, path)
        assert list(package_train["image_name"]) != picked[seed]  # not the package's numpy sampler
    assert picked[1] != picked[2]
    assert random.getstate() == state  # a private generator: the global one is untouched


def test_a_study_can_draw_the_notebooks_shots(demo_kit):
    """`data.sampler: course`: a study's K shots are the notebook's for the seed and K (so a study
    and the notebook's experiment compare on the same images), its K_val validation images the next
    ones of each class in the notebook's order; the default sampler's studies keep their fingerprint."""
    from hpo_peft.data import few_shot_rows
    from hpo_peft.study.identity import differences, fingerprint

    path = train_xlsx(demo_kit)
    table = read_table(path, "image_name", CATEGORIES)
    for seed in (1, 2):
        train, val = sample_few_shot(table, CATEGORIES, 4, 3, seed, path, sampler="course")
        assert list(train["image_name"]) == notebook_shots(path, 4, seed)
        seven = notebook_shots(path, 7, seed)  # 7 per class, classes in order
        assert list(val["image_name"]) == [name for c in range(4) for name in seven[7 * c + 4:7 * c + 7]]
        assert list(val["label"]) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    raw = demo_config_dict(demo_kit)
    raw["data"].update(validation="kfold", shots=16, seed=2)
    package = StudyConfig.model_validate(raw)
    raw["data"]["sampler"] = "course"
    course = StudyConfig.model_validate(raw)
    assert list(few_shot_rows(course.data)[0]["image_name"]) == notebook_shots(path, 16, 2)
    assert list(few_shot_rows(package.data)[0]["image_name"]) != notebook_shots(path, 16, 2)
    assert "data.sampler" not in fingerprint(package)
    assert differences(fingerprint(package), fingerprint(course)) == ["data.sampler"]
    # likewise a study that does not augment keeps the fingerprint it had before `train.augment`
    plain, turned = (StudyConfig.model_validate({**raw, "train": {**raw["train"], "augment": a}}) for a in ("none", "dihedral"))
    assert "train.augment" not in fingerprint(plain)
    assert differences(fingerprint(plain), fingerprint(turned)) == ["train.augment"]


def test_course_shots_refuses_a_class_short_of_shots(demo_kit):
    table = read_table(train_xlsx(demo_kit), "image_name", CATEGORIES)
    short = table[(table["label"] != 2) | (table.index % 10 == 0)].reset_index(drop=True)
    with pytest.raises(UserError, match="'G4' has .* usable rows"):
        course_shots(short, CATEGORIES, 16, 1)


# --------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------


def test_course_transform_is_the_notebooks_resize_after_normalise(demo_kit, base):
    prep = base.preprocessing
    table = read_table(train_xlsx(demo_kit), "image_name", CATEGORIES)
    paths = [demo_kit / "sicapv2" / "images" / name for name in table["image_name"][:2]]
    images = [Image.open(p).convert("RGB") for p in paths]
    assert images[0].size == (512, 512)
    expected = torch.stack([notebook_transforms(prep)(image) for image in images])

    assert torch.equal(course_transform(images[0], prep), expected[0])
    as_uint8 = torch.stack([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images])
    assert torch.equal(course_transform(as_uint8, prep), expected)
    assert torch.equal(course_transform(images, prep), expected)
    assert expected.shape == (2, 3, prep.height, prep.width)

    package = prep.normalize(load_image(paths[0], prep).unsqueeze(0))[0]  # uint8 bicubic resize, then normalise
    assert package.shape == expected[0].shape
    assert (package - expected[0]).abs().max() > 0.05


# --------------------------------------------------------------------------------------
# Training and test
# --------------------------------------------------------------------------------------


def test_course_peft_trial_is_the_notebooks_train_ft_with_last_weights(demo_kit, base):
    config = course_config(demo_kit)
    epochs = []
    first = run_course_trial(config, "lora", on_epoch=lambda e, loss: epochs.append((e, loss)), base=base)
    second = run_course_trial(config, "lora", base=base)

    fresh = get_method("lora").prepare(build_classifier(base, text_prototypes(base, config.prompts, CATEGORIES)),
                                       method_config("lora", {"rank": 4, "b_init": "zeros"}))
    vision = base.clip.config.vision_config
    assert first.trainable_parameters == count_trainable(fresh)
    assert first.trainable_parameters == 3 * vision.num_hidden_layers * 2 * 4 * vision.hidden_size + fresh.head.weight.numel()
    assert first.method == "lora" and first.method_options["rank"] == 4

    assert len(first.train_losses) == 2  # fixed epochs despite patience 1
    assert [e for e, _ in epochs] == [1, 2] and [loss for _, loss in epochs] == first.train_losses
    assert first.train_losses == second.train_losses
    assert first.test.as_dict() == second.test.as_dict()

    replay = notebook_train_ft(config, base, "lora")
    weights = trained(first.classifier)
    assert weights.keys() == trained(replay).keys() and any("lora_B" in n for n in weights)
    for name, value in trained(replay).items():
        assert torch.equal(weights[name], value), name
    assert any(not torch.equal(v, trained(fresh)[n]) for n, v in weights.items())  # it did train

    assert first.test.confusion == notebook_test_confusion(config, base, replay)
    assert sum(map(sum, first.test.confusion)) == 96  # the whole test table
    assert first.test_aca == course_aca_of(first.test.confusion) == round(first.test.balanced_accuracy, 2)


@pytest.mark.parametrize("method,batch_size", [("clap", 12), ("zs_linear_probe", 64)])
def test_course_adapter_trial_is_the_notebooks_train_adapter(demo_kit, base, method, batch_size):
    # 32 shots: batch 12 runs two batches (the last 8 dropped), batch 64 one batch of all 32
    config = course_config(demo_kit, **{method: {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 1e-3,
                                                "max_epochs": 3, "batch_size": batch_size}})
    result = run_course_trial(config, method, base=base)
    assert len(result.train_losses) == 3
    assert result.trainable_parameters == count_trainable(
        get_method(method).prepare(build_classifier(base, text_prototypes(base, config.prompts, CATEGORIES)),
                                   method_config(method, {})))
    replay = notebook_train_adapter(config, base, method)
    assert torch.equal(result.classifier.head.weight, replay.head.weight)
    if method == "clap":
        assert torch.equal(result.classifier.head.multipliers, replay.head.multipliers)
        assert result.classifier.head.multipliers.min() > 0
    assert not torch.equal(result.classifier.head.weight, replay.head.anchors if method == "clap" else
                           build_classifier(base, text_prototypes(base, config.prompts, CATEGORIES)).head.weight)
    assert result.test.confusion == notebook_test_confusion(config, base, replay)
    assert result.test_aca == course_aca_of(result.test.confusion) == round(result.test.balanced_accuracy, 2)


def test_course_zero_shot_trains_nothing(demo_kit, base):
    config = course_config(demo_kit)
    result = run_course_trial(config, "zero_shot", base=base)
    assert result.train_losses == [] and result.trainable_parameters == 0
    model = build_classifier(base, text_prototypes(base, config.prompts, CATEGORIES))
    assert result.test.confusion == notebook_test_confusion(config, base, model)


# --------------------------------------------------------------------------------------
# The notebook's config
# --------------------------------------------------------------------------------------


def test_course_notebook_config_holds_the_courses_settings():
    config = load_config(ROOT / "studies" / "course_notebook.yaml")
    assert config.protocol == "course"
    assert config.model.name_or_path == "vinid/plip"
    assert (config.data.shots, config.data.seed, config.data.categories) == (16, 1, CATEGORIES)
    assert config.method.name == "lora" and config.methods["lora"] == {"rank": 4, "b_init": "zeros"}
    assert config.prompts == StudyConfig.model_validate({"data": {"root": "."}}).prompts
    peft = config.train_for("lora")
    assert (peft.optimizer, peft.learning_rate, peft.max_epochs, peft.batch_size, peft.patience, peft.precision) == (
        "adam", 1e-3, 20, 32, None, "fp32")
    for adapter in ("linear_probe", "zs_linear_probe", "clip_adapter", "clap"):
        train = config.train_for(adapter)
        assert (train.optimizer, train.momentum, train.learning_rate, train.max_epochs, train.batch_size, train.precision) == (
            "sgd", 0.9, 1e-3, 100, 32, "fp32"), adapter


def test_the_trial_command_runs_the_course_protocol(write_config, tmp_path, capsys):
    from hpo_peft.app.cli import main

    config = write_config(protocol="course", train={"max_epochs": 2, "patience": None, "precision": "fp32", "augment": "none"})
    code = main(["trial", str(config), "--method", "lora", "--save", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert code == 0
    assert "protocol course" in out and out.count("train loss") == 2 and "val loss" not in out
    assert "test ACA (course rounding)" in out and "last epoch's weights" in out
    assert (tmp_path / "adapter" / "hpo_peft_adapter.json").is_file()
