"""Model families (hpo_peft/models/): hf_clip (the demo kit's model), open_clip (the kit's
twin, loaded through `local-dir:` as QuiltNet is) and conch (its architecture, tiny), through one
trial path; LoRA at B = 0; trainable counts on full-size random-weight architectures; adapters
refused across families; a study on studies/demo_open_clip.yaml end to end."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from hpo_peft.core.config import ModelConfig, StudyConfig, TrainConfig
from hpo_peft.core.errors import UserError
from hpo_peft.methods import METHODS, method_config
from hpo_peft.models.classifier import build_classifier, count_trainable, load_base_model
from hpo_peft.models import BaseVLM, family_of
from hpo_peft.models.conch import conch_architecture
from hpo_peft.tracking.selection import select_best

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
TINY_CONCH = dict(image_size=64, width=64, layers=2, heads=2, patch_size=16, embed_dim=64, pooler_heads=2,
                  text_width=32, text_layers=1, text_heads=2, context_length=32)
FAMILIES = ["hf_clip", "open_clip", "conch"]
TRAINING_METHODS = ["affine_ln", "bias", "lora", "full", "clip_adapter"]


def open_clip_config(kit) -> dict:
    raw = yaml.safe_load((ROOT / "studies" / "demo_open_clip.yaml").read_text())
    raw["demo_kit"] = None
    raw["data"]["root"] = str(kit / "sicapv2")
    raw["model"]["name_or_path"] = str(kit / "open_clip_model")
    return raw


@pytest.fixture(scope="module")
def bases(demo_kit) -> dict[str, BaseVLM]:
    return {
        "hf_clip": load_base_model(ModelConfig(name_or_path=str(demo_kit / "model"))),
        "open_clip": load_base_model(ModelConfig(name_or_path=str(demo_kit / "open_clip_model"))),
        "conch": conch_architecture(**TINY_CONCH),
    }


@pytest.fixture(scope="module")
def workspaces(demo_kit, bases):
    from hpo_peft.fewshot.trial import open_workspace

    raw = open_clip_config(demo_kit)
    raw["data"]["val_shots"] = 8
    raw["train"]["max_epochs"] = 2
    config = StudyConfig.model_validate(raw)
    return {name: open_workspace(config, base) for name, base in bases.items()}


def test_the_family_is_inferred_where_the_source_says_it(demo_kit, tmp_path):
    def family(source, **kw):
        return family_of(ModelConfig(name_or_path=source, **kw)).name

    assert family(str(demo_kit / "model")) == "hf_clip"
    assert family("vinid/plip") == "hf_clip"
    assert family(str(demo_kit / "open_clip_model")) == "open_clip"
    assert family("hf-hub:wisdomik/QuiltNet-B-32") == "open_clip"
    assert family(f"local-dir:{demo_kit / 'open_clip_model'}") == "open_clip"
    assert family("hf_hub:MahmoodLab/conch") == "conch"
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text("{}")
    (both / "open_clip_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"model\.family: .* could be hf_clip or open_clip .* set model\.family"):
        family(str(both))
    assert family(str(both), family="open_clip") == "open_clip"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_trial_code_path_runs_on_every_family(workspaces, family):
    from hpo_peft.fewshot.trial import run_trial

    workspace = workspaces[family]
    assert workspace.base.family.name == family
    train = workspace.config.train
    zero_shot = run_trial(workspace, "zero_shot", {}, train, progress=False)
    head = workspace.prototypes.numel()
    assert zero_shot.trainable_parameters == 0 and 0 <= zero_shot.validation.balanced_accuracy <= 100
    for name in TRAINING_METHODS:
        outcome = run_trial(workspace, name, {}, train, progress=False)
        assert outcome.trainable_parameters > (head if name != "clip_adapter" else 0), name
        assert len(outcome.training.history) == 2 and outcome.validation.loss > 0, name


def _logits(classifier, pixels):
    with torch.no_grad():
        return classifier(pixels)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_b_zero_equals_the_base_model_and_only_q_k_v_deltas_train(bases, family):
    base = bases[family]
    pixels = torch.randn(3, 3, base.preprocessing.height, base.preprocessing.width)
    with torch.no_grad():
        prototypes = torch.randn(4, base.image_encoder()(pixels).shape[1])
    plain = build_classifier(base, prototypes)
    lora = METHODS["lora"].prepare(build_classifier(base, prototypes), method_config("lora", {"rank": 4}))
    assert torch.equal(_logits(lora, pixels), _logits(plain, pixels))
    trained = {n for n, p in lora.encoder.named_parameters() if p.requires_grad}
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    assert len(trained) == 2 * 3 * 2  # an A and a B for each of q, k, v in every block
    perturbed = METHODS["lora"].prepare(build_classifier(base, prototypes),
                                        method_config("lora", {"rank": 4, "b_init": "random"}))
    assert not torch.allclose(_logits(perturbed, pixels), _logits(plain, pixels))


def test_fused_lora_is_separate_q_k_v_lora(bases):
    """The fused weight moves by s B_q A_q, s B_k A_k, s B_v A_v in its q, k, v row blocks."""
    base = bases["open_clip"]
    lora = METHODS["lora"].prepare(build_classifier(base, torch.randn(4, 64)),
                                   method_config("lora", {"rank": 2, "alpha": 4, "b_init": "random",
                                                          "target_modules": ["q_proj", "v_proj"]}))
    attn = lora.encoder.visual.transformer.resblocks[0].attn
    original = attn.parametrizations.in_proj_weight.original
    delta = attn.parametrizations.in_proj_weight[0]
    d = original.shape[1]
    moved = attn.in_proj_weight - original
    assert torch.allclose(moved[:d], 2.0 * delta.lora_B_q @ delta.lora_A_q)
    assert torch.equal(moved[d:2 * d], torch.zeros_like(moved[d:2 * d]))  # k not targeted
    assert torch.allclose(moved[2 * d:], 2.0 * delta.lora_B_v @ delta.lora_A_v)
    assert not original.requires_grad


def _plip_architecture() -> BaseVLM:
    from transformers import CLIPConfig, CLIPModel

    from hpo_peft.models import FAMILIES as REGISTRY

    config = CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2), projection_dim=512)
    return BaseVLM("plip-architecture", None, CLIPModel(config).eval(), None, None, REGISTRY["hf_clip"])


def _quiltnet_architecture() -> BaseVLM:
    import open_clip

    from hpo_peft.models import FAMILIES as REGISTRY

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()  # QuiltNet-B-32's model_cfg
    return BaseVLM("quiltnet-architecture", None, model, None, None, REGISTRY["open_clip"])


# trainable parameters besides the 4 x 512 head; LoRA at rank 4 (55,296 x rank on both ViT-B)
FULL_SIZE_COUNTS = {
    "plip": {"affine_ln": 36_864, "bias": 102_912, "lora": 221_184, "full": 87_849_216},
    "quiltnet": {"affine_ln": 36_864, "bias": 102_912, "lora": 221_184, "full": 87_849_216},
    "conch": {"affine_ln": 36_864, "bias": 106_752, "lora": 221_184, "full": 87_829_248},
}


@pytest.mark.parametrize("architecture", ["plip", "quiltnet", "conch"])
@pytest.mark.slow
def test_trainable_counts_per_family_on_full_size_architectures(architecture):
    base = {"plip": _plip_architecture, "quiltnet": _quiltnet_architecture, "conch": conch_architecture}[architecture]()
    prototypes = torch.randn(4, 512)
    counts = {}
    for name in ("affine_ln", "bias", "lora", "full"):
        classifier = METHODS[name].prepare(build_classifier(base, prototypes), method_config(name, {"rank": 4} if name == "lora" else {}))
        counts[name] = count_trainable(classifier) - prototypes.numel()
        del classifier
    assert counts == FULL_SIZE_COUNTS[architecture]


def test_an_adapter_saved_on_one_family_is_refused_by_another(workspaces, tmp_path):
    from hpo_peft.fewshot.artifacts import load_adapter, save_adapter
    from hpo_peft.fewshot.trial import run_trial

    workspace = workspaces["open_clip"]
    outcome = run_trial(workspace, "lora", {"rank": 2, "b_init": "random"}, workspace.config.train, progress=False)
    folder = save_adapter(tmp_path / "adapter", outcome.classifier, workspace.base, "lora", outcome.method_options,
                          workspace.config)
    assert json.loads((folder / "hpo_peft_adapter.json").read_text())["base_model"]["family"] == "open_clip"
    pixels = torch.randn(2, 3, 64, 64)
    reloaded, _ = load_adapter(folder, workspace.base)
    assert torch.equal(_logits(reloaded, pixels), _logits(outcome.classifier.cpu().eval(), pixels))
    for other in ("hf_clip", "conch"):
        with pytest.raises(UserError, match=rf"adapter was built on a open_clip model .* is a {other} model"):
            load_adapter(folder, workspaces[other].base)


STUDY_SEARCH = {
    "n_trials": 2,
    "sampler": {"name": "random", "seed": 3},
    "pruner": {"name": "none"},
    "params": {"method": {"choices": ["lora"]}, "learning_rate": {"low": 0.002, "high": 0.01, "log": True},
               "max_epochs": 3, "patience": 2},
    "methods": {"lora": {"rank": {"choices": [2, 4]}}},
}


def _study(tmp, raw, name):
    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.study.session import StudyLocation, run_study

    raw = {**raw, "search": STUDY_SEARCH, "name": name}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    location = StudyLocation(name, storage=str(tmp / f"{name}.journal"), tracking_uri="sqlite:///" + str(tmp / "mlflow.db"))
    study = run_study(prepare_study_config(path, []), location, n_trials=2, timeout=None)
    return path, location, study


def _run_shape(client, run):
    return (set(run.data.params), set(run.data.metrics), {k for k in run.data.tags if k.startswith("hpo_peft.")},
            {a.path for a in client.list_artifacts(run.info.run_id)})


@pytest.mark.slow
def test_a_study_on_demo_open_clip_logs_as_plip_and_evaluate_reproduces_it_in_a_fresh_process(
        demo_kit, tmp_path, workspaces):
    from conftest import demo_config_dict
    from mlflow import MlflowClient

    from hpo_peft.data import load_test
    from hpo_peft.fewshot.evaluate import evaluate
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.fewshot.trial import open_workspace, run_trial

    shutil.copytree(demo_kit / "sicapv2", tmp_path / "sicapv2")
    shapes = {}
    for name, raw in (("plip", demo_config_dict(demo_kit)), ("oc", open_clip_config(demo_kit))):
        raw["data"]["root"] = str(tmp_path / "sicapv2")
        path, location, study = _study(tmp_path, raw, name)
        client = MlflowClient(location.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        shapes[name] = {r.data.tags["hpo_peft.run_kind"] + ":" + r.data.params.get("method", ""): _run_shape(client, r)
                        for r in runs}
    assert set(shapes["oc"]) == set(shapes["plip"]) == {"study_session:", "trial:lora"}
    for key in set(shapes["oc"]) & set(shapes["plip"]):
        assert shapes["oc"][key] == shapes["plip"][key], key
    out = subprocess.run([sys.executable, "-m", "hpo_peft.app.cli", "evaluate", str(path), "--study-name", "oc",
                          "--storage", location.storage, "--tracking-uri", location.tracking_uri, "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    fresh = json.loads(out.stdout)
    best = select_best(study.trials)
    assert fresh["mlflow_run_id"] == best.user_attrs[RUN_ID_ATTR]
    config = StudyConfig.model_validate(yaml.safe_load(path.read_text()))
    workspace = open_workspace(config, workspaces["open_clip"].base)
    params = dict(best.params)
    method = params.pop("method")
    options = {k.split(".", 1)[1]: params.pop(k) for k in list(params) if k.startswith(method + ".")}
    train = TrainConfig.model_validate({**config.train.model_dump(), **params, "max_epochs": 3, "patience": 2})
    outcome = run_trial(workspace, method, options, train, progress=False)
    assert outcome.validation.balanced_accuracy == pytest.approx(best.value)
    test = evaluate(outcome.classifier, load_test(config.data, workspace.base.preprocessing),
                    workspace.base.preprocessing, config.data.categories)
    assert fresh["balanced_accuracy"] == pytest.approx(test.balanced_accuracy, abs=1e-9)


@pytest.mark.parametrize("where, value, message", [
    ("methods", {"lora": {"dropout": 0.1}}, r"^methods\.lora\.dropout: LoRA dropout is not available where q, k and v are fused"),
    ("methods", {"lora": {"target_modules": ["q_proj", "out_proj"]}}, r"^methods\.lora\.target_modules: \['out_proj'\] cannot"),
    ("search", {"lora": {"dropout": {"choices": [0.0, 0.05]}}},
     r"^search\.methods\.lora\.dropout can draw 0\.05: methods\.lora\.dropout: LoRA dropout is not available"),
])
def test_a_lora_option_the_family_cannot_run_is_one_line_before_anything_loads(demo_kit, tmp_path, capsys,
                                                                               refuse_model_loading, where, value, message):
    """On a family whose attention fuses q, k and v, a LoRA option it cannot run stops the command with
    exit 2 and one line naming the key and the family, before the model loads; never a FAILED trial."""
    from hpo_peft.app.cli import main

    raw = open_clip_config(demo_kit)
    if where == "methods":
        raw["methods"] = {**raw.get("methods", {}), **value}
    else:
        raw["search"]["params"]["method"] = "lora"
        raw["search"]["methods"] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["study", "run", str(path), "--storage", str(tmp_path / "o.journal"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--n-trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("hpo-peft: error: ") and err[0].endswith("(model.family open_clip)")
    assert re.search(message, err[0].removeprefix("hpo-peft: error: ")), err[0]
    assert not (tmp_path / "o.journal").exists() and not (tmp_path / "m.db").exists()
