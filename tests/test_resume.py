"""Resume without loss: a run killed with SIGKILL in the middle of an epoch and continued with --resume
ends bit for bit where an uninterrupted run of the same seed ends (weights, epsilon, metrics)."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from src import checkpoint
from tests.cli_process import run_python_c
from tests.conftest import REPO, run_cli

# Runs vision.py in this process, but SIGKILLs it at the start of its KILL_AT-th physical batch:
# no handler, no flush, no cleanup, as when a machine's scheduler kills a job.
KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import src.loop as loop
original, calls = loop._physical_step, [0]
def physical_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
loop._physical_step = physical_step
import vision
sys.exit(vision.main(sys.argv[1:]))
"""

TIMING = ("seconds", "train_seconds")


def _flags(root, out, run_id, extra):
    return ["--dataset", "mnist", "--data-root", root, "--train-subset", 240, "--batch-size", 32,
            "--physical-batch-size", 16, "--epochs", 3, "--noise", 1.0, "--wandb", "disabled", "--out", out,
            "--run-id", run_id, "--checkpoint-every", 3, "--eval-robust-size", 20, "--seed", 0, *extra]


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _metrics(run_dir):
    return _untimed(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("extra", [
    ["--engine", "bk"],
    ["--engine", "hooks", "--norm", "bn-public", "--robust", "--attack", "fgsm-rs", "--adv-ratio", "0.5"],
    ["--engine", "mixed-ghost", "--norm", "bn-public", "--augment", "--augmult", "2", "--ema", "0.9"],
    ["--engine", "bk", "--model", "scatternet-linear", "--norm", "bn-dp", "--ema", "0.9"],
], ids=["bk", "hooks-bn-public-robust", "mixed-ghost-augmult-ema", "bk-scatternet-bn-dp-ema"])
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(extra, tiny_root, tmp_path):
    reference = run_cli(*_flags(tiny_root, tmp_path, "uninterrupted", extra), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    args = [str(a) for a in _flags(tiny_root, tmp_path, "killed", extra)]
    killed = run_python_c(KILLED_RUN.format(repo=str(REPO), kill_at=46), args, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    killed_dir = tmp_path / "killed"
    assert json.loads((killed_dir / "summary.json").read_text())["status"] == "running"
    position = checkpoint.position_of(checkpoint.load(killed_dir))
    assert position.partial is not None and 0 < position.partial.steps < 8, "the kill must land mid-epoch"
    assert position.epoch == 2

    resumed = run_cli("--resume", killed_dir, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after step {position.step}" in resumed.stdout
    if "bn-dp" in extra:  # its statistics come from the checkpoint: a second estimate would be a second release
        assert "bn-dp: released" not in resumed.stdout
        assert tuple(checkpoint.load(killed_dir)["accountant_history"][0]) == (8.0, 1.0, 2)

    files = ["model.pt"] + (["model_ema.pt"] if "--ema" in extra else [])  # the average of the weights too
    for file in files:
        expected, got = torch.load(tmp_path / "uninterrupted" / file), torch.load(killed_dir / file)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), f"{file}: {name} differs after resume"
    assert _metrics(killed_dir) == _metrics(tmp_path / "uninterrupted")
    summary = json.loads((killed_dir / "summary.json").read_text())
    reference_summary = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed"] == 1
    for key in ("epsilon", "epsilon_by_accountant", "epsilon_gdp_approximation", "steps", "test_acc", "robust_acc"):
        assert summary[key] == reference_summary[key], key


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_changed_settings(tiny_root, tmp_path):
    done = run_cli(*_flags(tiny_root, tmp_path, "done", ["--epochs", 1]), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    again = run_cli("--resume", tmp_path / "done", cwd=tmp_path)
    assert again.returncode == 2 and "is finished: there is nothing to resume" in again.stderr
    summary_path = tmp_path / "done" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps(dict(summary, status="failed")))
    changed = run_cli("--resume", tmp_path / "done", "--lr", "0.1", cwd=tmp_path)
    assert changed.returncode == 2 and "drop --lr" in changed.stderr
    assert "Traceback" not in changed.stderr + again.stderr
