"""--eval-attack autoattack: torchattacks' AutoAttack (standard) on the plain model, seeded from the evaluation
stream without touching the global random state, reported next to PGD; it sees through gradient masking that
PGD does not, and works with --eval-only and the masking checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from attacks.pgd import AttackSpec
from attacks.robust_eval import robust_accuracy
from src.data import ImageTensorDataset
from tests.conftest import class_patterns, run_cli


class Masked(nn.Module):
    """A linear classifier whose input gradient is blocked (``x.detach() + 0 * x``: the same outputs, a zero
    gradient): the textbook case of gradient masking, where gradient attacks stall and the model is no more
    robust than the linear model it computes."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear((x.detach() + 0 * x).flatten(1))


def _fitted(images: torch.Tensor, labels: torch.Tensor) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(images[0].numel(), 10)
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(linear(images.flatten(1)), labels).backward()
        optimizer.step()
    return linear


def test_autoattack_sees_through_gradient_masking_that_stalls_pgd():
    labels = np.random.default_rng(0).integers(0, 10, 60)
    images = torch.from_numpy(class_patterns(labels, 28, 28, 1, seed=1)).permute(0, 3, 1, 2).contiguous()
    data = ImageTensorDataset(images, torch.from_numpy(labels))
    x, y = data.__getitems__(range(60))
    model = Masked(_fitted(x, y)).eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    cpu = torch.device("cpu")
    pgd = robust_accuracy(model, data, AttackSpec(method="pgd", eps=0.3, alpha=0.03, steps=40), size=60,
                          batch_size=60, device=cpu, seed=0)
    state = torch.get_rng_state()
    auto = robust_accuracy(model, data, AttackSpec(method="autoattack", eps=0.3, alpha=0.0, steps=0), size=60,
                           batch_size=60, device=cpu, seed=0)
    assert torch.equal(state, torch.get_rng_state()), "AutoAttack must not move the run's global random stream"
    assert pgd > 80, f"PGD should be stalled by the masked gradient ({pgd}%)"
    assert auto < pgd - 40, f"AutoAttack's Square attack should break the masked model ({auto}% vs PGD {pgd}%)"


@pytest.mark.slow
def test_eval_only_with_autoattack_and_masking_checks(tiny_root, tmp_path):
    common = ["--dataset", "mnist", "--data-root", tiny_root, "--wandb", "disabled", "--out", tmp_path]
    trained = run_cli(*common, "--train-subset", 240, "--batch-size", 32, "--epochs", 2, "--noise", 0.5,
                      "--eval-robust-size", 0, "--run-id", "model", "--seed", 0, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_cli(*common, "--eval-only", tmp_path / "model", "--eval-attack", "autoattack",
                        "--eval-robust-size", 30, "--masking-checks", "--run-id", "aa", "--seed", 0, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads((tmp_path / "aa" / "summary.json").read_text())
    assert summary["eval_attack"]["method"] == "autoattack" and "AutoAttack (standard)" in evaluated.stdout
    checks = summary["masking_checks"]
    assert checks["autoattack_robust_acc"] == summary["robust_acc"]
    pgd = run_cli(*common, "--eval-only", tmp_path / "model", "--eval-robust-size", 30, "--run-id", "pgd",
                  "--seed", 0, cwd=tmp_path)
    assert pgd.returncode == 0, pgd.stderr
    pgd_acc = json.loads((tmp_path / "pgd" / "summary.json").read_text())["robust_acc"]
    assert summary["robust_acc"] <= pgd_acc + 100 / 30, "AutoAttack is at least as strong as PGD-40 here"
    assert checks["radius_curve"][0]["robust_acc"] == pgd_acc, "the masking checks vary the evaluation PGD"
