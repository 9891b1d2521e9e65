"""src/ema.py and --ema: the average of the weights is the warmed-up exponential moving average of the
weights after each step, evaluated and saved beside the model (its resume is in test_resume.py)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.collect import collect
from src.ema import weight_average
from tests.conftest import run_cli


def test_the_average_follows_the_warmed_up_decay():
    model = torch.nn.Linear(3, 2)
    average = weight_average(torch.nn.Linear(3, 2), decay=0.99)
    expected = None
    for t in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        if expected is None:
            expected = weights.clone()  # the first update copies
        else:
            d = min(0.99, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * weights
        average.update_parameters(model)
    got = torch.cat([p.flatten() for p in average.module.parameters()])
    assert torch.allclose(got, expected, atol=1e-6) and not any(p.requires_grad for p in average.parameters())
    assert weight_average(torch.nn.Linear(3, 2), decay=None) is None


def test_ema_zero_turns_off_the_average_cifar10_takes_by_default():
    from src.cifar10 import DEFAULTS
    from src.config import build_config
    from src.errors import UserError

    assert build_config({"dataset": "cifar10"}, DEFAULTS).train.ema == 0.999
    off = build_config({"dataset": "cifar10", "ema": 0.0}, DEFAULTS).train.ema
    assert off == 0 and weight_average(torch.nn.Linear(3, 2), decay=off) is None
    with pytest.raises(UserError, match="0 turns it off"):
        build_config({"dataset": "cifar10", "ema": 1.0}, DEFAULTS)


@pytest.mark.slow
def test_a_run_with_ema_evaluates_and_saves_both_models(tiny_root, tmp_path):
    result = run_cli("--dataset", "mnist", "--data-root", tiny_root, "--train-subset", 96, "--batch-size", 32,
                     "--epochs", 2, "--noise", 1.0, "--ema", 0.9, "--seed", 0, "--wandb", "disabled",
                     "--eval-robust-size", 16, "--out", tmp_path, "--run-id", "ema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "ema"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("test_acc_ema", "test_loss_ema", "robust_acc_ema"):
        assert summary[key] is not None and all(key in row for row in rows), key
    raw, averaged = torch.load(run / "model.pt"), torch.load(run / "model_ema.pt")
    assert raw.keys() == averaged.keys() and not torch.equal(raw["features.0.weight"], averaged["features.0.weight"])
    assert "ema test" in result.stdout
    table = collect(tmp_path)  # the sweep CSV carries both models
    assert table["test_acc_ema"].notna().all() and (table["test_acc_ema"] == [r["test_acc_ema"] for r in rows]).all()
