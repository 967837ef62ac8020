"""Prompt learning, CoOp and KgCoOp (REFERENCE.md, "Methods the benchmark adds"): context counts,
the start from a template's tokens, KgCoOp's penalty, save/load and its refusals, the family
refusal, a trial per method and a study that draws every new method."""

import copy
import dataclasses
import json

import pytest
import torch

from hpo_peft.fewshot.artifacts import load_adapter, save_adapter
from hpo_peft.core.config import ModelConfig, TrainConfig
from hpo_peft.core.errors import UserError
from hpo_peft.methods import METHODS, method_config
from hpo_peft.models.classifier import build_classifier, class_names, count_trainable, load_base_model
from hpo_peft.models import Family
from hpo_peft.models.conch import conch_architecture
from hpo_peft.fewshot.trial import run_trial

TEMPLATE = "a histopathology slide showing"


def _coop(base, prototypes, names, name="coop", **options):
    return METHODS[name].prepare(build_classifier(base, prototypes, names), method_config(name, options))


def test_context_parameters_are_m_by_width_shared_and_n_by_m_by_width_class_specific(demo_workspace):
    ws = demo_workspace
    names = class_names(ws.config.prompts, ws.config.data.categories)
    width = ws.base.clip.text_model.embeddings.token_embedding.embedding_dim
    shared = _coop(ws.base, ws.prototypes, names)
    assert count_trainable(shared) == 16 * width and shared.head.ctx.shape == (16, width)
    assert count_trainable(_coop(ws.base, ws.prototypes, names, n_ctx=4, class_specific=True)) == 4 * 4 * width
    assert count_trainable(_coop(ws.base, ws.prototypes, names, "kgcoop", init_text=TEMPLATE)) == 4 * width  # 4 tokens
    assert not any(p.requires_grad for p in shared.encoder.parameters()) and not shared.head.weight.requires_grad
    assert set(shared.head.state_dict()) == {"weight", "logit_scale", "ctx"}  # never the text tower


@pytest.mark.parametrize("family", ["hf_clip", "open_clip", "conch"])
def test_a_context_from_a_templates_tokens_gives_that_templates_class_embeddings(demo_kit, demo_workspace, family):
    base = {"hf_clip": lambda: demo_workspace.base,
            "open_clip": lambda: load_base_model(ModelConfig(name_or_path=str(demo_kit / "open_clip_model"))),
            "conch": lambda: conch_architecture(image_size=32, width=32, layers=1, heads=2, patch_size=16, embed_dim=16,
                                                pooler_heads=2, text_width=32, text_layers=2, text_heads=2)}[family]()
    names = ["benign glands", "atrophic dense glands", "tumour"]
    with torch.no_grad():
        expected = base.family.encode_text(base, [f"{TEMPLATE} {name}." for name in names]).float()
        prototypes = torch.nn.functional.normalize(torch.randn_like(expected), dim=-1)
        for specific in (False, True):
            head = _coop(base, prototypes, names, "kgcoop", init_text=TEMPLATE, class_specific=specific).head
            assert torch.allclose(head.class_embeddings(), torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)
        features = torch.nn.functional.normalize(torch.randn(5, expected.shape[1]), dim=-1)
        assert torch.allclose(head.eval()(features), features @ head.class_embeddings().t() * base.logit_scale.exp(), atol=1e-5)
    head.train()(features)  # KgCoOp: lambda * mean_c ||w_c - w_c^zs||^2 against the zero-shot prototypes
    learned = torch.nn.functional.normalize(expected, dim=-1)
    assert torch.allclose(head.penalty(), 8.0 * (learned - prototypes).pow(2).sum(-1).mean(), atol=1e-5)
    assert _coop(base, prototypes, names, init_text=TEMPLATE).head.penalty() is None  # CoOp has none


def test_a_family_that_cannot_run_text_from_embeddings_refuses_before_training(demo_workspace):
    class Plain(Family):
        name = "plain"

        def image_encoder(self, model):
            return demo_workspace.base.image_encoder()

    base = dataclasses.replace(demo_workspace.base, family=Plain())
    for name in ("coop", "kgcoop"):
        with pytest.raises(UserError, match="model family plain cannot run its text encoder from token embeddings"):
            _coop(base, demo_workspace.prototypes, ["a", "b", "c", "d"], name)
    with pytest.raises(UserError, match="prompt learning needs the class names"):
        METHODS["coop"].prepare(build_classifier(demo_workspace.base, demo_workspace.prototypes), method_config("coop", {}))


def test_coop_trains_its_context_and_loads_exactly_on_its_own_model_only(demo_workspace, tmp_path):
    ws = demo_workspace
    train = ws.config.train_for("coop").model_copy(update={"max_epochs": 3, "learning_rate": 0.05, "patience": None})
    assert (train.optimizer, train.momentum, train.weight_decay, train.batch_size) == ("sgd", 0.9, 5e-4, 32)
    outcome = run_trial(ws, "coop", {"n_ctx": 4}, train, progress=False)
    assert outcome.trainable_parameters == 4 * outcome.classifier.head.ctx.shape[1]
    folder = save_adapter(tmp_path / "a", outcome.classifier, ws.base, "coop", outcome.method_options, ws.config)
    loaded, metadata = load_adapter(folder, ws.base)
    pixels = ws.base.preprocessing.normalize(ws.data.val.images.to(ws.prototypes.device))
    with torch.no_grad():
        assert torch.equal(loaded(pixels), outcome.classifier(pixels))
    record = json.loads((folder / "prompt_learner.json").read_text())
    assert record["prompts"][0] == "X X X X benign glands." and metadata["method"]["config"]["n_ctx"] == 4
    other = dataclasses.replace(ws.base, clip=copy.deepcopy(ws.base.clip))  # same image side, another text tower
    with torch.no_grad():
        other.clip.text_model.final_layer_norm.weight.mul_(1.01)
    assert other.fingerprint() == ws.base.fingerprint()
    with pytest.raises(UserError, match="prompts were learned on another model"):
        load_adapter(folder, other)


@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_trial_command_runs_and_saves(write_config, tmp_path, capsys, method):
    from hpo_peft.app.cli import main

    config = write_config(method_train={method: {"max_epochs": 2}}, train={"device": "cpu"},
                          methods={method: {"init_text": TEMPLATE}})
    code = main(["trial", str(config), "--method", method, "--save", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "test balanced accuracy" in out and (tmp_path / "adapter" / "prompt_learner.json").is_file()


@pytest.mark.slow
def test_a_study_draws_every_new_method(write_config, tmp_path, capsys):
    from hpo_peft.app.cli import main

    new = ["tip_adapter", "tip_adapter_f", "coop", "kgcoop"]
    search = {"n_trials": 4, "start": "race", "sampler": {"name": "random", "seed": 1}, "pruner": {"name": "none"},
              "params": {"method": {"choices": new}, "patience": 2},
              "methods": {"tip_adapter": {"alpha": {"low": 0.0, "high": 10.0}}, "kgcoop": {"kg_lambda": {"low": 1.0, "high": 8.0}}}}
    config = write_config(search=search, train={"device": "cpu"}, method_train={m: {"max_epochs": 2} for m in new[1:]})
    code = main(["study", "run", str(config), "--storage", f"sqlite:///{tmp_path}/optuna.db",
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    from hpo_peft.study.session import StudyLocation, load_study

    trials = load_study(StudyLocation("demo", f"sqlite:///{tmp_path}/optuna.db")).trials
    assert sorted(t.params["method"] for t in trials) == sorted(new) and all(t.value is not None for t in trials)
