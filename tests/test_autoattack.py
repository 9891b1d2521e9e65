"""--eval-attack autoattack: AutoAttack's standard version from torchattacks' parts with the paper's budgets, on
the plain model, seeded from the evaluation stream without touching the global random state, reported next to
PGD; it sees through gradient masking that PGD does not, and works with --eval-only and the masking checks.
--eval-attack apgd: its white-box pair, which does not."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from attacks.autoattack import ensemble
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


def test_the_ensembles_have_the_papers_budgets():
    """Croce and Hein's standard version: 100 iterations of APGD-CE, APGD-T and FAB-T (9 target classes each),
    then 5000 Square queries. torchattacks' own AutoAttack runs 10 iterations, so building it that way fails."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    standard = ensemble(model, "autoattack", norm="linf", eps=0.1, n_classes=10, seed=0).attacks
    assert [type(a).__name__ for a in standard] == ["APGD", "APGDT", "FAB", "Square"]
    apgd_ce, apgd_t, fab_t, square = standard
    assert apgd_ce.loss == "ce" and apgd_ce.steps == apgd_t.steps == fab_t.steps == 100
    assert apgd_t.n_target_classes == fab_t.n_target_classes == 9 and fab_t.multi_targeted
    assert square.n_queries == 5000
    assert all(a.n_restarts == 1 and a.eps == 0.1 and a.norm == "Linf" for a in standard)
    pair = ensemble(model, "apgd", norm="l2", eps=0.5, n_classes=10, seed=0).attacks
    assert [type(a).__name__ for a in pair] == ["APGD", "APGDT"] and pair[0].norm == "L2"


def test_the_white_box_pair_is_as_strong_as_pgd_but_does_not_see_through_masking():
    """``apgd`` on a plain linear model reaches what PGD-40 does (or lower); on the masked one it stalls as PGD
    does: only the ensemble's black-box Square breaks it, which is why a result names the attack that ran."""
    labels = np.random.default_rng(0).integers(0, 10, 60)
    images = torch.from_numpy(class_patterns(labels, 28, 28, 1, seed=1)).permute(0, 3, 1, 2).contiguous()
    data = ImageTensorDataset(images, torch.from_numpy(labels))
    x, y = data.__getitems__(range(60))
    linear = _fitted(x, y)
    cpu = torch.device("cpu")
    common = dict(size=60, batch_size=60, device=cpu, seed=0)
    plain = nn.Sequential(nn.Flatten(), linear).eval()
    pgd = robust_accuracy(plain, data, AttackSpec(method="pgd", eps=0.1, alpha=0.01, steps=40), **common)
    pair = robust_accuracy(plain, data, AttackSpec(method="apgd", eps=0.1, alpha=0.0, steps=0), **common)
    assert pair <= pgd + 100 / 60, (pair, pgd)
    assert robust_accuracy(Masked(linear).eval(), data, AttackSpec(method="apgd", eps=0.3, alpha=0.0, steps=0),
                           **common) > 80


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
    assert summary["eval_attack"]["method"] == "autoattack" and "AutoAttack (standard:" in evaluated.stdout
    checks = summary["masking_checks"]
    assert checks["autoattack_robust_acc"] == summary["robust_acc"]
    pgd = run_cli(*common, "--eval-only", tmp_path / "model", "--eval-robust-size", 30, "--run-id", "pgd",
                  "--seed", 0, cwd=tmp_path)
    assert pgd.returncode == 0, pgd.stderr
    pgd_acc = json.loads((tmp_path / "pgd" / "summary.json").read_text())["robust_acc"]
    assert summary["robust_acc"] <= pgd_acc + 100 / 30, "AutoAttack is at least as strong as PGD-40 here"
    assert checks["radius_curve"][0]["robust_acc"] == pgd_acc, "the masking checks vary the evaluation PGD"
