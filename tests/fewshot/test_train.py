"""Training on the demo kit: every trainable method learns, early stopping restores the best epoch."""

import pytest

from hpo_peft.core.config import TrainConfig
from hpo_peft.fewshot.evaluate import evaluate
from hpo_peft.core.runtime import amp_dtype
from hpo_peft.fewshot.train import EpochMetrics, _is_better
from hpo_peft.fewshot.trial import run_trial

DEMO_TRAIN = dict(learning_rate=0.003, max_epochs=15, patience=5, batch_size=32)


@pytest.mark.parametrize("method, options", [("affine_ln", {}), ("bias", {}), ("lora", {"rank": 4}), ("full", {})])
def test_every_trainable_method_beats_chance(demo_workspace, method, options):
    outcome = run_trial(demo_workspace, method, options, TrainConfig(**DEMO_TRAIN), progress=False)
    assert outcome.validation.balanced_accuracy > 25.0 + 15.0  # chance is 25% for 4 classes
    first = outcome.training.history[0].train_loss
    assert outcome.training.best.train_loss < first


def test_early_stopping_restores_the_best_epoch(demo_workspace):
    seen = []
    config = TrainConfig(learning_rate=0.05, max_epochs=25, patience=3)  # a rate high enough to overshoot
    outcome = run_trial(demo_workspace, "bias", {}, config, on_epoch=seen.append, progress=False)
    best = outcome.training.best
    assert seen == outcome.training.history
    assert best == max(seen, key=lambda m: (m.val_balanced_accuracy, -m.val_loss))
    # the weights in hand are the best epoch's: re-evaluating them gives its validation figures
    device = next(outcome.classifier.parameters()).device  # scored as in training (bf16 encoder under auto)
    again = evaluate(outcome.classifier, demo_workspace.data.val, demo_workspace.base.preprocessing,
                     demo_workspace.config.data.categories, amp_dtype=amp_dtype(config.precision, device))
    assert again.balanced_accuracy == pytest.approx(best.val_balanced_accuracy)
    assert again.loss == pytest.approx(best.val_loss, rel=1e-5)
    # the score: the best epoch's balanced accuracy averaged with its neighbours' (never above it)
    window = seen[max(0, best.epoch - 2):best.epoch + 1]
    assert outcome.validation.balanced_accuracy == pytest.approx(sum(m.val_balanced_accuracy for m in window) / len(window))
    assert outcome.validation.balanced_accuracy <= best.val_balanced_accuracy
    assert outcome.validation.loss == pytest.approx(sum(m.val_loss for m in window) / len(window))
    assert outcome.validation.per_class_recall == outcome.training.best_validation.per_class_recall  # the kept epoch's
    assert len(seen) > best.epoch  # it did train past the best epoch, so restoring mattered
    if outcome.training.stopped_early:
        assert len(seen) == best.epoch + 3


def test_ties_in_accuracy_are_broken_by_validation_loss():
    best = EpochMetrics(1, 1.0, 0.8, 50.0)
    assert _is_better(EpochMetrics(2, 1.0, 0.7, 50.0), best)
    assert not _is_better(EpochMetrics(2, 1.0, 0.9, 50.0), best)
    assert _is_better(EpochMetrics(2, 1.0, 2.0, 51.0), best)


def test_zero_shot_trains_nothing(demo_workspace):
    outcome = run_trial(demo_workspace, "zero_shot", {}, TrainConfig(), progress=False)
    assert outcome.trainable_parameters == 0 and outcome.training.history == []
    assert 0 <= outcome.validation.balanced_accuracy <= 100


def test_dihedral_augmentation_draws_each_of_the_squares_8_symmetries_per_image():
    import torch

    from hpo_peft.fewshot.train import dihedral

    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(1, 3, 4, 4)
    flips = [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]
    symmetries = flips + [f.transpose(-1, -2) for f in flips]
    assert len({s.numpy().tobytes() for s in symmetries}) == 8
    torch.manual_seed(0)
    batch = dihedral(image.repeat(800, 1, 1, 1))
    counts = [sum(bool(torch.equal(b, s[0])) for b in batch) for s in symmetries]
    assert sum(counts) == 800 and min(counts) > 60  # each image one of the 8, all 8 drawn (100 expected each)
    torch.manual_seed(0)
    assert torch.equal(dihedral(image.repeat(800, 1, 1, 1)), batch)  # from torch's seeded stream
    wide = torch.zeros(5, 3, 4, 6, dtype=torch.uint8)
    assert dihedral(wide).shape == wide.shape  # a non-square image is flipped, never transposed


def test_augmentation_trains_encoder_methods_on_turned_images_and_black_box_runs_record_none(demo_workspace, demo_kit,
                                                                                          tmp_path):
    import optuna
    from conftest import write_demo_config

    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.fewshot.settings import merged_train
    from hpo_peft.study.search_space import sample_plan

    settings = dict(DEMO_TRAIN, max_epochs=3, patience=None)
    plain = run_trial(demo_workspace, "bias", {}, TrainConfig(**settings), progress=False)
    turned = [run_trial(demo_workspace, "bias", {}, TrainConfig(**settings, augment="dihedral"), progress=False)
              for _ in range(2)]
    losses = [[m.train_loss for m in outcome.training.history] for outcome in (plain, *turned)]
    assert losses[1] != losses[0]  # the encoder saw other pixels ...
    assert losses[1] == losses[2]  # ... drawn from the trial's seeded stream: a rerun is the same

    config = prepare_study_config(write_demo_config(demo_kit, tmp_path / "c.yaml", train={"augment": "dihedral"}, search={
        "params": {"method": {"choices": ["clap", "lora"]}, "augment": {"choices": ["none", "dihedral"]}}}), [])
    assert merged_train(config, "lora").augment == "dihedral"
    assert merged_train(config, "clap").augment == "none"  # features computed once: no image to turn
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for method in ("clap", "lora"):
        study.enqueue_trial({"method": method})
    plans = [sample_plan(study.ask(), config) for _ in range(2)]
    assert plans[0].train.augment == "none" and "augment" not in study.trials[0].params  # not drawn for clap
    assert "augment" in study.trials[1].params and plans[1].train.augment == study.trials[1].params["augment"]
