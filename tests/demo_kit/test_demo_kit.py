"""Tests for the offline demo kit (generated SICAPv2-layout data + tiny CLIP-format model).

The kit is the session's (tests/conftest.py), built once for the whole suite."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hpo_peft import demo_kit
from hpo_peft.core.config import COURSE_DESCRIPTIONS, COURSE_TEMPLATES
from hpo_peft.demo_kit import DEFAULT_DIR, KIT_VERSION, build_demo_kit

CLASSES = ["NC", "G3", "G4", "G5"]
COLUMNS = ["image_name", "NC", "G3", "G4", "G5", "G4C"]
NAME_RE = re.compile(r"^\d{2}B\d{7}_Block_Region_\d+_\d+_\d+_xini_\d+_yini_\d+\.jpg$")
# the config's default prompts (the course's): the kit must serve exactly these
TEMPLATES = COURSE_TEMPLATES
DESCRIPTIONS = {name: descriptions[0] for name, descriptions in COURSE_DESCRIPTIONS.items()}


@pytest.fixture(scope="module")
def kit(demo_kit) -> Path:
    """The session's kit (tests/conftest.py), built once for the whole suite."""
    return demo_kit


@pytest.fixture(scope="module")
def tables(kit) -> dict[str, pd.DataFrame]:
    part = kit / "sicapv2" / "partition" / "Test"
    return {split: pd.read_excel(part / f"{split}.xlsx") for split in ("Train", "Test")}


def test_public_api():
    assert DEFAULT_DIR == Path("local_data/demo")
    assert isinstance(KIT_VERSION, int)


def test_layout(kit):
    assert (kit / "kit.json").is_file()
    assert (kit / "sicapv2" / "images").is_dir()
    for split in ("Train", "Test"):
        assert (kit / "sicapv2" / "partition" / "Test" / f"{split}.xlsx").is_file()
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (kit / "model" / name).is_file(), name
    # no temporary build folder left next to the kit
    assert [p.name for p in kit.parent.iterdir()] == ["demo"]


def test_columns_and_values(tables):
    for df in tables.values():
        assert list(df.columns) == COLUMNS
        labels = df[CLASSES + ["G4C"]]
        assert all(pd.api.types.is_integer_dtype(t) for t in labels.dtypes)
        assert set(np.unique(labels.to_numpy())) <= {0, 1}


def test_images_exist_unique_and_rgb_512(kit, tables):
    images = kit / "sicapv2" / "images"
    train, test = (set(tables[s]["image_name"]) for s in ("Train", "Test"))
    assert len(train) == len(tables["Train"]) and len(test) == len(tables["Test"])
    assert not train & test, "Train and Test must use different images"
    on_disk = {p.name for p in images.iterdir()}
    assert on_disk == train | test
    for name in sorted(train | test):
        assert NAME_RE.match(name), name
        with Image.open(images / name) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size == (512, 512)


def test_row_counts(tables):
    for split, per_class in (("Train", 48), ("Test", 24)):
        labels = tables[split][CLASSES].to_numpy()
        single = labels[labels.sum(axis=1) == 1]
        assert single.sum(axis=0).tolist() == [per_class] * 4, split
    train = tables["Train"][CLASSES].to_numpy().sum(axis=1)
    assert (train == 2).sum() == 5
    assert (train == 0).sum() == 5
    assert (tables["Test"][CLASSES].to_numpy().sum(axis=1) == 1).all()
    # shuffled: the classes are not in blocks
    first = tables["Train"][CLASSES].to_numpy()[:48].argmax(axis=1)
    assert len(set(first.tolist())) > 1


def test_g4c(tables):
    for df in tables.values():
        assert df["G4C"].sum() > 0
        assert (df.loc[df["G4C"] == 1, "G4"] == 1).all()


def test_idempotent(kit):
    meta = kit / "kit.json"
    before = meta.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_demo_kit(kit, progress=False) == kit
    assert time.perf_counter() - t0 < 1.0
    assert meta.stat().st_mtime_ns == before
    assert f'"kit_version": {KIT_VERSION}' in meta.read_text()


def test_incomplete_or_old_kit_is_not_complete(tmp_path, kit):
    assert demo_kit._is_complete(kit)
    fake = tmp_path / "old"
    (fake / "sicapv2").mkdir(parents=True)
    (fake / "model").mkdir()
    (fake / "kit.json").write_text('{"kit_version": %d}' % (KIT_VERSION - 1))
    assert not demo_kit._is_complete(fake)
    (fake / "kit.json").unlink()
    assert not demo_kit._is_complete(fake)


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_draw, calls = demo_kit.tissue.draw_patch, []

    def draw_then_interrupt(*args, **kwargs):  # interrupted while writing the images
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(demo_kit.tissue, "draw_patch", draw_then_interrupt)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        build_demo_kit(out, progress=False)
    assert not (out / "kit.json").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build folder is cleaned up


def test_generation_is_deterministic(tmp_path):
    a = demo_kit.tissue.draw_patch(demo_kit.tissue.rng("test", 3), "G4", 128)
    b = demo_kit.tissue.draw_patch(demo_kit.tissue.rng("test", 3), "G4", 128)
    assert np.array_equal(a, b)
    rows = [["x.jpg", 1, 0, 0, 0, 0]]
    demo_kit.tables._deterministic_xlsx(tmp_path / "a.xlsx", rows)
    time.sleep(1.1)  # zip entries would otherwise carry a different timestamp
    demo_kit.tables._deterministic_xlsx(tmp_path / "b.xlsx", rows)
    assert (tmp_path / "a.xlsx").read_bytes() == (tmp_path / "b.xlsx").read_bytes()


def test_tokenizer_words_are_single_tokens():
    vocab, merges = demo_kit.tokenizer._tokenizer_vocab()
    assert {"<|startoftext|>", "<|endoftext|>", "a</w>", "z</w>", "0</w>", "9</w>", "-</w>"} <= set(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for word in ("histopathology", "cribriform", "roseting", "gleason", "cancerous", "non"):
        assert word + "</w>" in vocab


@pytest.fixture(scope="module")
def model_and_processor(kit):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(kit / "model").eval()
    processor = AutoProcessor.from_pretrained(kit / "model")
    return model, processor


def test_model_loads_as_clip_with_plip_module_names(model_and_processor):
    from transformers import CLIPModel

    model, _ = model_and_processor
    assert isinstance(model, CLIPModel)
    names = dict(model.vision_model.named_modules())
    for name in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.v_proj",
                 "encoder.layers.0.layer_norm1", "encoder.layers.0.mlp.fc1"):
        assert name in names, name
    assert model.config.vision_config.image_size == 64
    assert model.config.projection_dim == 32
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-3)


def test_processor_tokenises_prompts(model_and_processor):
    model, processor = model_and_processor
    tok = processor.tokenizer
    enc = tok(["histopathology image of benign glands"], padding=True, truncation=True,
              max_length=77, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert len(ids) == 7  # <sot> + 5 words + <eot>
    assert ids[0] == tok.bos_token_id == model.config.text_config.bos_token_id
    assert ids[-1] == tok.eos_token_id == model.config.text_config.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id
    prompts = [t.replace("[CLS]", d) for d in DESCRIPTIONS.values() for t in TEMPLATES]
    enc = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert enc["input_ids"].shape[1] <= 16
    assert (enc["input_ids"] != tok.unk_token_id).sum() > 0
    # unknown words fall back to characters, not to <unk>
    out = tok(["zebra xylophone"], add_special_tokens=False)["input_ids"][0]
    assert len(out) > 2 and tok.unk_token_id not in out


@torch.no_grad()
def test_zero_shot_above_chance(kit, tables, model_and_processor):
    model, processor = model_and_processor
    df = tables["Test"]
    images = []
    for name in df["image_name"]:
        with Image.open(kit / "sicapv2" / "images" / name) as im:
            images.append(im.convert("RGB"))
    pixels = processor.image_processor(
        images=images, size={"height": 64, "width": 64}, do_center_crop=False, return_tensors="pt"
    )["pixel_values"]
    assert pixels.shape == (len(df), 3, 64, 64)
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    protos = []
    for cls in CLASSES:
        prompts = [t.replace("[CLS]", DESCRIPTIONS[cls]) for t in TEMPLATES]
        enc = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**enc).pooler_output)
        protos.append(F.normalize(F.normalize(txt, dim=-1).mean(dim=0), dim=-1))
    pred = (img @ torch.stack(protos).T).argmax(dim=1).numpy()
    true = df[CLASSES].to_numpy().argmax(axis=1)
    bacc = float(np.mean([np.mean(pred[true == k] == k) for k in range(4)]))
    assert 0.3 < bacc < 0.95, bacc


# -- never delete what the build did not create --------------------------------------------


def _no_build(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the kit was built although the target was refused")

    monkeypatch.setattr(demo_kit.tables, "write_dataset", fail)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("hpo-peft: error: ")]


def test_folder_with_other_files_is_refused_and_left_untouched(tmp_path, monkeypatch, capsys):
    from hpo_peft.app.cli import main

    _no_build(monkeypatch)
    x = tmp_path / "x"
    (x / "model").mkdir(parents=True)
    (x / "sicapv2").mkdir()
    (x / "model" / "important.bin").write_bytes(b"weights\x00\x01")
    (x / "sicapv2" / "notes.txt").write_text("my notes\n")
    assert main(["demo-kit", "--out", str(x)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(x) in lines[0] and "--force" in lines[0], lines
    assert (x / "model" / "important.bin").read_bytes() == b"weights\x00\x01"
    assert (x / "sicapv2" / "notes.txt").read_text() == "my notes\n"
    assert sorted(p.name for p in x.iterdir()) == ["model", "sicapv2"]
    assert list(tmp_path.iterdir()) == [x]  # no temporary sibling folder


def test_config_key_refuses_the_same_folder(tmp_path, monkeypatch):
    from hpo_peft.core.errors import UserError

    _no_build(monkeypatch)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "kit.json").write_text("not json")  # not a kit.json of ours
    with pytest.raises(UserError, match="--force"):
        build_demo_kit(tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "kit.json").read_text() == "not json"
    assert list(tmp_path.iterdir()) == [tmp_path / "x"]


@pytest.mark.parametrize("below", [False, True])
def test_out_an_existing_file_is_refused_before_building(tmp_path, monkeypatch, capsys, below):
    from hpo_peft.app.cli import main

    _no_build(monkeypatch)
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    out = target / "kit" if below else target
    t0 = time.perf_counter()
    assert main(["demo-kit", "--out", str(out), "--force"]) == 2
    assert time.perf_counter() - t0 < 1.0
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(out) in lines[0], lines
    assert target.read_text() == "keep me"
    assert list(tmp_path.iterdir()) == [target]  # nothing created next to it


def test_targets_that_may_be_built_into(tmp_path, monkeypatch):
    """Empty folders, and folders whose kit.json is ours (an older kit, or an install that was
    interrupted after it wrote its marker), pass the check without --force."""
    empty = tmp_path / "empty"
    empty.mkdir()
    demo_kit._check_target(empty, force=False)
    demo_kit._check_target(tmp_path / "new" / "deeper", force=False)
    for meta in ('{"kit_version": %d}' % (KIT_VERSION - 1), '{"kit_version": null}'):
        old = tmp_path / "old"
        (old / "model").mkdir(parents=True, exist_ok=True)
        (old / "kit.json").write_text(meta)
        demo_kit._check_target(old, force=False)


def test_install_into_an_old_kit_replaces_only_its_parts_quietly(tmp_path, capsys):
    """The swap alone (no build): an older kit's parts are replaced, nothing else is touched."""
    out, tmp = tmp_path / "demo", tmp_path / "demo.tmp-test"
    for folder in (out, tmp):
        (folder / "model").mkdir(parents=True)
        (folder / "sicapv2").mkdir()
        (folder / "open_clip_model").mkdir()
        (folder / "model" / "weights.bin").write_text(folder.name)
    (out / "kit.json").write_text('{"kit_version": %d}' % (KIT_VERSION - 1))
    (out / "mine.txt").write_text("mine")
    demo_kit._install(tmp, out, {"kit_version": KIT_VERSION}, force=False)
    assert demo_kit._is_complete(out)
    assert (out / "model" / "weights.bin").read_text() == "demo.tmp-test"
    assert (out / "mine.txt").read_text() == "mine"
    assert capsys.readouterr().err == ""


def test_the_refusal_names_every_part_that_force_replaces(tmp_path, monkeypatch, capsys):
    """--force replaces open_clip_model/ too: the refusal must say so, not only model/ and sicapv2/."""
    from hpo_peft.app.cli import main

    _no_build(monkeypatch)
    x = tmp_path / "x"
    (x / "open_clip_model").mkdir(parents=True)
    (x / "open_clip_model" / "mine.bin").write_bytes(b"mine")
    assert main(["demo-kit", "--out", str(x)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "to replace only its model/, sicapv2/, open_clip_model/ and kit.json" in lines[0], lines
    assert all((part if part == "kit.json" else f"{part}/") in lines[0] for part in demo_kit.KIT_PARTS)
    assert (x / "open_clip_model" / "mine.bin").read_bytes() == b"mine"


def _small_build(monkeypatch):
    """A real build, made small (a few images, two pre-training steps) to keep a test quick."""
    for module, name, value in (
        (demo_kit.tables, "N_TRAIN_PER_CLASS", 2), (demo_kit.tables, "N_TEST_PER_CLASS", 2),
        (demo_kit.tables, "N_TRAIN_MULTI", 1), (demo_kit.tables, "N_TRAIN_EMPTY", 1),
        (demo_kit.tiny_clip, "PRETRAIN_PER_CLASS", 2), (demo_kit.tiny_clip, "PRETRAIN_VAL_PER_CLASS", 1),
        (demo_kit.tiny_clip, "PRETRAIN_MAX_STEPS", 2), (demo_kit.tiny_clip, "PRETRAIN_DRAW_SIZE", 64),
    ):
        monkeypatch.setattr(module, name, value)


def test_kit_files_and_folders_get_the_umask_modes(tmp_path, monkeypatch):
    """safetensors and save_pretrained write 0600 files, mkdtemp makes 0700 folders: the kit
    installs them as a plain write would, so other users of the machine can read it."""
    import os
    import stat

    _small_build(monkeypatch)
    previous = os.umask(0o022)
    try:
        out = build_demo_kit(tmp_path / "kit", progress=False)
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if (tmp_path / p).is_dir() else 0o644)}
    assert not wrong, wrong


def test_force_replaces_only_the_kit_parts_and_says_so(tmp_path, monkeypatch, capsys):
    from hpo_peft.app.cli import main

    _small_build(monkeypatch)
    x = tmp_path / "x"
    (x / "model" / "sub").mkdir(parents=True)
    (x / "model" / "important.bin").write_bytes(b"old")
    (x / "model" / "sub" / "more.bin").write_bytes(b"old")
    (x / "open_clip_model").mkdir()
    (x / "open_clip_model" / "mine.bin").write_bytes(b"mine")
    (x / "kit.json").write_text("mine")
    (x / "notes.txt").write_text("keep")
    (x / "data").mkdir()
    (x / "data" / "table.csv").write_text("a,b\n")
    assert main(["demo-kit", "--out", str(x), "--force"]) == 0
    err = capsys.readouterr().err
    replaced = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("demo-kit: replacing")]
    assert replaced == [f"demo-kit: replacing existing {x / 'model'} (2 files)",
                        f"demo-kit: replacing existing {x / 'open_clip_model'} (1 file)",
                        f"demo-kit: replacing existing {x / 'kit.json'} (a file)"]
    assert (x / "notes.txt").read_text() == "keep"
    assert (x / "data" / "table.csv").read_text() == "a,b\n"
    assert demo_kit._is_complete(x)
    assert not (x / "model" / "important.bin").exists()
    assert sorted(p.name for p in x.iterdir()) == ["data", "kit.json", "model", "notes.txt", "open_clip_model", "sicapv2"]
    assert list(tmp_path.iterdir()) == [x]
