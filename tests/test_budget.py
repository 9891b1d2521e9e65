"""The privacy budget guard (--max-epsilon) end to end: a run stops before the step that would exceed it.
(The accountant's side, the step search and calibration, is tested in test_accounting.py.)"""
from __future__ import annotations

import json

import pytest

from src.accounting import epsilon_from_history
from tests.conftest import run_cli


def _tiny(root, out, run_id, *extra):
    return ["--dataset", "mnist", "--data-root", root, "--train-subset", 240, "--batch-size", 32, "--epochs", 3,
            "--noise", 1.0, "--wandb", "disabled", "--out", out, "--run-id", run_id, "--eval-robust-size", 0,
            *extra]


@pytest.mark.slow
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


@pytest.mark.slow
def test_dry_run_shows_the_steps_the_budget_allows(tmp_path):
    result = run_cli("--dataset", "mnist", "--noise", 1, "--max-epsilon", 2, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_epsilon"] == 2 and 0 < report["budget_steps"] < report["steps"]
    assert epsilon_from_history("rdp", [(1.0, report["sample_rate"], report["budget_steps"])], 1e-5) <= 2
