"""Preemption: SIGTERM (or SIGINT) in the middle of an epoch finishes the batch in progress, checkpoints the last
finished step, marks the run ``interrupted`` with the signal, and exits promptly with code 130; ``--resume``
then ends bit for bit where an uninterrupted run ends. A second signal exits at once and leaves the last good
checkpoint. The sweep runner forwards a signal to its running points and resumes them on its next call."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from src import checkpoint
from tests.cli_process import run_python_c
from tests.conftest import REPO, run_cli

# vision.py in this process, sending itself SIGNAL at the start of its AT-th physical batch, inside it (so the
# batch is abandoned), or with AT "eval-N" inside the N-th evaluation of the test set (TWICE: a second one
# right after the first), and writing the time of the first signal to signalled_at.
SIGNALLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import src.loop as loop
import src.train as train
at = {at!r}
def signal_now():
    open("signalled_at", "w").write(repr(time.time()))
    os.kill(os.getpid(), signal.{signal})
    if {twice}:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.{signal})
original, calls = loop._physical_step, [0]
def physical_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        signal_now()
    return original(*args, **kwargs)
loop._physical_step = physical_step
evaluate, evaluations = train.evaluate, [0]
def evaluating(*args, **kwargs):
    evaluations[0] += 1
    if at == "eval-" + str(evaluations[0]):
        signal_now()
    return evaluate(*args, **kwargs)
train.evaluate = evaluating
import vision
sys.exit(vision.main(sys.argv[1:]))
"""


def _flags(root, out, run_id, *extra):
    return ["--dataset", "mnist", "--data-root", root, "--train-subset", 240, "--batch-size", 32,
            "--physical-batch-size", 16, "--epochs", 3, "--noise", 1.0, "--wandb", "disabled", "--out", out,
            "--run-id", run_id, "--eval-robust-size", 0, "--seed", 0, *extra]


def _signalled(tmp_path, args, at: int, name: str = "SIGTERM", twice: bool = False):
    script = SIGNALLED_RUN.format(repo=str(REPO), at=at, signal=name, twice=twice)
    started = run_python_c(script, args, cwd=tmp_path)
    return started, float((tmp_path / "signalled_at").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tiny_root, tmp_path_factory):
    """The reference: the same run without a signal (one for all the signal cases)."""
    folder = tmp_path_factory.mktemp("reference")
    reference = run_cli(*_flags(tiny_root, folder, "uninterrupted", "--engine", "mixed-ghost", "--ema", "0.9"),
                        cwd=folder)
    assert reference.returncode == 0, reference.stderr
    return folder / "uninterrupted"


@pytest.mark.parametrize("name,at", [("SIGTERM", 21), ("SIGINT", 9), ("SIGTERM", 16), ("SIGTERM", "eval-2")],
                         ids=["sigterm-mid-epoch", "sigint-mid-epoch", "sigterm-at-an-epoch-end",
                              "sigterm-during-an-evaluation"])
@pytest.mark.slow
def test_a_signal_checkpoints_stops_and_the_resume_is_bit_for_bit(name, at, tiny_root, tmp_path, uninterrupted):
    stopped, signalled_at = _signalled(tmp_path, _flags(tiny_root, tmp_path, "stopped", "--engine", "mixed-ghost",
                                                        "--ema", "0.9"), at, name)
    assert time.time() - signalled_at < 30
    assert stopped.returncode == 130, stopped.stderr
    assert f"{name} received" in stopped.stderr
    run_dir = tmp_path / "stopped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and name in summary["reason"]
    assert "--resume" in summary["reason"]
    position = checkpoint.position_of(checkpoint.load(run_dir))
    assert position.step > 0
    # The two epsilons, named: the released outputs' (the last finished epoch's steps, on which every accountant
    # agrees) and the budget spent (every step taken, including those after it that only the checkpoint holds).
    assert summary["steps_spent"] == position.step >= summary["steps"]
    if summary["epochs"]:
        assert summary["epsilon_by_accountant"][summary["accountant"]] == pytest.approx(summary["epsilon"], rel=1e-9)
        assert summary["epsilon_spent"] > summary["epsilon"] if position.step > summary["steps"] else \
            summary["epsilon_spent"] == pytest.approx(summary["epsilon"], rel=1e-9)
    else:
        assert summary["epsilon"] is None and summary["epsilon_by_accountant"] is None and summary["epsilon_spent"] > 0
    # A stop on request is no error: one line says what happened and the command that continues it.
    assert "ERROR" not in stopped.stderr
    assert f"stopped on request ({name} received" in stopped.stdout
    assert f"continue with: python vision.py --resume {run_dir}" in stopped.stdout
    if str(at).startswith("eval"):  # stopped after the epoch's steps, before its evaluation and release
        assert position.partial is not None and position.partial.steps == 8 and not (run_dir / "model.pt").exists()

    resumed = run_cli("--resume", run_dir, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for file in ("model.pt", "model_ema.pt"):
        expected, got = torch.load(uninterrupted / file), torch.load(run_dir / file)
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{file}: {key} differs after the interrupted run resumed"
    final = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((uninterrupted / "summary.json").read_text())
    assert final["status"] == "finished" and final["resumed"] == 1
    for key in ("epsilon", "steps", "test_acc", "test_acc_ema"):
        assert final[key] == expected[key], key


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tiny_root, tmp_path):
    stopped, _ = _signalled(tmp_path, _flags(tiny_root, tmp_path, "hard", "--checkpoint-every", 3), 21, twice=True)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "SIGTERM again: exiting now" in stopped.stderr
    run_dir = tmp_path / "hard"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # no time to write more
    position = checkpoint.position_of(checkpoint.load(run_dir))  # the last good one loads
    assert position.step > 0
    resumed = run_cli("--resume", run_dir, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_sweep_runner_forwards_the_signal_and_resumes_on_the_next_call(tiny_root, tmp_path):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text("name: tiny\ndataset: mnist\nfixed:\n  data-root: " + str(tiny_root) + "\n  train-subset: 240\n"
                     "  batch-size: 32\n  epochs: 40\n  noise: 1.0\n  seed: 0\n  eval-robust-size: 0\n"
                     "grid:\n  lr: [0.5]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    command = [sys.executable, "-m", "experiments.run", str(sweep), "--out", str(tmp_path / "runs"), "--wandb",
               "disabled"]
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = next((tmp_path / "runs").glob("tiny/*"), None)
    deadline = time.time() + 300
    while time.time() < deadline:  # until the point has finished an epoch (a checkpoint exists)
        runs = [p for p in (tmp_path / "runs" / "tiny").glob("*") if p.name != "_logs"] \
            if (tmp_path / "runs" / "tiny").exists() else []
        if runs and (runs[0] / "metrics.jsonl").exists():
            metrics = runs[0]
            break
        time.sleep(0.2)
    assert metrics is not None
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode != 0
    assert json.loads((metrics / "summary.json").read_text())["status"] == "interrupted", err
    again = subprocess.run(command + ["--list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "interrupted" in again.stdout
