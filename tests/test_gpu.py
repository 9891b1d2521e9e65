"""On a CUDA device (skipped without one): every engine trains with --device cuda, in fp32 and (bk) bf16, and
its model.pt loads on the CPU; a checkpoint written there is refused on the CPU in one line."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _flags(root, out, run_id, *extra):
    return ["--dataset", "mnist", "--data-root", root, "--train-subset", 240, "--batch-size", 32,
            "--physical-batch-size", 16, "--epochs", 2, "--wandb", "disabled", "--out", out, "--run-id", run_id,
            "--eval-robust-size", 20, "--seed", 0, "--device", "cuda", *extra]


@pytest.mark.parametrize("extra", [["--engine", "bk", "--noise", 1.0], ["--engine", "bk", "--noise", 1.0,
                                                                         "--precision", "bf16"],
                                   ["--engine", "hooks", "--noise", 1.0], ["--engine", "functorch", "--noise", 1.0],
                                   ["--engine", "ghost", "--noise", 1.0], ["--engine", "mixed-ghost", "--noise", 1.0],
                                   ["--engine", "non-private"],
                                   ["--engine", "bk", "--noise", 1.0, "--robust", "--augment", "--augmult", 2,
                                    "--norm", "bn-public"]])
def test_every_engine_trains_on_cuda(extra, tiny_root, tmp_path):
    done = run_cli(*_flags(tiny_root, tmp_path, "run", *extra), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test_acc"] > 10
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"].startswith("cuda")
    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu")  # loads on the CPU
    assert all(t.device.type == "cpu" for t in state.values())


def test_a_cuda_checkpoint_is_refused_on_the_cpu(tiny_root, tmp_path):
    """The noise generator's CUDA state cannot continue on the CPU: one line, exit 2."""
    done = run_cli(*_flags(tiny_root, tmp_path, "cut", "--noise", 1.0), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = tmp_path / "cut" / "summary.json"
    summary.write_text(summary.read_text().replace('"finished"', '"failed"'))  # resumable again
    refused = run_cli("--resume", tmp_path / "cut", "--device", "cpu", cwd=tmp_path)
    assert refused.returncode == 2 and "resume with --device cuda" in refused.stderr
