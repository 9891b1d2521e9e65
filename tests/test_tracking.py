"""Run directories: atomic files that survive a failed write, no overwritten runs, wandb that cannot hurt."""
from __future__ import annotations

import json
import math

import pytest

from src.errors import UserError
from src.atomic_files import atomic_write_json, json_safe
from src.run_directory import RunDirectory
from src.tracking import WandbRun


def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"status": "running"})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"status": object()})  # not serialisable: fails mid-write
    assert json.loads(target.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_non_finite_numbers_become_null():
    assert json_safe({"a": math.inf, "b": [math.nan, 1.5], "c": "x"}) == {"a": None, "b": [None, 1.5], "c": "x"}


def test_metrics_are_appended_as_whole_lines(tmp_path):
    run = RunDirectory.create(str(tmp_path), "r1")
    run.append_metrics({"epoch": 1, "epsilon": math.inf})
    run.append_metrics({"epoch": 2, "epsilon": 1.0})
    lines = (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 1, "epsilon": None}, {"epoch": 2, "epsilon": 1.0}]
    with pytest.raises(UserError, match="already exists"):
        RunDirectory.create(str(tmp_path), "r1")


def test_wandb_failure_is_recorded_not_raised(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("wandb service could not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = WandbRun.start(mode="offline", project="p", group=None, run_dir=tmp_path, run_id="r", config={}, tags=[])
    assert run.error == "wandb service could not start" and run.directory is None
    run.log({"x": 1}, step=1)
    run.finish({"status": "finished"}, exit_code=0)
