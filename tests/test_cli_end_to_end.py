"""``python vision.py`` end to end on tiny torchvision-format data: run directory, summary, model, wandb."""
from __future__ import annotations

import json

import pytest
import torch

from src.config import build_config
from src.datasets import get_dataset
from tests.conftest import CIFAR_TEST, run_cli

METRIC_KEYS = {"epoch", "step", "test_loss", "test_acc", "epsilon", "seconds"}
SUMMARY_KEYS = {"test_acc", "epsilon", "delta", "noise_multiplier", "accountant", "engine", "epochs", "steps",
                "wall_seconds", "status"}


def read_run(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return config, metrics, summary


def load_model(dataset: str, config: dict, run_dir):
    """model.pt loads into a freshly built model, with no Opacus wrapper involved."""
    spec = get_dataset(dataset)
    model = spec.build_model(build_config({"dataset": dataset, **config["model"]}, spec.defaults).model)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True), strict=True)
    return model


@pytest.mark.slow
def test_mnist_private_run(tiny_root, tmp_path):
    args = ["--dataset", "mnist", "--data-root", tiny_root, "--train-subset", 200, "--batch-size", 50,
            "--physical-batch-size", 20, "--epochs", 2, "--target-epsilon", 3, "--lr", 0.5, "--clip", 1.0,
            "--out", tmp_path / "runs", "--run-id", "mnist-dp", "--wandb", "offline"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "mnist-dp"
    config, metrics, summary = read_run(run_dir)
    plan = json.loads(run_cli(*args, "--dry-run", cwd=tmp_path).stdout)

    assert SUMMARY_KEYS <= summary.keys() and summary["status"] == "finished"
    assert [m["epoch"] for m in metrics] == [1, 2] and all(METRIC_KEYS <= m.keys() for m in metrics)
    # What the dry run promised is what training spent.
    assert summary["steps"] == plan["steps"] == metrics[-1]["step"]
    low, high = summary["test_acc_ci95"]  # the accuracy's 95% interval on the test images present
    assert low <= summary["test_acc"] <= high and summary["n_test"] == config["n_test"]
    assert summary["noise_multiplier"] == plan["noise_multiplier"]
    assert summary["epsilon"] == pytest.approx(plan["epsilon"], rel=1e-9)
    assert summary["epsilon"] <= 3.0 and metrics[0]["epsilon"] < metrics[1]["epsilon"]
    assert summary["epsilon_by_accountant"]["rdp"] == pytest.approx(summary["epsilon"], rel=1e-9)
    assert config["privacy"]["target_epsilon"] == 3 and config["plan"]["n_train"] == 200
    assert config["train"]["physical_batch_size"] == 20 and "git_commit" in config
    # Console: one line per epoch with loss, accuracies and epsilon.
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("eps" in line and "test" in line for line in epoch_lines)
    # The run line says what the noise will spend; with the output in a file (no terminal) the progress is a
    # one-line estimate after the first few physical batches (src.progress).
    run_line = result.stdout.splitlines()[0]
    assert f"epsilon {plan['epsilon']:.4g} after all {plan['steps']} steps" in run_line
    estimates = [line for line in result.stdout.splitlines() if line.startswith("estimate: ")]
    assert len(estimates) == 1 and "img/s on cpu" in estimates[0] and "for 2 epoch(s)" in estimates[0], result.stdout
    # Files written atomically leave no temporaries behind; wandb ran offline inside the run directory.
    assert not list(run_dir.glob(".*.tmp"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    model = load_model("mnist", config, run_dir)
    images = torch.rand(3, 1, 28, 28)
    assert model(images).shape == (3, 10)


@pytest.mark.slow
def test_cifar10_private_run_on_a_partial_folder(tiny_root, tmp_path):
    # CIFAR-10's defaults otherwise (augmult 4, EMA, weight standardization); a short robust evaluation
    args = ["--dataset", "cifar10", "--data-root", tiny_root, "--train-subset", 16, "--batch-size", 8,
            "--physical-batch-size", 8, "--epochs", 1, "--noise", 1.0, "--engine", "hooks", "--norm", "group",
            "--eval-robust-size", 8, "--eval-pgd-steps", 2,
            "--out", tmp_path / "runs", "--run-id", "cifar", "--wandb", "disabled"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "partial CIFAR-10: using 1 of 5 training batches" in result.stderr
    config, metrics, summary = read_run(tmp_path / "runs" / "cifar")
    assert summary["status"] == "finished" and summary["n_train"] == 16 and summary["engine"] == "hooks"
    assert config["n_test"] == CIFAR_TEST and any("partial" in note for note in config["data_notes"])
    assert len(metrics) == 1 and metrics[0]["step"] == summary["steps"] == 2
    model = load_model("cifar10", config, tmp_path / "runs" / "cifar")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_non_private_run_learns_and_reports_no_epsilon(tiny_root, tmp_path):
    args = ["--dataset", "mnist", "--data-root", tiny_root, "--batch-size", 32, "--epochs", 3,
            "--engine", "non-private", "--lr", 0.1, "--momentum", 0.9, "--out", tmp_path, "--run-id", "np",
            "--wandb", "disabled"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, metrics, summary = read_run(tmp_path / "np")
    assert summary["status"] == "finished" and summary["epsilon"] is None and summary["noise_multiplier"] is None
    assert summary["test_acc"] >= 90.0, metrics  # the synthetic classes are easy to separate


@pytest.mark.slow
def test_diverging_run_stops_with_a_clear_status(tiny_root, tmp_path):
    args = ["--dataset", "mnist", "--data-root", tiny_root, "--train-subset", 100, "--batch-size", 25,
            "--epochs", 2, "--engine", "non-private", "--lr", 1e38, "--out", tmp_path, "--run-id", "nan",
            "--wandb", "disabled"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    # The stop reads the weights (the DP output), never the private batch's loss.
    assert summary["status"] == "diverged" and "weights non-finite" in summary["reason"]
    assert "Traceback" not in result.stderr and "weights non-finite" in result.stderr


@pytest.mark.slow
def test_bn_public_run_with_book_keeping(tiny_root, tmp_path):
    args = ["--dataset", "mnist", "--data-root", tiny_root, "--train-subset", 120, "--batch-size", 40,
            "--physical-batch-size", 20, "--epochs", 1, "--noise", 1.0, "--norm", "bn-public", "--engine", "bk",
            "--public-data", tiny_root / "public105.npz", "--public-size", 64, "--out", tmp_path, "--run-id", "bn",
            "--wandb", "disabled"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config, metrics, summary = read_run(tmp_path / "bn")
    assert summary["status"] == "finished" and summary["engine"] == "bk" and summary["steps"] == 3
    assert config["public_data"].endswith("public105.npz:x_test (first 64 of 105)") and config["public_images_used"] == 64
    state = torch.load(tmp_path / "bn" / "model.pt", weights_only=True)
    assert state["features.1.0.refreshed"] and state["features.1.0.public_var"].gt(0).all()
    load_model("mnist", config, tmp_path / "bn")


def test_explain_engine_shows_the_mixed_decision(capsys):
    import vision

    assert vision.main(["--dataset", "cifar10", "--engine", "bk", "--explain-engine"]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| stages")}
    # the decision of the run: cifar10's defaults give 4 augmult views, which are 4 x 4x4 = 64 positions in stage 4
    assert "instantiate" in rows["stages.0.0.conv1"] and "ghost (T=64" in rows["stages.3.1.conv2"]
    assert "‖g‖·‖a‖" in table and "GroupNorm" in table
