"""``--norm bn-dp`` (dp_layers.dp_bn): the mechanism's sensitivity and noise, one epsilon that composes it with
DP-SGD in every accountant and every place a run reads epsilon, the statistics' independence of the validation and
test sets, and the refusals. Resume without a second release: tests/test_resume.py; the audits: test_audit.py."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from dp_layers import dp_bn
from src import cifar10, mnist
from src.accounting import (EPSILON_TOLERANCE, bounded_epsilon, epsilon_from_history, gdp_approximation,
                            plan_privacy, prelude_of)
from src.config import build_config
from src.datasets import validate_for_dataset
from src.errors import UserError
from tests.conftest import run_cli, write_mnist_like

SPECS = {"mnist": mnist.DATASET, "cifar10": cifar10.DATASET}
CIFAR_TRAIN = 50000


def config_for(dataset="cifar10", **flags):
    config = build_config({"dataset": dataset, "model": "scatternet-linear", **flags}, SPECS[dataset].defaults)
    validate_for_dataset(config, SPECS[dataset])
    return config


# -- the mechanism ---------------------------------------------------------------------------------------------


def _features(n=40, channels=6, seed=0):
    return torch.randn(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def _sums(features, clip=1.5, noise=8.0, seed=7):
    return dp_bn.noisy_sums([features], clip=clip, noise_multiplier=noise,
                            generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("change", ["remove", "add-outlier"])
def test_one_example_moves_each_released_sum_by_at_most_the_clipping_bound(change):
    """Add/remove adjacency (as Opacus's DP-SGD accounting): with the same noise draw, the released sums of
    neighbouring data sets differ by at most --norm-clip in L2, the sensitivity the noise is calibrated to. The
    outlier, 1000 times the scale of the others, shows that the bound comes from the clipping."""
    features, clip = _features(), 1.5
    neighbour = features[1:] if change == "remove" else torch.cat([features, 1000 * _features(1, seed=9)])
    for released, other in zip(_sums(features, clip), _sums(neighbour, clip)):
        assert (released - other).norm() <= clip * (1 + 1e-12)
    if change == "add-outlier":  # the bound is reached: the outlier's moments are clipped to exactly C
        assert (_sums(features, clip)[1] - _sums(neighbour, clip)[1]).norm() == pytest.approx(clip)


def test_without_clipping_the_sensitivity_would_be_unbounded():
    """The control of the test above: an unclipped sum moves with the outlier."""
    features = _features()
    outlier = 1000 * _features(1, seed=9)
    unclipped = torch.cat([features, outlier]).flatten(2).mean(2).sum(0) - features.flatten(2).mean(2).sum(0)
    assert unclipped.norm() > 100 * 1.5


def test_the_noise_has_the_calibrated_standard_deviation():
    """Each coordinate of each sum gets N(0, (sigma C)^2): measured over 4000 coordinates of zero features."""
    zeros = torch.zeros(3, 2000, 1, 1, dtype=torch.float64)
    means, squares = _sums(zeros, clip=0.5, noise=4.0)
    for noise in (means, squares):
        assert noise.std().item() == pytest.approx(4.0 * 0.5, rel=0.05)
        assert abs(noise.mean().item()) < 0.1
    assert not torch.allclose(means, squares)  # two independent draws


def test_the_statistics_are_the_noisy_moments_with_the_variance_floored():
    n, clip, noise = 1000, 2.0, 8.0
    mean_sum = torch.tensor([10.0, -5.0, 0.0], dtype=torch.float64)
    square_sum = torch.tensor([1000.0, 0.0, -3.0], dtype=torch.float64)
    released = dp_bn.statistics_from_sums(mean_sum, square_sum, n=n, clip=clip, noise_multiplier=noise)
    floor = noise * clip / n
    assert released.mean.tolist() == pytest.approx([0.01, -0.005, 0.0])
    assert released.var.tolist() == pytest.approx([1.0 - 1e-4, floor, floor])
    assert released.floored_channels == 2 and released.floor == pytest.approx(floor)


def test_the_layer_refuses_to_run_before_a_release_and_keeps_it_in_its_state():
    layer = dp_bn.PrivateStandardize(3)
    with pytest.raises(RuntimeError, match="never estimated"):
        layer(torch.zeros(1, 3, 2, 2))
    layer.set_statistics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 1.0, 0.25]))
    restored = dp_bn.PrivateStandardize(3)
    restored.load_state_dict(layer.state_dict())
    out = restored(torch.full((1, 3, 1, 1), 3.0))
    assert out.flatten().tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-4)


# -- one epsilon ------------------------------------------------------------------------------------------------


def _independent_rdp(noise, sample_rate, steps, norm_noise, delta):
    """RDP of DP-SGD (Opacus's subsampled-Gaussian analysis) plus the closed form of the two unsubsampled
    Gaussian releases, alpha * 2 / (2 sigma^2), converted at the orders our accountant uses."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from src.accounting import RDP_ORDERS

    orders = np.array(RDP_ORDERS, dtype=float)
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise, steps=steps, orders=orders)
    rdp = rdp + orders * dp_bn.RELEASES / (2 * norm_noise ** 2)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


@pytest.mark.parametrize("norm_noise", [4.0, 8.0])
def test_the_composed_epsilon_equals_an_independent_computation(norm_noise):
    config = config_for(norm="bn-dp", norm_noise=norm_noise, noise=3.0)
    plan = plan_privacy(config, CIFAR_TRAIN)
    assert plan.prelude == ((norm_noise, 1.0, 2),) and plan.prelude_steps == 2
    expected = _independent_rdp(3.0, plan.sample_rate, plan.steps, norm_noise, plan.delta)
    assert plan.epsilon_by_accountant["rdp"] == pytest.approx(expected, rel=1e-9)
    without = plan_privacy(config_for(norm="group", noise=3.0), CIFAR_TRAIN)
    assert plan.epsilon > without.epsilon
    # PRV composes too: above DP-SGD's own, and tighter than RDP, as without the release
    prv, prv_without = plan.epsilon_by_accountant["prv"], without.epsilon_by_accountant["prv"]
    assert prv_without < prv < plan.epsilon_by_accountant["rdp"]
    # GDP's approximation composes mu exactly for the release: sqrt(mu_sgd^2 + 2 / sigma^2)
    from opacus.accountants.analysis import gdp

    mu = math.sqrt(gdp.compute_mu_poisson(steps=plan.steps, noise_multiplier=3.0, sample_rate=plan.sample_rate) ** 2
                   + 2 / norm_noise ** 2)
    assert plan.epsilon_gdp_approximation == pytest.approx(gdp.eps_from_mu(mu=mu, delta=plan.delta), rel=1e-9)
    assert plan.epsilon_gdp_approximation > without.epsilon_gdp_approximation


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_calibrates_dp_sgd_to_what_the_statistics_leave(accountant):
    with_release = plan_privacy(config_for(norm="bn-dp", accountant=accountant), CIFAR_TRAIN)
    without = plan_privacy(config_for(norm="group", accountant=accountant), CIFAR_TRAIN)
    composed = bounded_epsilon(accountant, list(with_release.prelude) + [
        (with_release.noise_multiplier, with_release.sample_rate, with_release.steps)], with_release.delta)
    assert 3.0 - EPSILON_TOLERANCE <= composed <= 3.0
    assert with_release.epsilon == pytest.approx(composed)
    assert with_release.noise_multiplier > without.noise_multiplier  # DP-SGD pays for the statistics
    assert with_release.prelude_epsilon == pytest.approx(epsilon_from_history(accountant, [(8.0, 1.0, 2)], 1e-5))


def test_max_epsilon_counts_the_statistics():
    config = config_for(norm="bn-dp", noise=3.0, max_epsilon=1.0)
    plan = plan_privacy(config, CIFAR_TRAIN)
    allowed = [(3.0, plan.sample_rate, plan.budget_steps)]
    assert bounded_epsilon("rdp", list(plan.prelude) + allowed, plan.delta) <= 1.0
    one_more = [(3.0, plan.sample_rate, plan.budget_steps + 1)]
    assert bounded_epsilon("rdp", list(plan.prelude) + one_more, plan.delta) > 1.0
    assert plan.budget_steps < plan_privacy(config_for(norm="group", noise=3.0, max_epsilon=1.0), CIFAR_TRAIN).budget_steps


def test_non_private_runs_and_other_norms_release_nothing_before_training():
    assert prelude_of(config_for(norm="group")) == ()
    assert prelude_of(config_for(norm="bn-dp", engine="non-private")) == ()
    assert gdp_approximation([(3.0, 0.1, 10)], 1e-5) == bounded_epsilon("gdp", [(3.0, 0.1, 10)], 1e-5)


@pytest.mark.parametrize("flags,words", [
    ({"norm": "group", "norm_clip": 1.0}, "--norm-clip sets how --norm bn-dp estimates its statistics; it needs "
                                          "--norm bn-dp"),
    ({"norm": "none", "norm_noise": 4.0}, "--norm-noise sets how --norm bn-dp"),
    ({"norm": "bn-dp", "norm_noise": 0.0}, "--norm-noise must be positive"),
    ({"norm": "bn-dp", "norm_clip": -1.0}, "--norm-clip must be positive"),
    ({"model": "lenet5", "norm": "bn-dp"}, "--norm bn-dp is not available for --model lenet5"),
])
def test_impossible_requests_are_refused_in_one_line(flags, words):
    dataset = "mnist" if flags.get("model") == "lenet5" else "cifar10"
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config = build_config({"dataset": dataset, "model": "scatternet-linear", **flags}, SPECS[dataset].defaults)
        validate_for_dataset(config, SPECS[dataset])


def test_a_target_the_statistics_alone_exceed_is_refused():
    alone = epsilon_from_history("rdp", [(2.0, 1.0, 2)], 1e-5)
    with pytest.raises(UserError, match=f"the release before training alone spends {alone:.3g} "):
        plan_privacy(config_for(norm="bn-dp", norm_noise=2.0, target_epsilon=1.0), CIFAR_TRAIN)


def test_dry_run_shows_the_statistics_share(tmp_path):
    result = run_cli("--dataset", "cifar10", "--model", "scatternet-linear", "--norm", "bn-dp", "--dry-run",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    share = report["normalization"]
    assert share["noise_multiplier"] == 8.0 and share["accountant_entries"] == [[8.0, 1.0, 2]]
    assert share["epsilon_alone"] == pytest.approx(epsilon_from_history("rdp", [(8.0, 1.0, 2)], 1e-5))
    assert share["dp_sgd_epsilon_alone"] < share["epsilon_composed"] == report["epsilon"] <= 3.0


# -- a run ------------------------------------------------------------------------------------------------------

# --val-size 50 takes the last 50 of the 250 training images (200-249); --train-subset 100 the first 100 of the rest.
TINY = ("--dataset", "mnist", "--model", "scatternet-linear", "--norm", "bn-dp", "--train-subset", 100,
        "--val-size", 50, "--batch-size", 50, "--epochs", 2, "--eval-robust-size", 0, "--seed", 3,
        "--wandb", "disabled")


def _released(run_dir) -> tuple:
    state = torch.load(run_dir / "model.pt", weights_only=True)
    return state["norm.dp_mean"], state["norm.dp_var"]


@pytest.fixture(scope="module")
def three_roots(tmp_path_factory):
    """Tiny MNIST three times: as written; with other validation and test images; with another training image."""
    base = tmp_path_factory.mktemp("bn_dp_data")
    write_mnist_like(base / "same", "MNIST", 250, 40, seed=11)
    roots = {"same": base / "same"}
    for name in ("held_out_changed", "train_changed"):
        shutil.copytree(base / "same", base / name)
        roots[name] = base / name
    write_mnist_like(base / "other", "MNIST", 250, 40, seed=12)  # donor of other images
    from torchvision.datasets import MNIST

    def rewrite(root, rows, test: bool):
        """Replace ``rows`` of the training images (or all test images) with the donor's, in the idx files."""
        from tests.conftest import write_idx

        ours, donor = MNIST(root, train=not test, download=False), MNIST(base / "other", train=not test,
                                                                        download=False)
        images, labels = ours.data.numpy().copy(), ours.targets.numpy().copy()
        images[rows] = donor.data.numpy()[rows]
        prefix = "t10k" if test else "train"
        write_idx(root / "MNIST" / "raw", prefix, images, labels)

    rewrite(roots["held_out_changed"], np.arange(200, 250), test=False)
    rewrite(roots["held_out_changed"], np.arange(40), test=True)
    rewrite(roots["train_changed"], np.array([0]), test=False)
    return roots


def test_the_released_statistics_depend_on_the_private_set_only(three_roots, tmp_path):
    released = {}
    for name, root in three_roots.items():
        result = run_cli(*TINY, "--data-root", root, "--out", tmp_path, "--run-id", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "bn-dp: released the feature statistics of the 100 private training examples once" in result.stdout
        released[name] = _released(tmp_path / name)
    same, held_out, train = released["same"], released["held_out_changed"], released["train_changed"]
    assert all(torch.equal(a, b) for a, b in zip(same, held_out))  # validation and test images changed: equal
    assert not torch.equal(same[0], train[0])  # one private image changed: the control, it is read
    summary = json.loads((tmp_path / "same" / "summary.json").read_text())
    config = json.loads((tmp_path / "same" / "config.json").read_text())
    assert summary["steps_spent"] == summary["steps"] == 2 * 2  # the release is not counted as a DP-SGD step
    assert config["plan"]["prelude"] == [[8.0, 1.0, 2]]
    history = [tuple(config["plan"]["prelude"][0]), (summary["noise_multiplier"], summary["sample_rate"], 4)]
    assert summary["epsilon"] == pytest.approx(epsilon_from_history("rdp", history, 1e-5)) and summary["epsilon"] <= 3
