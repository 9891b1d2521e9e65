"""Every engine's per-sample gradient norms equal brute-force per-example backward passes (float64), for
every layer type of both models under every normalization, also with augmentation multiplicity (an example's
gradient is the mean over its K views); and the noise-free DP update of every engine equals the brute-force
clipped mean."""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from dp_layers import refresh_public_statistics
from dp_layers.augmult import ViewAveragedCrossEntropy, mean_views, views_per_example
from dp_layers.bk import BookKeepingGradSampleModule, BookKeepingLoss
from dp_layers.norm_rules import OPACUS_NORM_SAMPLERS
from src import cifar10, mnist
from src.config import ModelConfig, build_config
from src.data import ImageTensorDataset
from src.accounting import plan_privacy
from src.engines import PRIVATE_ENGINES  # every private engine in the registry
from src.augment import AugmentedViews
from src.loop import _physical_step
from src.privacy import attach

NORMS = ["none", "group", "layer", "instance", "bn-public"]
# (dataset, image shape, examples per batch): two ResNet-18 examples in float64 show per-sample separation as well
# as more would, at a third less of the suite's time.
MODELS = {"mnist": (mnist.DATASET, (1, 28, 28), 5), "cifar10": (cifar10.DATASET, (3, 32, 32), 2)}
# (norm, dataset) pairs that add no case: "layer" is GroupNorm with one group, the module and per-sample rule that
# ResNet-18's "group" runs already; LeNet-5 covers its one-group form.
REDUNDANT = {("layer", "cifar10")}


def norm_and_dataset():
    return [pytest.param(norm, dataset, id=f"{norm}-{dataset}") for dataset in MODELS for norm in NORMS
            if (norm, dataset) not in REDUNDANT]


def build(dataset: str, norm: str, dtype=torch.float64, ws: bool = False):
    spec, shape, _ = MODELS[dataset]
    torch.manual_seed(0)
    model = spec.build_model(ModelConfig(norm=norm, act="tanh", ws=ws)).to(dtype)
    if norm == "bn-public":
        refresh_public_statistics(model, torch.rand(16, *shape, dtype=dtype))
    return model


def brute_force(model, images, labels, views: int = 1):
    """Per-example gradients from separate backward passes: (list of per-param (B, ...) tensors, norms).
    With ``views`` K, rows i*K .. i*K+K-1 are the views of example i, whose loss is their mean."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [slice(i * views, (i + 1) * views) for i in range(len(images) // views)]
    per_example = [torch.autograd.grad(F.cross_entropy(model(images[r]), labels[r]), params) for r in rows]
    stacked = [torch.stack(g) for g in zip(*per_example)]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    return stacked, norms


def engine_norms(engine: str, model, images, labels, views: int = 1) -> torch.Tensor:
    """Per-sample gradient norms as the engine computes them for clipping (with ``views`` augmult views per
    example, as the training loop runs it: inside ``views_per_example``)."""
    with views_per_example(views):
        return _engine_norms(engine, model, images, labels, views)


def _engine_norms(engine: str, model, images, labels, views: int) -> torch.Tensor:
    if engine in ("hooks", "functorch"):
        wrapped = GradSampleModule(model, loss_reduction="mean", force_functorch=engine == "functorch")
        F.cross_entropy(wrapped(images), labels).backward()
        per_example = [mean_views(p.grad_sample, views) for p in model.parameters()]  # Training.group_views
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1).pow(2) for g in per_example]).sum(0).sqrt()
    elif engine in ("ghost", "mixed-ghost"):
        wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", max_grad_norm=1.0)
        if engine == "ghost":
            wrapped.NORM_SAMPLERS = dict(OPACUS_NORM_SAMPLERS)
        F.cross_entropy(wrapped(images), labels).backward()
        norms = wrapped.get_norm_sample()
    else:
        wrapped = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=1.0)
        BookKeepingLoss(wrapped, ViewAveragedCrossEntropy(views))(wrapped(images), labels).backward()
        norms = wrapped.per_sample_gradient_norms
    wrapped._close()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        for attribute in ("grad_sample", "_norm_sample", "summed_grad"):
            if hasattr(p, attribute):
                delattr(p, attribute)
    return norms.detach()


def assert_exact_norms(engines, model, images, labels, label: str, views: int = 1) -> None:
    """Every engine's per-sample norms (one per example) equal the brute-force ones to 1e-6, relative."""
    _, expected = brute_force(model, images, labels, views)
    for engine in engines:
        got = engine_norms(engine, model, images, labels, views)
        assert got.shape == (len(images) // views,), f"{label}/{engine}: {tuple(got.shape)}"
        relative = ((got - expected).abs() / expected).max().item()
        assert relative <= 1e-6, f"{label}/{engine}: relative error {relative:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("norm,dataset", norm_and_dataset())
def test_per_sample_norms_of_every_engine_are_exact(dataset, norm):
    _, shape, batch = MODELS[dataset]
    model = build(dataset, norm)
    torch.manual_seed(1)
    images, labels = torch.rand(batch, *shape, dtype=torch.float64), torch.randint(0, 10, (batch,))
    assert_exact_norms(PRIVATE_ENGINES, model, images, labels, f"{dataset}/{norm}")


AUGMULT_ENGINES = [e for e in PRIVATE_ENGINES if e != "ghost"]  # stock Opacus ghost is refused with --augmult
AUGMULT = {"mnist": (2, 3), "cifar10": (2, 2)}  # (examples, views per example)


@pytest.mark.slow
@pytest.mark.parametrize("norm,dataset", norm_and_dataset())
def test_augmult_norms_of_every_engine_are_exact(dataset, norm):
    """The norm each engine clips is that of the mean of an example's K view gradients (cross terms
    between views included), not of each view's."""
    _, shape, _ = MODELS[dataset]
    examples, views = AUGMULT[dataset]
    model = build(dataset, norm)
    torch.manual_seed(3)
    images = torch.rand(examples * views, *shape, dtype=torch.float64)
    labels = torch.randint(0, 10, (examples,)).repeat_interleave(views)
    _, expected = brute_force(model, images, labels, views)
    per_view = brute_force(model, images, labels)[1]
    assert not torch.allclose(per_view[::views], expected)  # the grouping matters for this test to mean anything
    assert_exact_norms(AUGMULT_ENGINES, model, images, labels, f"{dataset}/{norm}", views)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(MODELS))
@pytest.mark.parametrize("norm", ["group", "none", "bn-public"])
def test_weight_standardized_norms_of_every_engine_are_exact(dataset, norm):
    """--ws: every engine clips the raw weight's per-sample gradient, taken through the standardization (the
    ResNet's stages 3-4 use the ghost form, LeNet-5 and the early stages instantiate); with augmult too."""
    _, shape, batch = MODELS[dataset]
    model = build(dataset, norm, ws=True)
    torch.manual_seed(1)
    images, labels = torch.rand(batch, *shape, dtype=torch.float64), torch.randint(0, 10, (batch,))
    assert_exact_norms(PRIVATE_ENGINES, model, images, labels, f"ws {dataset}/{norm}")
    examples, views = AUGMULT[dataset]
    images = torch.rand(examples * views, *shape, dtype=torch.float64)
    labels = torch.randint(0, 10, (examples,)).repeat_interleave(views)
    assert_exact_norms(AUGMULT_ENGINES, model, images, labels, f"ws augmult {dataset}/{norm}", views)


@pytest.mark.parametrize("views", [1, 2])
def test_book_keeping_clipped_sum_of_a_ghost_planned_weight_standardized_layer(views):
    """The ghost-planned --ws layer's clipped sum (J^T of the clipped sum with respect to the standardized
    weight) equals the brute-force sum of clipped per-example raw gradients."""
    from dp_layers.norm_rules import conv_plan
    from dp_layers.weight_standardization import WSConv2d

    torch.manual_seed(5)
    layer = WSConv2d(64, 64, 3, padding=1)
    assert conv_plan(layer, (1, 64, 4, 4), views=views).method == "ghost"
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), _Reshape(64 * 16), torch.nn.Linear(64 * 16, 10)).double()
    images = torch.rand(3 * views, 64, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 10, (3,)).repeat_interleave(views)
    per_sample, norms = brute_force(model, images, labels, views)
    clip = norms.median().item()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    wrapped = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=clip)
    with views_per_example(views):
        BookKeepingLoss(wrapped, ViewAveragedCrossEntropy(views))(wrapped(images), labels).backward()
    for param, grads in zip(model.parameters(), per_sample):
        expected = torch.einsum("b,b...->...", factors.to(grads.dtype), grads)
        assert torch.allclose(param.grad, expected, rtol=1e-6, atol=1e-9)
    wrapped._close()


def noise_free_update(engine: str, norm: str, images, labels, clip: float, views: Optional[AugmentedViews] = None):
    """Weights change after one noise-free DP-SGD step (SGD, lr 1) through the real attach() path and the
    training loop's physical step (physical batches of 2 examples, as BatchMemoryManager splits them); with
    ``views``, each example is trained on as its augmult views."""
    spec = mnist.DATASET
    augmult = {"augment": True, "augmult": views.views} if views else {}
    config = build_config({"dataset": "mnist", "engine": engine, "norm": norm, "noise": 1.0, "clip": clip,
                           "batch_size": len(images), "physical_batch_size": 2, "lr": 1.0, "momentum": 0.0,
                           "epochs": 1, **augmult}, spec.defaults)
    data = ImageTensorDataset((images * 255).round().to(torch.uint8), labels)
    plan = dataclasses.replace(plan_privacy(config, len(data)), noise_multiplier=0.0)
    model = build("mnist", norm, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = attach(model, data, config, plan, sampling_generator=torch.Generator().manual_seed(0),
                      noise_generator=torch.Generator().manual_seed(0))
    physical = list(range(0, len(data), 2))
    training.optimizer.zero_grad()
    for start in physical:
        x, y = data.__getitems__(range(start, min(start + 2, len(data))))
        training.optimizer.signal_skip_step(do_skip=start != physical[-1])
        _physical_step(training, x, y, views=views)
    after = training.base_model.state_dict()
    return {k: before[k] - after[k] for k in before if before[k].is_floating_point()}, plan


def _clipped_mean_matches(norm, images, labels, views_seed=None, views=1):
    """Every private engine's noise-free update equals the brute-force clipped mean of per-example gradients
    (each the mean over the example's augmult views when ``views`` > 1)."""
    model = build("mnist", norm, dtype=torch.float32)
    rows, row_labels = images, labels
    if views > 1:  # the views the step will draw: the same generator, the same physical batches
        draw = AugmentedViews(mnist.DATASET.augmentation, views, torch.Generator().manual_seed(views_seed))
        drawn = [draw(images[i:i + 2], labels[i:i + 2]) for i in range(0, len(images), 2)]
        rows, row_labels = torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])
    per_sample, norms = brute_force(model, rows, row_labels, views)
    clip = norms.median().item()  # some examples clipped, some not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    names = [name for name, p in model.named_parameters()]
    engines = PRIVATE_ENGINES if views == 1 else AUGMULT_ENGINES
    for engine in engines:
        step_views = (AugmentedViews(mnist.DATASET.augmentation, views, torch.Generator().manual_seed(views_seed))
                      if views > 1 else None)
        update, plan = noise_free_update(engine, norm, images, labels, clip, step_views)
        for name, grads in zip(names, per_sample):
            expected = torch.einsum("b,b...->...", factors, grads) / plan.expected_batch_size
            assert torch.allclose(update[name], expected, rtol=1e-4, atol=1e-7), f"{engine}/{norm}/{name}"


@pytest.mark.parametrize("norm", ["none", "bn-public"])
def test_noise_free_update_equals_brute_force_clipped_mean(norm):
    torch.manual_seed(2)
    images = (torch.rand(6, 1, 28, 28) * 255).round() / 255
    _clipped_mean_matches(norm, images, torch.randint(0, 10, (6,)))


@pytest.mark.parametrize("norm", ["none", "group"])
def test_augmult_update_through_the_training_step_equals_brute_force(norm):
    """The whole step with --augment --augmult 3: views drawn, each example's view gradients averaged,
    clipped once, summed; the same in every engine that supports augmult."""
    torch.manual_seed(2)
    images = (torch.rand(6, 1, 28, 28) * 255).round() / 255
    _clipped_mean_matches(norm, images, torch.randint(0, 10, (6,)), views_seed=5, views=3)


class _Reshape(torch.nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


@pytest.mark.parametrize("layers,shape", [
    ([torch.nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.nn.Tanh(), torch.nn.Conv1d(6, 6, 3, groups=3, dilation=2)],
     (4, 20)),
    ([torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 4, 2, stride=2, groups=2)],
     (2, 6, 6, 6)),
    ([torch.nn.Conv2d(4, 8, 3, groups=2, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 8, 3, stride=2),
      torch.nn.LayerNorm([8, 3, 3])], (4, 8, 8)),
])
def test_norm_rules_for_other_conv_and_norm_layers(layers, shape):
    """Conv1d, Conv3d, grouped, strided and dilated convolutions and LayerNorm follow the same rules."""
    torch.manual_seed(4)
    body = torch.nn.Sequential(*layers)
    with torch.no_grad():
        features = body(torch.zeros(1, *shape)).numel()
    model = torch.nn.Sequential(body, _Reshape(features), torch.nn.Linear(features, 10)).double()
    images, labels = torch.rand(4, *shape, dtype=torch.float64), torch.randint(0, 10, (4,))
    _, expected = brute_force(model, images, labels)
    for engine in ("mixed-ghost", "bk"):
        got = engine_norms(engine, model, images, labels)
        assert ((got - expected).abs() / expected).max().item() <= 1e-6, engine


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("norm", ["bn-public", "group"])
def test_opacus_own_checker_accepts_our_layers(mode, norm):
    """Opacus's per-sample gradient checker (micro-batch reference) on LeNet-5 with our registered layers."""
    from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

    from dp_layers import refresh_public_statistics
    from src import mnist
    from src.config import ModelConfig

    torch.manual_seed(0)
    model = mnist.DATASET.build_model(ModelConfig(norm=norm, act="tanh")).double()
    if norm == "bn-public":
        refresh_public_statistics(model, torch.rand(16, 1, 28, 28, dtype=torch.float64))
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    assert check_per_sample_gradients_are_correct(x, model, grad_sample_mode=mode, atol=1e-9, rtol=1e-7)


SHIFTED_GRAM_LAYERS = [
    torch.nn.Conv2d(4, 6, 3, padding=1),
    torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
    torch.nn.Conv2d(4, 6, 3, dilation=2, padding=2),
    torch.nn.Conv2d(4, 6, 3, groups=2, padding=1),
    torch.nn.Conv2d(4, 6, (3, 2), padding=(1, 0)),
    torch.nn.Conv2d(4, 6, 4, padding="same"),
]


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("layer", SHIFTED_GRAM_LAYERS, ids=lambda layer: repr(layer))
def test_shifted_input_gram_equals_the_unfolded_one(layer, views):
    """U U^T from the padded input's channel Gram summed over the kernel offsets equals the Gram of the unfolded
    input, for strided, dilated, grouped, rectangular and 'same'-padded kernels, with augmult views as positions."""
    from dp_layers.norm_rules import conv_factors, shifted_input_gram

    torch.manual_seed(6)
    layer = layer.double()
    x = torch.randn(3 * views, 4, 7, 6, dtype=torch.float64)
    backprops = torch.randn_like(layer(x))
    u, _ = conv_factors(layer, x, backprops, views=views)
    expected = torch.einsum("bgdt,bgds->bgts", u, u)
    got = shifted_input_gram(layer, x, views)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("views", [1, 2])
def test_every_engine_is_exact_on_convolutions_that_use_shifted_grams(views):
    """A model whose convolutions the mixed rule ghosts from shifted Grams (as ScatterNet + CNN's): mixed-ghost's
    and bk's per-sample norms equal brute force, with and without augmult views."""
    from dp_layers.norm_rules import conv_plan

    torch.manual_seed(7)
    first, second = torch.nn.Conv2d(96, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1)
    for layer, shape in ((first, (96, 4, 4)), (second, (32, 4, 4))):
        plan = conv_plan(layer, shape, views=views)
        assert (plan.method, plan.input_gram) == ("ghost", "shifted"), plan
    model = torch.nn.Sequential(first, torch.nn.Tanh(), second, torch.nn.Tanh(), _Reshape(32 * 16),
                                torch.nn.Linear(32 * 16, 10)).double()
    images = torch.rand(3 * views, 96, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 10, (3,)).repeat_interleave(views)
    assert_exact_norms(("mixed-ghost", "bk"), model, images, labels, f"shifted grams, {views} views", views)


def test_per_sample_conv2d_weights_in_chunks_equal_one_call_per_row(monkeypatch):
    """The grouped convolution runs in chunks (oneDNN slows 30x past some number of groups); rows split across
    chunks, and a last short chunk, still get their own gradient."""
    from dp_layers import norm_rules

    monkeypatch.setattr(norm_rules, "GROUPED_ROWS", 3)
    torch.manual_seed(8)
    layer = torch.nn.Conv2d(5, 4, 3, stride=2, padding=1).double()
    x = torch.randn(7, 5, 9, 9, dtype=torch.float64)
    backprops = torch.randn_like(layer(x))
    got = norm_rules.per_sample_conv2d_weight(layer, x, backprops)
    expected = torch.stack([torch.nn.grad.conv2d_weight(x[i:i + 1], layer.weight.shape, backprops[i:i + 1],
                                                        stride=2, padding=1) for i in range(7)])
    assert norm_rules.grouped_rows(5) == 3
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert norm_rules.per_sample_conv2d_weight(layer, x[:0], backprops[:0]).shape == (0, *layer.weight.shape)


def test_scatternet_cnn_convolutions_on_cifar10_features_are_ghosted_from_shifted_grams():
    """The choice that makes ScatterNet + CNN's CIFAR-10 step fast on a CPU (docs/engines.md): its 243 -> 64
    convolution on 8x8 maps costs 2.7M multiply-adds per example this way, against 9M instantiated."""
    from dp_layers.norm_rules import conv_plan
    from src.models.scatternet import cnn_head

    head = cnn_head((243, 8, 8), 10)
    for layer, shape in ((head[0], (243, 8, 8)), (head[3], (64, 4, 4))):
        plan = conv_plan(layer, shape)
        assert (plan.method, plan.input_gram) == ("ghost", "shifted"), plan
        assert plan.ghost_cost < plan.instantiate_cost / 3


@pytest.mark.parametrize("family", ["scatternet-linear", "scatternet-cnn"])
def test_mirror_views_update_through_the_training_step_equals_brute_force(family):
    """--mirror-views: the whole noise-free step on cached features of two views per example (FeatureViews rows),
    through attach() and the loop's physical step, equals the brute-force clipped mean of each example's
    gradient averaged over its two views; every engine that takes views. So each example's contribution is
    bounded by the clip whatever its views, as the accounting assumes."""
    from src.augment import FeatureViews
    from src.data import FeatureTensorDataset

    spec = cifar10.DATASET
    torch.manual_seed(3)
    features = torch.rand(4, 2, 243, 8, 8)
    labels = torch.randint(0, 10, (4,))
    rows, row_labels = FeatureViews(2)(features, labels)
    config_flags = {"dataset": "cifar10", "model": family, "norm": "group", "mirror_views": True, "noise": 1.0,
                    "batch_size": 4, "physical_batch_size": 2, "lr": 1.0, "momentum": 0.0, "epochs": 1}
    torch.manual_seed(0)
    reference = spec.build_model(build_config({**config_flags, "clip": 1.0}, spec.defaults).model)
    per_sample, norms = brute_force(reference, rows, row_labels, views=2)
    clip = norms.median().item()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    names = [name for name, p in reference.named_parameters()]
    for engine in AUGMULT_ENGINES:
        config = build_config({**config_flags, "clip": clip, "engine": engine}, spec.defaults)
        assert config.train.views == 2
        data = FeatureTensorDataset(features, labels, views=2)
        plan = dataclasses.replace(plan_privacy(config, len(data)), noise_multiplier=0.0)
        torch.manual_seed(0)
        model = spec.build_model(config.model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        training = attach(model, data, config, plan, sampling_generator=torch.Generator().manual_seed(0),
                          noise_generator=torch.Generator().manual_seed(0))
        training.optimizer.zero_grad()
        for start in (0, 2):
            x, y = data.__getitems__(range(start, start + 2))
            training.optimizer.signal_skip_step(do_skip=start == 0)
            _physical_step(training, x, y, views=FeatureViews(2))
        after = training.base_model.state_dict()
        for name, grads in zip(names, per_sample):
            expected = torch.einsum("b,b...->...", factors, grads) / plan.expected_batch_size
            update = before[name] - after[name]
            # float32 sums over 15552 inputs: compared to the largest entry, not entry by entry
            error = (update - expected).abs().max().item()
            assert error <= 1e-5 * expected.abs().max().item(), (f"{engine}/{family}/{name}", error)
