"""Run directories: atomic files that survive a failed write, no overwritten runs, wandb that cannot hurt, and
wandb runs whose dashboard draws accuracy against epsilon (read back from the offline run's record log)."""
from __future__ import annotations

import json
import math

import pytest

from src.errors import UserError
from src.atomic_files import atomic_write_json, json_safe
from src.run_directory import RunDirectory
from src.tracking import EPSILON_KEY, WANDB_KEYS, WandbRun, wandb_key
from tests.wandb_records import offline_runs, offline_wandb, read_offline_run  # noqa: F401 (a fixture)


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


# The dashboard: sectioned wandb names, accuracies drawn against epsilon, metrics.jsonl keys unchanged.

ROW = {"epoch": 1, "step": 3, "test_loss": 2.3, "test_acc": 28.0, "robust_acc": None, "val_loss": 2.2, "val_acc": 25.0,
       "test_acc_ema": 27.0, "robust_acc_ema": None, "epsilon": 5.2, "seconds": 0.9, "train_seconds": 0.8}


class _Summary:
    def to_dict(self):
        return {"status": "finished", "test_acc": 30.0, "epsilon": 6.8}


def test_every_row_key_has_a_section_and_averaged_weights_follow_their_base_key():
    assert wandb_key("test_acc") == "test/acc" and wandb_key("val_loss") == "val/loss"
    assert wandb_key("robust_acc_ema") == "robust/acc_ema" and wandb_key("epsilon") == EPSILON_KEY == "privacy/epsilon"
    assert wandb_key("train_acc_unprotected") == "unprotected/train_acc"  # never in the epsilon-covered sections
    assert wandb_key("something_new") == "something_new"
    sections = {key.split("/")[0] for key in WANDB_KEYS.values()}
    assert sections == {"progress", "privacy", "test", "val", "robust", "time", "unprotected"}
    assert len(set(WANDB_KEYS.values())) == len(WANDB_KEYS), "two row keys would share one wandb key"


@pytest.mark.parametrize("epsilon, axis", [(5.2, "privacy/epsilon"), (math.inf, "progress/epoch")])
def test_an_offline_run_draws_the_accuracies_against_epsilon(offline_wandb, epsilon, axis):
    run_dir = offline_wandb / "run"
    run = WandbRun.start(mode="offline", project="p", group="g", run_dir=run_dir, run_id="r", config={"a": 1},
                         tags=[])
    assert run.error is None and run.directory
    rows = [{**ROW, "epsilon": epsilon}, {**ROW, "epoch": 2, "step": 6, "robust_acc": 25.0,
                                          "epsilon": epsilon * 1.3}]
    for row in rows:
        run.log(row, step=row["step"])
    run.finish(_Summary(), exit_code=0)
    assert rows[0]["test_acc"] == 28.0 and "test/acc" not in rows[0], "the caller's row is left as it was"

    (directory,) = offline_runs(run_dir)
    recorded = read_offline_run(directory)
    assert recorded.group == "g" and recorded.name == "r"
    assert {m.name for m in recorded.metrics if m.name} == {axis}  # declared, as wandb wants, before its use
    for key in ("test/acc", "test/loss", "test/acc_ema", "val/acc", "robust/acc", "robust/acc_ema"):
        assert recorded.step_metric(key) == axis, key
    assert recorded.step_metric("time/epoch_seconds") == "" and recorded.step_metric("progress/step") == ""
    assert recorded.history_keys() == {wandb_key(k) for k in ROW}, "every key of the row, only those, renamed"
    assert [h["test/acc"] for h in recorded.history] == [28.0, 28.0]
    assert [h["_step"] for h in recorded.history] == [3, 6] and recorded.history[1]["robust/acc"] == 25.0
    assert [h["privacy/epsilon"] for h in recorded.history] == ([5.2, pytest.approx(5.2 * 1.3)]
                                                                if math.isfinite(epsilon) else [None, None])
    assert recorded.summary["status"] == "finished" and recorded.summary["epsilon"] == 6.8  # flat, as summary.json


class _BrokenRun:
    """A wandb run whose service died mid-training."""

    dir = "/nonexistent/files"

    def __init__(self):
        self.calls = 0

    def define_metric(self, *args, **kwargs):
        self.calls += 1

    def log(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionResetError("wandb service went away")

    def finish(self, **kwargs):
        raise AssertionError("a failed run is not finished again")


def test_a_wandb_failure_mid_run_is_a_warning_and_ends_the_tracking(caplog):
    broken = _BrokenRun()
    run = WandbRun(broken)
    with caplog.at_level("WARNING", logger="src.tracking"):
        run.log(ROW, step=3)
    assert run.error == "log: wandb service went away" and "tracking stops" in caplog.text
    calls = broken.calls
    run.log(ROW, step=6)
    run.log_media({"figures/x": object()})
    run.finish(_Summary(), exit_code=0)
    assert broken.calls == calls and run.directory is None
