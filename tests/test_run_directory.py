"""The run directory reads what it writes: every reader (resume, eval-only, the sweep runner, collect, figures)
goes through ``RunDirectory``, so its files are named and parsed in one place."""
from __future__ import annotations

import math
import subprocess
import sys

import torch

from src.run_directory import CHECKPOINT_FILE, RunDirectory
from src.summary import TrainingSummary
from tests.conftest import REPO


def test_written_files_read_back(tmp_path):
    run = RunDirectory.create(str(tmp_path), "r")
    assert run.status() == "unreadable" and not run.is_run() and run.read_metrics() == []
    run.write_config({"data": {"dataset": "mnist"}})
    run.write_summary(TrainingSummary(run_id="run", epsilon=math.inf))
    run.append_metrics({"epoch": 1, "test_acc": 50.0})
    run.save_model({"w": torch.arange(3.0)})
    assert run.is_run() and run.status() == "running"
    assert run.read_config() == {"data": {"dataset": "mnist"}}
    assert run.read_summary() == TrainingSummary(run_id="run", epsilon=None)  # inf is written as null
    assert run.read_metrics() == [{"epoch": 1, "test_acc": 50.0}]
    assert torch.equal(run.load_model_state()["w"], torch.arange(3.0))
    assert not run.has_checkpoint() and run.checkpoint_path == tmp_path / "r" / CHECKPOINT_FILE
    assert RunDirectory(tmp_path / "absent").status() == "missing"


def test_the_sweep_runner_reads_run_directories_without_importing_torch():
    code = "import sys; import experiments.run, experiments.collect; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
