"""``vision.py --robust`` and ``--eval-only`` end to end on tiny torchvision-format data."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.test_cli_end_to_end import read_run

TINY = ["--train-subset", 120, "--batch-size", 40, "--physical-batch-size", 20, "--lr", 0.5, "--clip", 1.0,
        "--wandb", "disabled"]
ROBUST = ["--robust", "--pgd-steps", 2, "--eval-pgd-steps", 3, "--eval-robust-size", 24]


@pytest.mark.slow
def test_robust_dp_run_with_public_batchnorm(tiny_root, tmp_path):
    clean_args = ["--dataset", "mnist", "--data-root", tiny_root, *TINY, "--epochs", 2, "--noise", 1.0,
                  "--engine", "bk", "--norm", "bn-public", "--public-data", tiny_root / "public105.npz",
                  "--public-size", 105, "--out", tmp_path / "runs", "--run-id", "robust"]
    args = [*clean_args, *ROBUST]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config, metrics, summary = read_run(tmp_path / "runs" / "robust")
    assert config["robust"]["robust"] and config["robust"]["pgd_eps"] == 0.1  # MNIST's default radius
    assert config["robust"]["pgd_alpha"] == pytest.approx(2.5 * 0.1 / 2)
    assert all(m["robust_acc"] is not None for m in metrics)  # every epoch for a robust run
    assert summary["robust_acc"] == metrics[-1]["robust_acc"] and 0 <= summary["robust_acc"] <= 100
    assert summary["eval_attack"] == {"method": "pgd", "norm": "linf", "eps": 0.1, "alpha": pytest.approx(0.25 / 3),
                                      "steps": 3, "restarts": 1, "random_start": True}
    assert summary["train_attack"]["steps"] == 2 and summary["adv_ratio"] == 1.0
    # Robust training changes neither the privacy plan nor the accounting.
    plan = json.loads(run_cli(*args, "--dry-run", cwd=tmp_path).stdout)
    clean_plan = json.loads(run_cli(*clean_args, "--dry-run", cwd=tmp_path).stdout)
    assert summary["epsilon"] == pytest.approx(plan["epsilon"], rel=1e-9) == clean_plan["epsilon"]
    assert "robust accuracy" in result.stdout


@pytest.mark.slow
def test_clean_run_evaluates_robustness_after_the_last_epoch_then_eval_only(tiny_root, tmp_path):
    out = tmp_path / "runs"
    common = ["--dataset", "mnist", "--data-root", tiny_root, "--out", out, "--wandb", "disabled"]
    result = run_cli(*common, *TINY[:-2], "--epochs", 2, "--engine", "non-private", "--eval-robust-size", 16,
                     "--eval-pgd-steps", 2, "--run-id", "clean", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, metrics, summary = read_run(out / "clean")
    assert [m["robust_acc"] is None for m in metrics] == [True, False]

    # --eval-only takes the dataset from the run's config.json; naming another one is an error
    other = run_cli("--dataset", "cifar10", *common[2:], "--eval-only", out / "clean", cwd=tmp_path)
    assert other.returncode == 2 and "trained on 'mnist', not --dataset cifar10" in other.stderr, other.stderr
    without_dataset = common[2:]
    result = run_cli(*without_dataset, "--eval-only", out / "clean", "--pgd-eps", "study", "--eval-pgd-steps", 5,
                     "--eval-pgd-restarts", 2, "--eval-robust-size", 30, "--masking-checks",
                     "--transfer-from", out / "clean", "--run-id", "clean-eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((out / "clean-eval" / "summary.json").read_text())
    assert evaluated["status"] == "finished" and evaluated["source_run"] == str((out / "clean").resolve())
    assert evaluated["test_acc"] == pytest.approx(summary["test_acc"])  # same weights, same test set
    assert evaluated["eval_attack"]["eps"] == 0.03 and evaluated["eval_attack"]["restarts"] == 2
    assert evaluated["eval_robust_size"] == 30 and 0 <= evaluated["robust_acc"] <= 100
    checks = evaluated["masking_checks"]
    assert [p["eps"] for p in checks["radius_curve"]] == [0.03, 0.06, 0.12, 0.5]
    assert {"more_steps", "more_restarts", "transfer", "passed"} <= checks.keys()
    assert not (out / "clean" / "summary.json").read_text() == ""  # the source run is untouched
    assert len(list(out.iterdir())) == 2


@pytest.mark.slow
def test_eval_only_without_dataset_refuses_a_missing_run_in_one_line(tmp_path):
    result = run_cli("--eval-only", tmp_path / "nope", "--out", tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 2 and "not a finished run directory: config.json is missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cifar_robust_run_with_fgsm_rs(tiny_root, tmp_path):
    result = run_cli("--dataset", "cifar10", "--data-root", tiny_root, "--train-subset", 16, "--batch-size", 8,
                     "--physical-batch-size", 4, "--epochs", 1, "--noise", 1.0, "--robust", "--attack", "fgsm-rs",
                     "--adv-ratio", 0.5, "--eval-robust-size", 8, "--eval-pgd-steps", 2, "--test-subset", 16,
                     "--out", tmp_path / "runs", "--run-id", "cifar", "--wandb", "disabled", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, _, summary = read_run(tmp_path / "runs" / "cifar")
    assert summary["train_attack"]["method"] == "fgsm-rs"
    assert summary["train_attack"]["alpha"] == pytest.approx(1.25 * 8 / 255)
    assert summary["adv_ratio"] == 0.5 and summary["robust_acc"] is not None


@pytest.mark.slow
def test_eval_only_refuses_a_missing_run(tiny_root, tmp_path):
    result = run_cli("--dataset", "mnist", "--data-root", tiny_root, "--eval-only", tmp_path / "nope",
                     "--out", tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 2 and "not a finished run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
