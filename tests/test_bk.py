"""dp_layers/bk.py: book-keeping refuses the models it would mis-clip, before any gradient is touched (its
exact norms, with every other engine's, are in test_engines_exact.py).

Book-keeping (Bu et al. 2023) gives every parameter one per-sample norm from one recorded layer call. A
parameter reached by two layer calls (a layer called twice, tied weights) would get its norm from the last
call only while both calls' clipped sums reach ``.grad`` (Opacus's ghost clipping refuses such models too);
a trainable layer that is not recorded (eval mode, unused) would be clipped with a stale norm. Either way
the update is no longer bounded by the clip norm C, so the DP guarantee is void: these tests pin the refusal
(``clipped_backward`` and ``probe``) and that normal models, frozen parts included, still clip exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dp_layers.bk import BookKeepingGradSampleModule, BookKeepingLoss, UnsupportedModelError

FEATURES, CLASSES = 5, 3


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(FEATURES, 6), nn.Linear(6, 6), nn.Linear(6, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _dominated_by_shared_weight(model: nn.Module, shared: nn.Linear) -> None:
    """Identity shared weight, zero biases, a large head and a saturated input layer: the shared weight's
    two gradient contributions are nearly equal and carry most of the gradient, so keeping only the last
    call's norm for it (the bug these guards prevent) would let the update reach about 2 C."""
    with torch.no_grad():
        shared.weight.copy_(torch.eye(6))
        for layer in model.modules():
            if isinstance(layer, nn.Linear) and layer is not model.inp and layer is not model.head:
                layer.bias.zero_()
        model.head.weight.mul_(5.0)
        model.inp.weight.mul_(10.0)


class CalledTwice(nn.Module):
    """``fc`` is applied twice in one forward pass (weight reuse, as in an unrolled recurrence)."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.head = nn.Linear(FEATURES, 6), nn.Linear(6, 6), nn.Linear(6, CLASSES)
        _dominated_by_shared_weight(self, self.fc)

    def forward(self, x):
        return self.head(self.fc(self.fc(torch.tanh(self.inp(x)))))


class Tied(nn.Module):
    """``fc2`` shares ``fc1``'s weight matrix (tied weights); the biases stay separate."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc1, self.fc2 = nn.Linear(FEATURES, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, CLASSES)
        self.fc2.weight = self.fc1.weight
        _dominated_by_shared_weight(self, self.fc1)

    def forward(self, x):
        return self.head(self.fc2(self.fc1(torch.tanh(self.inp(x)))))


MODELS = {"plain": Plain, "called-twice": CalledTwice, "tied": Tied}


def make(kind: str, clip: float = 1.0):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    return model, BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=clip)


def batch(n: int, seed: int = 1, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    images = scale * torch.randn(n, FEATURES, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, CLASSES, (n,), generator=generator)


def step(module, images, labels):
    BookKeepingLoss(module, nn.CrossEntropyLoss())(module(images), labels).backward()


def probe_example():
    return torch.zeros(1, FEATURES, dtype=torch.float64)


def brute_force_norms(model, images, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(images)):
        grads = torch.autograd.grad(F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]), params)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


def snapshot(model):
    """Everything a refused step or a probe must leave alone."""
    return {name: (p.detach().clone(), None if p.grad is None else p.grad.clone(),
                   getattr(p, "_norm_sample", None)) for name, p in model.named_parameters()}


def assert_untouched(model, before):
    for name, p in model.named_parameters():
        value, grad, norm_sample = before[name]
        assert torch.equal(p.detach(), value), name
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad), name
        assert getattr(p, "_norm_sample", None) is norm_sample, name


def assert_refused_untouched(model, module, match: str) -> str:
    """A step and a probe are both refused (``match``), leave the model as it was and no records behind;
    returns the step's error message."""
    before = snapshot(model)
    images, labels = batch(4)
    with pytest.raises(UnsupportedModelError, match=match) as refused:
        step(module, images, labels)
    assert isinstance(refused.value, ValueError)
    assert all(p.grad is None for p in model.parameters())
    assert_untouched(model, before)
    assert module._records == []
    with pytest.raises(UnsupportedModelError, match=match):
        module.probe(probe_example())
    assert_untouched(model, before)
    assert module._records == []
    return str(refused.value)


# (a) a layer called twice in one forward pass
def test_layer_called_twice_is_refused_before_any_gradient():
    model, module = make("called-twice")
    message = assert_refused_untouched(model, module, r"more than one layer call.*shared or tied")
    assert "'fc'" in message and "fc.weight" in message


# (b) two layers with a tied weight
def test_tied_weights_are_refused():
    model, module = make("tied")
    message = assert_refused_untouched(model, module, r"shared or tied weights.*--engine hooks or functorch")
    assert "fc1.weight" in message and "fc2.weight" in message


# (c) a trainable submodule left in eval mode
def test_trainable_submodule_in_eval_mode_is_refused():
    model, module = make("plain")
    images, labels = batch(4)
    step(module, images, labels)  # a normal first step leaves a _norm_sample on every parameter
    model.zero_grad(set_to_none=True)

    model.fc2.eval()  # trainable, but its forward hook no longer records: its norms would be stale
    before = snapshot(model)
    stale = r"'fc2' is in eval mode \(or unused in forward\).*stale"
    with pytest.raises(UnsupportedModelError, match=stale) as refused:
        step(module, *batch(4, seed=2))
    assert "fc2.weight" in str(refused.value) and "freeze its parameters" in str(refused.value)
    assert_untouched(model, before)
    with pytest.raises(UnsupportedModelError, match="'fc2' is in eval mode"):
        module.probe(probe_example())
    assert_untouched(model, before)

    # The refusal leaves no stale records behind: back in train mode the next step is exact.
    model.fc2.train()
    images, labels = batch(4, seed=3)
    step(module, images, labels)
    expected = brute_force_norms(model, images, labels)
    assert torch.allclose(module.per_sample_gradient_norms, expected, rtol=1e-9, atol=0)


def test_trainable_parameter_unused_in_forward_is_refused():
    torch.manual_seed(0)
    model = Plain().double()
    model.spare = nn.Linear(2, 2).double()  # registered and trainable, never called
    module = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=1.0)
    with pytest.raises(UnsupportedModelError, match=r"'spare'.*unused in forward"):
        module.probe(probe_example())
    with pytest.raises(UnsupportedModelError, match="spare.weight"):
        step(module, *batch(3))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_requires_grad_changed_after_wrapping_is_refused(change):
    """Opacus's clipping factor counts the norms of the parameters trainable at wrapping time: a bias
    unfrozen later would reach ``.grad`` with no norm counted, one frozen later would count a stale norm."""
    torch.manual_seed(0)
    model = Plain().double()
    if change == "unfreeze":
        model.fc2.bias.requires_grad_(False)
    module = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=1.0)
    step(module, *batch(4))
    model.zero_grad(set_to_none=True)
    model.fc2.bias.requires_grad_(change == "unfreeze")
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"requires_grad changed after the model was wrapped.*fc2\.bias"):
        step(module, *batch(4, seed=2))
    assert_untouched(model, before)


# (d) frozen parts (eval mode or not) are not required and the norms stay exact
def test_frozen_submodule_in_eval_mode_trains_with_exact_norms():
    torch.manual_seed(0)
    model = Plain().double()
    for p in model.fc1.parameters():
        p.requires_grad_(False)
    model.fc1.eval()
    model.fc2.bias.requires_grad_(False)  # a partly frozen layer in train mode: only its weight is clipped
    module = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=1e3)
    module.probe(probe_example())
    assert module._records == [] and all(p.grad is None for p in model.parameters())

    images, labels = batch(5, seed=4)
    step(module, images, labels)
    expected = brute_force_norms(model, images, labels)
    assert torch.allclose(module.per_sample_gradient_norms, expected, rtol=1e-9, atol=0)
    assert model.fc1.weight.grad is None and model.fc2.bias.grad is None
    assert model.fc2.weight.grad is not None and model.head.weight.grad is not None


def test_empty_batch_passes_the_guard():
    """An empty Poisson batch still records every layer once (``_empty_batch_rule``): zero update."""
    model, module = make("plain")
    module.probe(probe_example())
    images, labels = batch(0)
    step(module, images, labels)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_probe_leaves_no_state_and_restores_hooks_and_rng():
    model, module = make("plain")
    before = snapshot(model)
    module.disable_hooks()
    state = torch.get_rng_state()
    module.probe(probe_example().float())  # cast to the model's dtype
    assert torch.equal(torch.get_rng_state(), state)
    assert not module.hooks_enabled
    module.enable_hooks()
    assert module._records == []
    assert_untouched(model, before)


# (e) the bound that the refusal protects: one example's clipped update has norm <= C
@pytest.mark.parametrize("kind", list(MODELS))
def test_single_example_update_is_bounded_by_clip_or_refused(kind):
    """With a batch of one, ``.grad`` is that example's clipped gradient: its norm is at most C. Without the
    guard, a layer called twice or a tied weight gives about twice C (the last call's norm is used for the
    shared weight, the sum of both calls' gradients is applied)."""
    clip = 1e-3  # every example is clipped
    model, module = make(kind, clip=clip)
    images, labels = batch(1, seed=5, scale=3.0)
    try:
        step(module, images, labels)
    except UnsupportedModelError:
        assert kind != "plain"
        assert all(p.grad is None for p in model.parameters())
        return
    update = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()
    assert update <= clip + 1e-6, f"{kind}: clipped update norm {update / clip:.2f} C exceeds the clip bound C"
    assert kind == "plain", f"{kind} should have been refused"
    module.probe(probe_example())  # the check the training setup runs right after wrapping accepts it
