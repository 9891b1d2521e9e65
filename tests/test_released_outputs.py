"""Everything a run releases is covered by the epsilon it reports (issue: privacy of released outputs).

Each test here failed before the fix it guards: training-set statistics in the outputs, a resume on other
data, GDP calibrating a run, a default seed that replays the noise, a dry run's n presented as a count,
normalization constants from the private set, no validation split, outputs written before the checkpoint
that covers them, and an audit whose sampling rate depended on its coin flips.
"""
from __future__ import annotations

import json

import pytest
import torch

from experiments.audit import Canaries, schedule_size, with_canaries
from experiments.collect import COLUMNS
from experiments.sweep import point_flags
from src import checkpoint
from src.accounting import (budget_step_limit, calibrate_noise, epsilon_from_history, plan_privacy,
                            steps_within_budget)
from src.config import build_config
from src.datasets import DATASETS, get_dataset
from src.mnist import DEFAULTS as MNIST_DEFAULTS
from tests.cli_process import run_python_c
from tests.conftest import MNIST_TRAIN, REPO, run_cli, write_mnist_like

TRAINING_SET_KEYS = {"train_loss", "train_acc"}


def _tiny(root, out, run_id, *extra):
    return ["--dataset", "mnist", "--data-root", root, "--batch-size", 32, "--epochs", 2, "--noise", 1.0,
            "--engine", "hooks", "--wandb", "disabled", "--out", out, "--run-id", run_id,
            "--eval-robust-size", 0, *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# 1. Training-set statistics -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_private_run_releases_no_statistics_of_its_training_batches(tiny_root, tmp_path):
    result = run_cli(*_tiny(tiny_root, tmp_path, "plain", "--train-subset", 200), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "plain"
    released = set(json.loads((run_dir / "summary.json").read_text()))
    for row in _metrics(run_dir):
        released |= set(row)
    assert not released & TRAINING_SET_KEYS
    assert not any("unprotected" in k for k in released if k != "unprotected_train_stats")
    assert "loss" not in result.stdout.lower() and "train " not in result.stdout
    assert not TRAINING_SET_KEYS & set(COLUMNS), "experiments.collect must not gather them either"


@pytest.mark.slow
def test_unprotected_training_statistics_only_on_request_and_labelled(tiny_root, tmp_path):
    result = run_cli(*_tiny(tiny_root, tmp_path, "opt-in", "--train-subset", 200, "--unprotected-train-stats"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _metrics(tmp_path / "opt-in")
    assert all({"train_loss_unprotected", "train_acc_unprotected"} <= set(row) for row in rows)
    assert not TRAINING_SET_KEYS & set(rows[0])
    assert "NOT covered by epsilon" in result.stdout and "UNPROTECTED" in result.stdout
    assert json.loads((tmp_path / "opt-in" / "summary.json").read_text())["unprotected_train_stats"] is True


# 2. Resume on other data ----------------------------------------------------------------------------

def _interrupted_run(root, tmp_path, run_id):
    result = run_cli(*_tiny(root, tmp_path, run_id, "--seed", 0), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary_path = tmp_path / run_id / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "status": "interrupted"}))
    return tmp_path / run_id


@pytest.mark.slow
def test_resume_refuses_a_different_private_set(tiny_root, tmp_path):
    run_dir = _interrupted_run(tiny_root, tmp_path, "run")
    bigger, same_size = tmp_path / "bigger", tmp_path / "same_size"
    write_mnist_like(bigger, "MNIST", 2 * MNIST_TRAIN, 60, seed=1)
    write_mnist_like(same_size, "MNIST", MNIST_TRAIN, 60, seed=11)  # same n, other images
    for root, words in ((bigger, f"now has {2 * MNIST_TRAIN} examples"), (same_size, "private training set differs")):
        result = run_cli("--resume", run_dir, "--data-root", root, cwd=tmp_path)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("--resume", run_dir, "--data-root", tiny_root, cwd=tmp_path).returncode == 0


def test_the_budget_guard_counts_what_the_accountant_recorded():
    """A history spent at a higher sample rate leaves fewer steps than the plan alone would allow."""
    config = build_config({"dataset": "mnist", "noise": 1.0, "max_epsilon": 2.0, "epochs": 40, "accountant": "rdp",
                           "batch_size": 512}, MNIST_DEFAULTS)  # sample rate 1/118: 100 steps at twice it stay below 2
    plan = plan_privacy(config, n_train=60000)
    history = [(1.0, 2 * plan.sample_rate, 100)]
    assert epsilon_from_history("rdp", history, plan.delta) < 2.0
    limit = budget_step_limit(plan, history, steps_taken=100)
    assert 100 < limit < plan.budget_steps
    more = limit - 100
    assert epsilon_from_history("rdp", history + [(1.0, plan.sample_rate, more)], plan.delta) <= 2.0
    assert epsilon_from_history("rdp", history + [(1.0, plan.sample_rate, more + 1)], plan.delta) > 2.0
    assert budget_step_limit(plan, [], 0) == plan.budget_steps


# 3. GDP never calibrates or guards ------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--target-epsilon", 3], ["--noise", 1.0], ["--noise", 1.0, "--max-epsilon", 3]])
def test_gdp_cannot_be_the_accountant_of_a_run(flags, tmp_path):
    result = run_cli("--dataset", "mnist", "--accountant", "gdp", *flags, "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "approximation" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_calibration_and_budget_refuse_gdp_and_the_rigorous_ones_hold_under_prv():
    with pytest.raises(ValueError, match="rigorous"):
        calibrate_noise(target_epsilon=3, delta=1e-5, sample_rate=1 / 118, steps=4720, accountant="gdp")
    with pytest.raises(ValueError, match="rigorous"):
        steps_within_budget(3, noise=1.0, sample_rate=0.01, steps=100, accountant="gdp", delta=1e-5)
    # The review's case: MNIST at target 3. GDP's noise (1.04) is below what either rigorous accountant needs.
    config = build_config({"dataset": "mnist"}, MNIST_DEFAULTS)
    plan = plan_privacy(config, n_train=60000)
    assert plan.epsilon_by_accountant["prv"] <= 3 and plan.epsilon_by_accountant["rdp"] <= 3
    assert set(plan.epsilon_by_accountant) == {"rdp", "prv"}
    assert plan.epsilon_gdp_approximation < plan.epsilon_by_accountant["prv"]


# 5. Seeds ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_without_seed_the_noise_and_batches_come_from_the_os_and_stay_in_the_checkpoint(tiny_root, tmp_path):
    outputs = []
    for run_id in ("first", "second"):
        result = run_cli(*_tiny(tiny_root, tmp_path, run_id, "--train-subset", 200, "--epochs", 1), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "--seed" not in result.stdout
        config = json.loads((tmp_path / run_id / "config.json").read_text())
        assert config["train"]["seed"] is None
        outputs.append(torch.load(tmp_path / run_id / "model.pt"))
        saved = checkpoint.load(tmp_path / run_id)
        assert {"noise", "sampling"} <= set(saved["seeds"])
        assert str(saved["seeds"]["noise"]) not in (tmp_path / run_id / "config.json").read_text()
    assert any(not torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])

    seeded = run_cli(*_tiny(tiny_root, tmp_path, "seeded", "--train-subset", 200, "--epochs", 1, "--seed", 3),
                     cwd=tmp_path)
    assert seeded.returncode == 0 and seeded.stdout.count("stays as secret") == 1
    assert point_flags({"noise": 1.0})["seed"] == 0, "sweeps stay reproducible"


# 6. Dry run's n ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run_labels_its_n_as_an_assumption(tiny_root, tmp_path):
    result = run_cli("--dataset", "mnist", "--data-root", tiny_root, "--noise", 1, "--dry-run", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert report["n_train"] == 60000 and report["n_train_assumed"] is True
    assert "assumed" in report["n_train_basis"] and "60000" in report["n_train_basis"]


# 7. Normalization constants -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_input_normalization_uses_no_statistic_of_the_private_set(name):
    spec = get_dataset(name)
    config = build_config({"dataset": name, "noise": 1.0}, spec.defaults)
    model = spec.build_model(config.model)
    assert torch.all(model.standardize.mean == 0.5) and torch.all(model.standardize.std == 0.5)


# 8. Validation split ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_val_size_holds_out_the_last_private_images_and_leaves_n(tiny_root, tmp_path):
    spec = get_dataset("mnist")
    config = build_config({"dataset": "mnist", "data_root": str(tiny_root), "noise": 1.0, "val_size": 40,
                           "download": False}, spec.defaults)
    data = spec.load(config.data, False)
    full = spec.load(build_config({"dataset": "mnist", "data_root": str(tiny_root), "noise": 1.0,
                                   "download": False}, spec.defaults).data, False)
    assert len(data.train) == MNIST_TRAIN - 40 and torch.equal(data.val.images, full.train.images[-40:])
    assert torch.equal(data.train.images, full.train.images[:-40])
    assert spec.planned_train_size(config.data) == 60000 - 40

    result = run_cli(*_tiny(tiny_root, tmp_path, "val", "--val-size", 40), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "val" / "summary.json").read_text())
    assert summary["n_train"] == MNIST_TRAIN - 40 and summary["val_acc"] is not None
    assert all("val_acc" in row for row in _metrics(tmp_path / "val"))
    refused = run_cli(*_tiny(tiny_root, tmp_path, "too-big", "--val-size", MNIST_TRAIN), cwd=tmp_path)
    assert refused.returncode == 2 and "--val-size" in refused.stderr and not (tmp_path / "too-big").exists()


# 9. Checkpoint before release -------------------------------------------------------------------------

KILLED_AT_FIRST_RELEASE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from src.run_directory import RunDirectory
def save_model(self, state_dict):
    os.kill(os.getpid(), signal.SIGKILL)  # killed as epoch 1's model is about to be released
RunDirectory.save_model = save_model
import vision
sys.exit(vision.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_each_epoch_is_checkpointed_before_its_outputs_are_released(tiny_root, tmp_path):
    args = [str(a) for a in _tiny(tiny_root, tmp_path, "killed", "--train-subset", 200, "--seed", 0)]
    killed = run_python_c(KILLED_AT_FIRST_RELEASE.format(repo=str(REPO)), args, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr
    saved = checkpoint.load(tmp_path / "killed")
    assert checkpoint.position_of(saved).epoch == 1, "the epoch must be checkpointed before it is released"
    resumed = run_cli("--resume", tmp_path / "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after step 7 (epoch 2)" in resumed.stdout  # epoch 1 is not trained (and noised) again
    assert [row["epoch"] for row in _metrics(tmp_path / "killed")] == [1, 2]


# 10. The audit's schedule -----------------------------------------------------------------------------

def test_the_audit_fixes_its_sampling_before_the_canaries_are_drawn(tiny_root):
    spec = get_dataset("mnist")
    config = build_config({"dataset": "mnist", "data_root": str(tiny_root), "noise": 1.0, "download": False},
                          spec.defaults)
    schedules = set()
    for seed in range(4):
        canaries = Canaries.draw(100, 120, seed)
        data = with_canaries(spec, canaries, {}).load(config.data, False)
        assert len(data.train) == 100 + int(canaries.included.sum())
        schedules.add(data.schedule_size)
    assert schedules == {schedule_size(100, 120)} == {160}
