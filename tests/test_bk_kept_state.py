"""dp_layers/bk.py: what each layer keeps between its norms and its clipped sum, and the memory budget.

Book-keeping (Bu et al. 2023) does each layer's norm as its output gradient arrives and keeps only what the
clipped sum needs: per-sample gradients or the layer's input and output gradient, whichever is smaller
(``--bk-keep``), or nothing for a layer over ``--bk-layer-budget`` (its sum then comes from a second backward
pass). These are memory choices: they must not change the norms (so the clipping factors) at all, must not
change any other layer's update by a single bit, and change the layer's own update only by the order of a
float64 sum. The sizes ``--explain-engine`` prints (``planned_state``) must be what the layers really keep.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dp_layers.augmult import ViewAveragedCrossEntropy, views_per_example
from dp_layers.bk import (KEEP_POLICIES, KEPT_FACTORS, KEPT_NOTHING, KEPT_PER_SAMPLE, BookKeepingGradSampleModule,
                          BookKeepingLoss, planned_state)
from tests.test_engines_exact import MODELS, brute_force, build

CASES = [("mnist", "none", False), ("cifar10", "group", False), ("cifar10", "group", True)]


def _batch(dataset: str, views: int):
    _, shape, examples = MODELS[dataset]
    torch.manual_seed(1)
    images = torch.rand(examples * views, *shape, dtype=torch.float64)
    labels = torch.randint(0, 10, (examples,)).repeat_interleave(views)
    return images, labels


def _step(model, images, labels, views: int, clip: float, **options):
    """One book-keeping step on a copy of ``model``: (update per parameter name, per-sample norms, the kept
    state of every layer call as (module name, kept, numbers kept))."""
    model = copy.deepcopy(model)
    names = {module: name for name, module in model.named_modules()}
    module = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=clip, **options)
    kept = []
    original = module._book

    def spy(record, grad, step):  # what the layer keeps, read off its book as the backward pass makes it
        original(record, grad, step)
        kept.append((names[record.module], record.book.kept, _kept_numel(record.book)))

    module._book = spy
    with views_per_example(views):
        BookKeepingLoss(module, ViewAveragedCrossEntropy(views))(module(images), labels).backward()
    norms = module.per_sample_gradient_norms.detach().clone()
    module._close()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, norms, kept


def _kept_numel(book) -> int:
    """Numbers held by the book's clipped-sum function: every tensor its closures (and their parts'
    closures) reach, counted once."""
    seen, stack = {}, [book.clipped_sum] if book.clipped_sum is not None else []
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            seen[id(item)] = item.numel()
        elif callable(item) and getattr(item, "__closure__", None):
            stack.extend(cell.cell_contents for cell in item.__closure__)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return sum(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("dataset,norm,ws", CASES)
def test_kept_state_changes_no_norm_and_no_other_layer_by_a_bit(dataset, norm, ws, views):
    """Every keep policy and budget against keeping per-sample gradients wherever they were formed (the
    engine's behaviour before the memory work): norms bit for bit; a parameter whose layer kept the same
    kind of state bit for bit; one whose layer kept another kind (or nothing) to 1e-12 relative, the order
    of a float64 sum; and all of them equal the brute-force clipped sum."""
    model = build(dataset, norm, ws=ws)
    images, labels = _batch(dataset, views)
    clip = 0.5
    reference, reference_norms, reference_kept = _step(model, images, labels, views, clip, keep="per-sample")
    per_example, brute_norms = brute_force(model, images, labels, views)
    assert torch.allclose(reference_norms, brute_norms, rtol=1e-10)
    factors = (clip / (brute_norms + 1e-6)).clamp(max=1.0)
    for name, grads in zip(reference, per_example):
        assert torch.allclose(reference[name], torch.einsum("b,b...->...", factors, grads), rtol=1e-9, atol=1e-12)
    kinds = {name: kind for name, kind, _ in reference_kept}
    variants = [{"keep": keep} for keep in KEEP_POLICIES] + [{"layer_budget_mb": 0.0}, {"layer_budget_mb": 0.05}]
    changed_kinds = set()
    for options in variants:
        update, norms, kept = _step(model, images, labels, views, clip, **options)
        assert torch.equal(norms, reference_norms), options
        layer_kind = {name: kind for name, kind, _ in kept}
        for name, grad in update.items():
            layer = name.rsplit(".", 1)[0]
            if layer_kind[layer] == kinds[layer]:
                assert torch.equal(grad, reference[name]), (options, name)
            else:
                changed_kinds.add(layer_kind[layer])
                scale = reference[name].abs().max()
                assert ((grad - reference[name]).abs().max() / scale).item() <= 1e-12, (options, name)
    assert changed_kinds == {KEPT_FACTORS, KEPT_NOTHING}  # both other choices were exercised


@pytest.mark.parametrize("keep", KEEP_POLICIES)
@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("dataset,norm,ws", CASES)
def test_layers_keep_what_planned_state_says(dataset, norm, ws, views, keep):
    """What ``--explain-engine`` prints per layer (``planned_state``: kind and size) is what the layer's book
    really holds until its clipped sum, and nothing more (no input, output or output gradient of a layer that
    kept per-sample gradients). The policy ``smaller`` never keeps more than either side."""
    model = build(dataset, norm, ws=ws)
    images, labels = _batch(dataset, views)
    shapes = {}

    def record(module, inputs, output, name):
        shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

    handles = [m.register_forward_hook(lambda m, i, o, name=name: record(m, i, o, name))
               for name, m in model.named_modules()]
    with torch.no_grad(), views_per_example(views):
        model(images)
    for handle in handles:
        handle.remove()
    _, _, kept = _step(model, images, labels, views, 0.5, keep=keep)
    modules = dict(model.named_modules())
    assert len(kept) == len([m for m in modules.values() if any(p.requires_grad for p in m.parameters(False))])
    kinds = set()
    for name, kind, numel in kept:
        input_shape, output_shape = shapes[name]
        assert planned_state(modules[name], input_shape, output_shape, views, keep) == (kind, numel), name
        kinds.add(kind)
        if keep == "smaller":
            assert numel <= planned_state(modules[name], input_shape, output_shape, views, "factors")[1], name
    assert KEPT_FACTORS in kinds  # dense layers always keep their factors
    assert (KEPT_PER_SAMPLE in kinds) == (keep != "factors" or norm != "none")  # norm layers: per-sample


def test_a_budget_of_zero_keeps_nothing_and_recomputes_every_layer():
    """``--bk-layer-budget 0``: no layer keeps state; every clipped sum comes from the second backward pass
    (ghost clipping's way) and still equals the brute-force clipped sum."""
    model = build("cifar10", "group", ws=True)
    images, labels = _batch("cifar10", 1)
    update, norms, kept = _step(model, images, labels, 1, 0.5, layer_budget_mb=0.0)
    assert {kind for _, kind, _ in kept} == {KEPT_NOTHING} and all(numel == 0 for _, _, numel in kept)
    per_example, brute_norms = brute_force(model, images, labels)
    factors = (0.5 / (brute_norms + 1e-6)).clamp(max=1.0)
    for name, grads in zip(update, per_example):
        assert torch.allclose(update[name], torch.einsum("b,b...->...", factors, grads), rtol=1e-9, atol=1e-12)


def test_unknown_keep_policy_is_refused_at_construction():
    with pytest.raises(ValueError, match="keep policy"):
        BookKeepingGradSampleModule(build("mnist", "none"), keep="everything")
