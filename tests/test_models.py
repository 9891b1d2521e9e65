"""The two architectures under every normalization: shapes, Opacus compatibility, exact per-sample gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from dp_layers import group_count, make_norm
from src import cifar10, mnist
from src.config import ModelConfig

NORMS = ["none", "group", "layer", "instance"]


def build(dataset: str, norm: str, act: str = "tanh"):
    spec = {"mnist": mnist.DATASET, "cifar10": cifar10.DATASET}[dataset]
    return spec.build_model(ModelConfig(norm=norm, act=act))


@pytest.mark.parametrize("dataset,shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
@pytest.mark.parametrize("norm", NORMS)
def test_forward_shape_and_opacus_accepts_the_model(dataset, shape, norm):
    model = build(dataset, norm)
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    assert ModuleValidator.validate(model, strict=True) == []


def test_group_counts():
    assert [group_count(c) for c in (6, 16, 64, 128, 512)] == [3, 8, 32, 32, 32]
    with pytest.raises(ValueError):
        make_norm("batch", 8)


def brute_force_per_sample_grads(model, images, labels):
    grads = []
    for i in range(len(images)):
        loss = F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1], reduction="sum")
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    return [torch.stack(per_param) for per_param in zip(*grads)]


@pytest.mark.parametrize("dataset,shape,batch,norms", [
    ("mnist", (1, 28, 28), 5, NORMS),
    ("cifar10", (3, 32, 32), 3, ["group", "none"]),
])
def test_opacus_per_sample_gradients_are_exact(dataset, shape, batch, norms):
    """Opacus hooks see our models whole: nothing in-place breaks the captured activations, and every
    layer's per-sample gradient equals a separate backward pass per example (float64)."""
    torch.manual_seed(0)
    for norm in norms:
        model = build(dataset, norm, act="relu" if dataset == "cifar10" else "tanh").double()
        images, labels = torch.rand(batch, *shape, dtype=torch.float64), torch.randint(0, 10, (batch,))
        expected = brute_force_per_sample_grads(model, images, labels)
        wrapped = GradSampleModule(model, loss_reduction="sum")
        F.cross_entropy(wrapped(images), labels, reduction="sum").backward()
        got = [p.grad_sample for p in model.parameters() if p.requires_grad]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-9, atol=1e-12), f"{dataset}/{norm}: per-sample gradient mismatch"
        wrapped._close()
