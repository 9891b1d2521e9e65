"""Public-data BatchNorm: an example's output and per-sample gradient depend only on itself, the weights
and the public data; private data never touches a BatchNorm buffer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from dp_layers import refresh_public_statistics
from dp_layers.bk import BookKeepingGradSampleModule, BookKeepingLoss
from dp_layers.public_bn import PublicStandardize
from src import cifar10, mnist
from src.config import ModelConfig

MODELS = {"mnist": (mnist.DATASET, (1, 28, 28)), "cifar10": (cifar10.DATASET, (3, 32, 32))}


def bn_public_model(dataset: str):
    spec, shape = MODELS[dataset]
    torch.manual_seed(0)
    model = spec.build_model(ModelConfig(norm="bn-public", act="tanh"))
    public = torch.rand(32, *shape)
    refresh_public_statistics(model, public)
    return model, public


def buffers(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "public_" in k or "refreshed" in k}


def per_sample_outputs(model, images, labels):
    """Logits, Opacus per-sample gradients (hooks) and book-keeping per-sample norms for a batch."""
    logits = model(images).detach()
    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(images), labels, reduction="sum").backward()
    grads = [p.grad_sample.clone() for p in model.parameters()]
    wrapped._close()
    model.zero_grad(set_to_none=True)
    bk = BookKeepingGradSampleModule(model, loss_reduction="sum", max_grad_norm=1.0)
    BookKeepingLoss(bk, torch.nn.CrossEntropyLoss(reduction="sum"))(bk(images), labels).backward()
    norms = bk.per_sample_gradient_norms.clone()
    bk._close()
    model.zero_grad(set_to_none=True)
    return logits, grads, norms


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(MODELS))
def test_other_private_examples_never_affect_example_i(dataset):
    model, _ = bn_public_model(dataset)
    _, shape = MODELS[dataset]
    torch.manual_seed(3)
    images, labels = torch.rand(6, *shape), torch.randint(0, 10, (6,))
    logits, grads, norms = per_sample_outputs(model, images, labels)
    # Example 0 stays; the others are replaced by fresh examples, then permuted.
    replaced = images.clone()
    replaced[1:] = torch.rand(5, *shape)
    other_labels = labels.clone()
    other_labels[1:] = torch.randint(0, 10, (5,))
    order = torch.tensor([0, 4, 2, 5, 1, 3])
    for batch_images, batch_labels in ((replaced, other_labels), (images[order], labels[order])):
        new_logits, new_grads, new_norms = per_sample_outputs(model, batch_images, batch_labels)
        assert torch.equal(new_logits[0], logits[0])
        assert all(torch.equal(g[0], h[0]) for g, h in zip(new_grads, grads))
        assert torch.equal(new_norms[0], norms[0])


@pytest.mark.parametrize("dataset", list(MODELS))
def test_private_data_never_changes_a_batchnorm_buffer(dataset):
    model, _ = bn_public_model(dataset)
    _, shape = MODELS[dataset]
    before = buffers(model)
    model.train()
    private = torch.rand(8, *shape)
    per_sample_outputs(model, private, torch.randint(0, 10, (8,)))
    model.eval()
    with torch.no_grad():
        model(private)
    after = buffers(model)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_statistics_are_the_public_batch_statistics_layer_by_layer():
    model, public = bn_public_model("mnist")
    first_conv, first_norm = model.features[0], model.features[1][0]
    with torch.no_grad():
        activations = first_conv(model.standardize(public))
    assert torch.allclose(first_norm.public_mean, activations.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(first_norm.public_var, activations.var(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    # The weights change: refreshing follows them (statistics of the current weights, every step).
    with torch.no_grad():
        first_conv.weight.mul_(2.0)
    refresh_public_statistics(model, public)
    assert torch.allclose(first_norm.public_var, 4 * activations.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4)


def test_validators_accept_it_and_it_refuses_to_run_unrefreshed():
    spec, _ = MODELS["cifar10"]
    model = spec.build_model(ModelConfig(norm="bn-public", act="relu"))
    assert ModuleValidator.validate(model, strict=True) == []
    GradSampleModule(model, strict=True)._close()  # no trainable module holds buffers
    with pytest.raises(RuntimeError, match="never computed"):
        model(torch.rand(1, 3, 32, 32))


def test_saved_statistics_travel_with_the_weights():
    model, _ = bn_public_model("mnist")
    fresh = mnist.DATASET.build_model(ModelConfig(norm="bn-public", act="tanh"))
    fresh.load_state_dict(model.state_dict())
    images = torch.rand(3, 1, 28, 28)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(images), model(images))
    assert all(isinstance(m, PublicStandardize) and m._ready for m in fresh.modules() if isinstance(m, PublicStandardize))
