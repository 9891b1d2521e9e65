"""src/report.py: what a run prints, and the interval its test accuracy is reported with."""
from __future__ import annotations

import pytest

from src.report import accuracy_interval


def test_accuracy_interval_is_the_binomial_95_percent_interval():
    low, high = accuracy_interval(70.0, 1000)
    assert low < 70.0 < high and (high - low) / 2 == pytest.approx(2.8, abs=0.1)  # the issue's +-2.8 points
    narrow = accuracy_interval(70.0, 10000)
    assert narrow[0] > low and narrow[1] < high
    assert accuracy_interval(100.0, 50)[1] == pytest.approx(100.0) and accuracy_interval(0.0, 50)[0] == 0.0


def test_the_interval_is_plain_floats_that_a_weights_only_checkpoint_can_hold(tmp_path):
    import torch

    interval = accuracy_interval(97.5, 10000)
    assert all(type(bound) is float for bound in interval)
    torch.save({"summary": {"test_acc_ci95": interval}}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["summary"]["test_acc_ci95"] == interval
