"""Exact logits: the head, its logits, the arg-max and every metric are fp32 whatever the encoder's
precision; under bf16 autocast only the encoder's matmuls are bf16."""

import math

import torch

from hpo_peft.core.config import TrainConfig
from hpo_peft.fewshot.evaluate import compute_metrics, forward_in_batches
from hpo_peft.fewshot.features import FeatureCache
from hpo_peft.methods import METHODS, method_config
from hpo_peft.methods.black_box import CLAPHead, CLIPAdapterHead, LinearProbeHead
from hpo_peft.models.classifier import ZeroShotHead, build_classifier
from hpo_peft.fewshot.train import train

BF16 = torch.autocast("cpu", torch.bfloat16)


def random_head(classes=4, dim=16, scale=100.0):
    prototypes = torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return ZeroShotHead(prototypes, torch.tensor(scale).log())


def bf16_features(n=32, dim=16):
    """Unit features as a bf16 encoder hands them over."""
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=-1).bfloat16()


def test_head_under_bf16_autocast_gives_the_fp32_logits_of_the_same_features():
    zero_shot = random_head()
    features = bf16_features()
    for head in (zero_shot, LinearProbeHead(zero_shot), CLAPHead(zero_shot)):
        with torch.no_grad():
            expected = head(features.float())  # outside autocast, fp32
            with BF16:
                logits = head(features)
        assert logits.dtype == torch.float32
        assert torch.equal(logits, expected)
        via_eval = forward_in_batches(head, features, None, amp_dtype=torch.bfloat16)
        assert torch.equal(via_eval, expected)
        assert torch.equal(via_eval.argmax(1), expected.argmax(1))
    adapter = CLIPAdapterHead(zero_shot, alpha=0.5, hidden=4)  # its small MLP may run in bf16; the head may not
    with torch.no_grad(), BF16:
        assert adapter(features).dtype == torch.float32


def near_tie_head_and_features():
    """Class 1 beats class 0 by ~0.02 logits for sample 0, class 0 beats class 1 by ~0.02 for sample 1,
    at logits ~25 where one bf16 step is 0.125: in bf16 both samples tie and the arg-max says 0."""
    prototypes = torch.tensor([[0.25, math.sqrt(1 - 0.25**2), 0.0], [0.2502, 0.0, math.sqrt(1 - 0.2502**2)]])
    head = ZeroShotHead(prototypes, torch.tensor(100.0).log())
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0004, 0.0]]), dim=-1)
    return head, features


def test_a_near_tie_is_not_resolved_towards_the_first_class():
    head, features = near_tie_head_and_features()
    exact = features.double() @ torch.nn.functional.normalize(head.weight.double(), dim=-1).t() * 100.0
    assert exact[0, 1] - exact[0, 0] > 0.01 and exact[1, 0] - exact[1, 1] > 0.01  # less than a bf16 step (0.125)
    logits = forward_in_batches(head, features, None, amp_dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    assert logits.argmax(1).tolist() == [1, 0]
    assert torch.allclose(logits.double(), exact, atol=1e-4)
    metrics = compute_metrics(logits, torch.tensor([1, 0]), ["a", "b"])
    assert metrics.balanced_accuracy == 100.0 and metrics.confusion == [[1, 0], [0, 1]]


def test_encoder_features_and_the_feature_cache_are_fp32_unit_vectors_under_bf16(demo_workspace):
    base = demo_workspace.base
    pixels = base.preprocessing.normalize(demo_workspace.data.val.images[:16])
    with torch.no_grad(), BF16:
        features = base.image_encoder()(pixels)
    assert features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(len(features)), atol=1e-6)
    cache = FeatureCache(base.image_encoder(), "test_logits-bf16", base.preprocessing)
    cached = cache(demo_workspace.data.val, torch.bfloat16)
    assert cached.dtype == torch.float32
    assert torch.allclose(cached.norm(dim=-1), torch.ones(len(cached)), atol=1e-6)


def test_classifier_under_bf16_autocast_predicts_from_fp32_logits_of_its_features(demo_workspace):
    classifier = build_classifier(demo_workspace.base, demo_workspace.prototypes)
    pixels = demo_workspace.base.preprocessing.normalize(demo_workspace.data.val.images.to(demo_workspace.prototypes.device))
    with torch.no_grad():
        with BF16:
            logits = classifier(pixels)
            features = classifier.encoder(pixels)
        expected = classifier.head(features)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)


def test_training_under_bf16_computes_its_loss_on_fp32_logits(demo_workspace):
    classifier = METHODS["bias"].prepare(build_classifier(demo_workspace.base, demo_workspace.prototypes), method_config("bias", {}))
    dtypes = []
    classifier.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    config = TrainConfig(optimizer="sgd", learning_rate=0.01, max_epochs=1, patience=None, precision="bf16")
    train(classifier, demo_workspace.data, demo_workspace.base.preprocessing, demo_workspace.config.data.categories,
          config, seed=1, progress=False)
    assert dtypes and set(dtypes) == {torch.float32}
