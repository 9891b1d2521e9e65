"""The models added with ``--model`` under DP: every engine's per-sample gradient norms of the trainable layers equal
brute-force per-example gradients; a run trains and saves a model that loads again; attacks differentiate from
pixels through the fixed scattering to the logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks.pgd import AttackSpec
from attacks.robust_eval import robust_accuracy
from dp_layers import dp_bn
from dp_layers.public_bn import refresh_public_statistics
from src import loop
from src.config import build_config
from src.data import ImageTensorDataset
from src.engines import PRIVATE_ENGINES
from src.models import has_cpp_compiler
from tests.conftest import run_cli
from tests.test_engines_exact import assert_exact_norms
from tests.test_model_registry import SPECS

FAMILIES = ["scatternet-linear", "scatternet-cnn", "cnn"]


def build(dataset: str, family: str, norm: str, dtype=torch.float64):
    spec = SPECS[dataset]
    config = build_config({"dataset": dataset, "model": family, "norm": norm}, spec.defaults)
    torch.manual_seed(0)
    model = spec.build_model(config.model).to(dtype)
    if norm == "bn-public":
        refresh_public_statistics(model, torch.rand(8, *spec.image_shape, dtype=dtype))
    if norm == "bn-dp":  # released statistics: any positive variances will do for the gradients' exactness
        channels = model.scattering.out_channels
        dp_bn.private_standardizers(model)[0].set_statistics(torch.rand(channels, dtype=dtype) * 0.1,
                                                             torch.rand(channels, dtype=dtype) + 0.01)
    return model


@pytest.mark.parametrize("norm", ["none", "group", "bn-public", "bn-dp"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_engine_clips_the_exact_per_sample_norm(dataset, family, norm):
    if norm == "bn-dp" and family == "cnn":
        pytest.skip("bn-dp normalizes fixed features: the end-to-end cnn refuses it (test_bn_dp)")
    spec = SPECS[dataset]
    model = build(dataset, family, norm)
    torch.manual_seed(1)
    images, labels = torch.rand(3, *spec.image_shape, dtype=torch.float64), torch.randint(0, 10, (3,))
    assert_exact_norms(PRIVATE_ENGINES, model, images, labels, f"{dataset}/{family}/{norm}")


def _low_contrast(n: int, seed: int) -> ImageTensorDataset:
    """32x32 colour images whose class is a faint (+-4/255) pattern over the whole image, on grey with noise:
    learnable from its many pixels, and within reach of an L-inf 8/255 attack whose gradient reaches the pixels."""
    patterns = np.random.default_rng(0).choice([-4, 4], size=(10, 3, 32, 32))  # the same classes in every split
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = 128 + patterns[labels] + rng.integers(-3, 4, size=(n, 3, 32, 32))
    return ImageTensorDataset(torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels))


@pytest.mark.slow
def test_pgd_differentiates_through_the_scattering():
    """A non-robust ScatterNet model that has learned the classes: PGD at L-inf 8/255 from the pixels drives its
    accuracy far below the clean one, so the attack's gradient flows through the fixed scattering."""
    train, test = _low_contrast(300, seed=1), _low_contrast(60, seed=2)
    model = build("cifar10", "scatternet-linear", "group", dtype=torch.float32)
    x, y = train.__getitems__(range(len(train)))
    with torch.no_grad():
        features = model.norm(model.scattering(x))  # fixed: the head trains on them alone
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model.head(features), y).backward()
        optimizer.step()
    model.eval()
    tx, ty = test.__getitems__(range(len(test)))
    clean = (model(tx).argmax(1) == ty).float().mean().item() * 100
    robust = robust_accuracy(model, test, AttackSpec(method="pgd", eps=8 / 255, alpha=4 / 255, steps=5),
                             size=len(test), batch_size=60, device=torch.device("cpu"), seed=0)
    assert clean >= 80, clean
    assert robust <= clean - 50, (clean, robust)


@pytest.mark.slow
def test_a_scatternet_run_trains_saves_and_reloads(tiny_root, tmp_path):
    """The model's own defaults (target epsilon 3, clip 0.1, GroupNorm(27) of the features), on tiny MNIST."""
    result = run_cli("--dataset", "mnist", "--model", "scatternet-cnn", "--data-root", tiny_root, "--train-subset", 120,
                     "--batch-size", 40, "--physical-batch-size", 20, "--epochs", 2, "--eval-robust-size", 8,
                     "--eval-pgd-steps", 2, "--out", tmp_path, "--run-id", "sc", "--wandb", "disabled", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "sc" / "config.json").read_text())
    summary = json.loads((tmp_path / "sc" / "summary.json").read_text())
    assert config["model"]["model"] == "scatternet-cnn" and config["model"]["norm"] == "group"
    assert config["privacy"]["clip"] == 0.1 and summary["status"] == "finished" and summary["epsilon"] <= 3.0
    spec = SPECS["mnist"]
    model = spec.build_model(build_config({"dataset": "mnist", **config["model"]}, spec.defaults).model)
    model.load_state_dict(torch.load(tmp_path / "sc" / "model.pt", weights_only=True), strict=True)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # --eval-only keeps the run's uncompiled scattering, or compiles it when asked (src.eval_only)
    from src.train import load_run_model

    cpu = torch.device("cpu")
    assert not load_run_model(str(tmp_path / "sc"), spec, cpu).scattering.compiled
    assert load_run_model(str(tmp_path / "sc"), spec, cpu, compile_scattering=True).scattering.compiled


def test_the_scattering_benchmark_measures_both_directions():
    from benchmarks.scattering import measure

    speeds = measure("mnist", batch=4, repeats=1)
    assert set(speeds) == {"forward", "forward+backward"} and all(v > 0 for v in speeds.values())


def test_public_statistics_of_fixed_features_are_computed_once(monkeypatch):
    """bn-public on a ScatterNet normalizes the fixed scattering's output: its public statistics never change, so the
    per-step refresh computes them once (an end-to-end model's change with its weights and are recomputed)."""
    calls = []
    monkeypatch.setattr(loop, "refresh_public_statistics", lambda model, images: calls.append(type(model).__name__))
    public = type("Public", (), {"images": torch.zeros(4, 1, 28, 28, dtype=torch.uint8)})()
    scatternet, lenet = build("mnist", "scatternet-linear", "bn-public"), build("mnist", "lenet5", "bn-public")
    for model in (scatternet, lenet):
        refresh = loop.public_refresher(model, public, torch.device("cpu"))
        for _ in range(3):
            refresh()
    assert calls == ["ScatterNet", "LeNet5", "LeNet5", "LeNet5"]


def test_compile_scattering_compiles_only_the_passes_that_are_differentiated(monkeypatch):
    """--compile-scattering: attacks and robust training (grad enabled, pixels requiring it) go through the
    compiled transform; clean features and evaluation stay eager. The compiled function is stood in for here;
    the next test compiles for real."""
    from src.models import scatternet

    calls = []

    def fake_compiled(transform, x):
        calls.append(x.shape[0])
        return transform(x)

    monkeypatch.setattr(scatternet, "compiled_apply", lambda: fake_compiled)
    spec = SPECS["mnist"]
    config = build_config({"dataset": "mnist", "model": "scatternet-linear", "norm": "group",
                           "compile_scattering": True}, spec.defaults)
    model = spec.build_model(config.model)
    x = torch.rand(3, *spec.image_shape)
    with torch.no_grad():
        model(x)
    model(x)  # grad enabled, but the pixels do not require it: the clean forward of training
    assert calls == []
    pixels = x.clone().requires_grad_(True)
    model(pixels).sum().backward()
    assert calls == [3] and pixels.grad is not None and pixels.grad.abs().sum() > 0
    eager = build_config({"dataset": "mnist", "model": "scatternet-linear", "norm": "group"}, spec.defaults)
    spec.build_model(eager.model)(x.clone().requires_grad_(True)).sum().backward()
    assert calls == [3]  # off by default


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile's CPU backend builds C++: no compiler here")
def test_the_compiled_scattering_equals_kymatios_forward_and_backward():
    """The compiled path on a small kymatio transform (J=1, L=2, 8x8 images: the same code, a graph small enough
    to compile in seconds): coefficients and pixel gradients within 1e-5 of eager kymatio, across batch sizes
    (Poisson batches vary) without a recompile per size, and for a copy of the module (the weight average's)."""
    import copy

    import torch._dynamo
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    from src.models.scatternet import compiled_apply

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_apply.cache_clear()
    transform = ScatteringTorch2D(J=1, shape=(8, 8), L=2, max_order=2)
    torch.manual_seed(0)
    for module, batch in ((transform, 5), (transform, 7), (copy.deepcopy(transform), 3)):
        x = torch.rand(batch, 2, 8, 8, requires_grad=True)
        weights = torch.randn_like(module(x))
        (module(x) * weights).sum().backward()
        eager_grad, x.grad = x.grad.clone(), None
        out = compiled_apply()(module, x)
        (out * weights).sum().backward()
        assert torch.allclose(out, module(x), atol=1e-5, rtol=0)
        assert torch.allclose(x.grad, eager_grad, atol=1e-5, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every size and copy
    compiled_apply.cache_clear()
