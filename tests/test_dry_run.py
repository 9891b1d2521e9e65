"""--dry-run: the privacy plan against published and analytic reference values of independent accountants."""
from __future__ import annotations

import json
import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

import vision


def dry_run(capsys, *args) -> dict:
    code = vision.main(["--dry-run", *map(str, args)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, "dry-run prints exactly one JSON object"
    return json.loads(lines[0])


# tf-privacy's compute_dp_sgd_privacy, quoted in the Gaussian-DP tutorial (Bu et al., deep learning with
# Gaussian differential privacy):
# n=60000, batch 250, sigma 1.3, 15 epochs, delta 1e-5 -> eps 0.9422002181627345 (RDP), 0.823696 (GDP, Bu et al.).
TF_PRIVACY_RDP = 0.9422002181627345
GDP_TUTORIAL = 0.823696


def test_matches_tf_privacy_rdp_and_gdp_tutorial_values(capsys):
    common = ["--dataset", "mnist", "--batch-size", 250, "--epochs", 15, "--noise", 1.3, "--delta", 1e-5]
    rdp = dry_run(capsys, *common, "--accountant", "rdp")
    assert rdp["n_train"] == 60000
    assert rdp["sample_rate"] == pytest.approx(250 / 60000, rel=1e-12)
    assert rdp["steps"] == 3600 == rdp["epochs"] * rdp["steps_per_epoch"]
    assert rdp["epsilon"] == pytest.approx(TF_PRIVACY_RDP, rel=1e-6)
    # GDP is an approximation: reported beside the rigorous values under its own name, and the output says so.
    assert rdp["epsilon_gdp_approximation"] == pytest.approx(GDP_TUTORIAL, rel=1e-5)
    assert "approximation" in rdp["note"] and "gdp" not in rdp["epsilon_by_accountant"]
    assert rdp["epsilon_by_accountant"]["prv"] is not None


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon of a mu-GDP mechanism (Dong, Roth & Su 2019): composing T full-batch Gaussian
    steps of noise sigma is exactly (sqrt(T)/sigma)-GDP."""
    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("epochs,noise", [(10, 2.0), (1, 1.0)])
def test_full_batch_matches_analytic_gaussian(capsys, epochs, noise):
    """With the batch equal to the data set (q = 1) the tight answer has a closed form: PRV must find it
    (to its error bound) and RDP must not go below it."""
    plan = dry_run(capsys, "--dataset", "mnist", "--train-subset", 1000, "--batch-size", 1000,
                   "--epochs", epochs, "--noise", noise, "--accountant", "prv")
    assert plan["sample_rate"] == 1.0 and plan["steps"] == epochs
    exact = exact_gaussian_epsilon(math.sqrt(epochs) / noise, 1e-5)
    assert exact - 1e-6 <= plan["epsilon"] <= exact + 0.02
    assert plan["epsilon_by_accountant"]["rdp"] >= exact


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_is_met_without_overshooting(capsys, accountant):
    plan = dry_run(capsys, "--dataset", "mnist", "--target-epsilon", 2.0, "--epochs", 10, "--batch-size", 512,
                   "--accountant", accountant)
    assert plan["noise_calibrated"] is True
    assert 2.0 - 0.011 <= plan["epsilon"] <= 2.0
    assert plan["epsilon_by_accountant"][accountant] == plan["epsilon"]
    # More noise than needed would also meet the target: calibration gives (nearly) the least.
    lower = dry_run(capsys, "--dataset", "mnist", "--noise", plan["noise_multiplier"] * 0.97, "--epochs", 10,
                    "--batch-size", 512, "--accountant", accountant)
    assert lower["epsilon"] > 2.0


def test_dataset_sizes_holdout_and_subset_set_n(capsys):
    assert dry_run(capsys, "--dataset", "cifar10", "--noise", 1.0)["n_train"] == 50000
    held = dry_run(capsys, "--dataset", "cifar10", "--noise", 1.0, "--public-holdout", "--public-size", 500)
    assert held["n_train"] == 49500
    sub = dry_run(capsys, "--dataset", "mnist", "--noise", 1.0, "--train-subset", 5000, "--batch-size", 100)
    assert sub["n_train"] == 5000 and sub["sample_rate"] == pytest.approx(0.02)


def test_dry_run_reads_no_data(capsys, tmp_path):
    """The plan comes from known sizes: a data root that does not exist is never looked at."""
    plan = dry_run(capsys, "--dataset", "cifar10", "--noise", 1.0, "--data-root", tmp_path / "absent", "--out",
                   tmp_path / "runs")
    assert plan["epsilon"] > 0
    assert not (tmp_path / "absent").exists() and not (tmp_path / "runs").exists()


def test_non_private_plan_has_no_epsilon(capsys):
    plan = dry_run(capsys, "--dataset", "mnist", "--engine", "non-private")
    assert plan["private"] is False and plan["epsilon"] is None and plan["noise_multiplier"] is None
