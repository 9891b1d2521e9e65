"""The privacy budget guard (--max-epsilon) and calibration (--target-epsilon) never overshoot."""
from __future__ import annotations

import json

import pytest

from src.accounting import calibrate_noise, epsilon_from_history, plan_privacy, steps_within_budget
from src.config import build_config
from src.mnist import DEFAULTS as MNIST_DEFAULTS
from tests.conftest import run_cli


@pytest.mark.parametrize("accountant", ["rdp", "prv"])  # gdp may not guard (test_released_outputs)
@pytest.mark.parametrize("noise,sample_rate,max_epsilon", [(1.0, 0.01, 2.0), (0.8, 0.05, 5.0), (3.0, 0.004, 0.2)])
def test_budget_steps_are_the_last_step_within_the_budget(accountant, noise, sample_rate, max_epsilon):
    """What 'check before each step' decides, asked of the accountant step by step around the answer."""
    steps = 4000
    allowed = steps_within_budget(max_epsilon, noise=noise, sample_rate=sample_rate, steps=steps,
                                  accountant=accountant, delta=1e-5)
    assert 0 < allowed < steps
    assert epsilon_from_history(accountant, [(noise, sample_rate, allowed)], 1e-5) <= max_epsilon
    assert epsilon_from_history(accountant, [(noise, sample_rate, allowed + 1)], 1e-5) > max_epsilon


# GDP is an approximation and may not calibrate (test_released_outputs).
@pytest.mark.parametrize("accountant,target", [(a, t) for a in ("rdp", "prv") for t in (0.5, 1.0, 3.0, 8.0)])
def test_calibration_never_overshoots_its_target(accountant, target):
    steps, sample_rate = 2350, 1 / 118
    noise = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=sample_rate, steps=steps,
                            accountant=accountant)
    spent = epsilon_from_history(accountant, [(noise, sample_rate, steps)], 1e-5)
    assert spent <= target
    assert spent > 0.95 * target, "calibration should land close below the target, not far below"


def test_planned_run_at_its_target_spends_at_most_the_target():
    for accountant in ("rdp", "prv"):
        config = build_config({"dataset": "mnist", "target_epsilon": 1.2, "epochs": 20, "accountant": accountant},
                              MNIST_DEFAULTS)
        plan = plan_privacy(config, n_train=60000)
        assert plan.epsilon <= 1.2 and plan.epsilon_by_accountant[accountant] == plan.epsilon


def _tiny(root, out, run_id, *extra):
    return ["--dataset", "mnist", "--data-root", root, "--train-subset", 240, "--batch-size", 32, "--epochs", 3,
            "--noise", 1.0, "--wandb", "disabled", "--out", out, "--run-id", run_id, "--eval-robust-size", 0,
            *extra]


def test_max_epsilon_stops_before_the_step_that_would_exceed_it(tiny_root, tmp_path):
    full = run_cli(*_tiny(tiny_root, tmp_path, "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    budget = (rows[0]["epsilon"] + rows[1]["epsilon"]) / 2  # runs out in the middle of epoch 2

    guarded = run_cli(*_tiny(tiny_root, tmp_path, "guarded", "--max-epsilon", budget), cwd=tmp_path)
    assert guarded.returncode == 0, guarded.stderr
    assert "the run will stop there" in guarded.stdout
    summary = json.loads((tmp_path / "guarded" / "summary.json").read_text())
    assert summary["status"] == "budget-exhausted" and "--max-epsilon" in summary["reason"]
    assert rows[0]["step"] < summary["steps"] < rows[1]["step"] and summary["steps"] == summary["budget_steps"]
    assert summary["epsilon"] <= budget
    assert epsilon_from_history("rdp", [(1.0, summary["sample_rate"], summary["steps"] + 1)], 1e-5) > budget
    guarded_rows = (tmp_path / "guarded" / "metrics.jsonl").read_text().splitlines()
    assert len(guarded_rows) == 2 and json.loads(guarded_rows[-1])["epsilon"] <= budget
    assert (tmp_path / "guarded" / "model.pt").is_file()
    assert run_cli("--resume", tmp_path / "guarded", cwd=tmp_path).returncode == 2  # nothing left to spend


def test_dry_run_shows_the_steps_the_budget_allows(tmp_path):
    result = run_cli("--dataset", "mnist", "--noise", 1, "--max-epsilon", 2, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_epsilon"] == 2 and 0 < report["budget_steps"] < report["steps"]
    assert epsilon_from_history("rdp", [(1.0, report["sample_rate"], report["budget_steps"])], 1e-5) <= 2
