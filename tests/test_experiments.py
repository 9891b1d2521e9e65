"""Sweeps end to end on tiny data: the runner runs and resumes, collect makes the table, figures draw it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pandas as pd
import pytest
import yaml

from experiments import run as sweep_runner
from experiments.point import parse, to_argv
from experiments.sweep import load_sweep, point_flags, wandb_sweep_spec
from src.errors import UserError
from tests.cli_process import ForkedPopen
from tests.conftest import REPO

SMOKE = REPO / "experiments" / "sweeps" / "smoke.yaml"


def experiments(module: str, *args, cwd) -> subprocess.CompletedProcess:
    """``python -m experiments.MODULE ARGS``; the sweep runner in this process (``run_here``)."""
    if module == "run":
        return run_here(*args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def run_here(*args) -> subprocess.CompletedProcess:
    """``python -m experiments.run ARGS`` in this process with its vision.py runs forked (tests.cli_process),
    instead of each importing torch afresh. The runner as a process of its own, forwarding signals to its runs'
    processes, is tested in tests/test_preemption.py."""
    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    forked = SimpleNamespace(Popen=ForkedPopen, STDOUT=subprocess.STDOUT)
    with mock.patch.object(sweep_runner, "subprocess", forked), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        code = sweep_runner.main(argv)
    return subprocess.CompletedProcess(["python", "-m", "experiments.run", *argv], code, out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_smoke_sweep_runs_resumes_collects_and_draws(tiny_root, tmp_path):
    out = tmp_path / "runs"
    first = experiments("run", SMOKE, "--jobs", 2, "--out", out, "--wandb", "disabled", "--", "--data-root",
                        tiny_root, cwd=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    runs = sorted(p.name for p in (out / "smoke").iterdir() if not p.name.startswith("_"))
    assert runs == ["norm-group", "norm-none"]
    summaries = {r: json.loads((out / "smoke" / r / "summary.json").read_text()) for r in runs}
    assert all(s["status"] == "finished" for s in summaries.values())
    assert {s["norm"] for s in summaries.values()} == {"group", "none"}

    # Rerun: a finished run is skipped; a failed one with a checkpoint continues from it (--resume); a
    # killed one without a checkpoint is set aside and run again.
    stamps = {r: (out / "smoke" / r / "summary.json").stat().st_mtime_ns for r in runs}
    (out / "smoke" / "norm-none" / "summary.json").write_text(json.dumps(dict(summaries["norm-none"], status="failed")))
    second = experiments("run", SMOKE, "--out", out, "--wandb", "disabled", "--", "--data-root", tiny_root,
                         cwd=tmp_path)
    assert second.returncode == 0, second.stderr + second.stdout
    assert "1 already done, 1 finished now, 0 failed (0 restarted, 1 resumed from a checkpoint)" in second.stdout
    assert (out / "smoke" / "norm-group" / "summary.json").stat().st_mtime_ns == stamps["norm-group"]
    resumed = json.loads((out / "smoke" / "norm-none" / "summary.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed"] == 1
    assert not (out / "smoke" / "norm-none.attempt-1").exists()

    (out / "smoke" / "norm-group" / "checkpoint.pt").unlink()
    (out / "smoke" / "norm-group" / "summary.json").write_text(json.dumps(dict(summaries["norm-group"],
                                                                               status="running")))
    restarted = experiments("run", SMOKE, "--out", out, "--wandb", "disabled", "--", "--data-root", tiny_root,
                            cwd=tmp_path)
    assert "1 already done, 1 finished now, 0 failed (1 restarted, 0 resumed" in restarted.stdout
    assert (out / "smoke" / "norm-group.attempt-1").is_dir()
    assert json.loads((out / "smoke" / "norm-group" / "summary.json").read_text())["status"] == "finished"
    third = experiments("run", SMOKE, "--out", out, "--wandb", "disabled", cwd=tmp_path)
    assert "2 already done, 0 finished now" in third.stdout

    # --evaluate: every finished run again under another attack (--eval-only), beside the sweep's folder; the
    # extra flags it takes are the evaluation's (--data-root), not the training's (--lr would be refused).
    evaluated = experiments("run", SMOKE, "--out", out, "--wandb", "disabled", "--evaluate", "apgd", "--",
                            "--data-root", tiny_root, "--lr", "0.1", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr + evaluated.stdout
    assert "sweep smoke-apgd: 2 runs, 0 already done, 2 finished now" in evaluated.stdout
    for run in runs:
        attacked = json.loads((out / "smoke-apgd" / run / "summary.json").read_text())
        assert attacked["status"] == "finished" and attacked["eval_attack"]["method"] == "apgd"
        assert attacked["source_run"] == str((out / "smoke" / run).resolve()) and attacked["eval_robust_size"] == 8

    csv = tmp_path / "smoke.csv"
    collected = experiments("collect", out / "smoke", "--csv", csv, "--evaluations", out / "smoke-apgd",
                            cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    table = pd.read_csv(csv)
    assert len(table) == 4 and set(table["run_id"]) == {"norm-group", "norm-none"}  # 2 runs x 2 epochs
    assert table.groupby("run_id")["epsilon"].is_monotonic_increasing.all()
    assert table["robust_acc"].notna().sum() == 2  # measured after the last epoch of each run
    assert table["apgd_acc"].notna().sum() == 2 and table.loc[table["epoch"] == 2, "apgd_acc"].notna().all()

    images = tmp_path / "images"
    drawn = experiments("figures", csv, "--run", out / "smoke" / "norm-none", "--benchmark",
                        REPO / "benchmarks" / "results_cpu.json", "--out", images, cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    for name in ("smoke_accuracy_vs_epsilon", "smoke_robust_accuracy_vs_epsilon", "norm-none_run_curves",
                 "engine_benchmark"):
        assert (images / f"{name}.png").stat().st_size > 5000, name
        assert (images / f"{name}.pdf").stat().st_size > 1000, name


def test_an_evaluation_stage_attacks_each_finished_run_at_its_own_radius(tmp_path):
    robust = load_sweep(REPO / "experiments" / "sweeps" / "cpu_cifar10_robust.yaml")
    first, second = robust.points()
    for point, status in ((first, "finished"), (second, "running")):
        (tmp_path / robust.name / point.run_id).mkdir(parents=True)
        (tmp_path / robust.name / point.run_id / "summary.json").write_text(json.dumps({"status": status}))
    stage = sweep_runner.evaluation_stage(robust, tmp_path, "apgd")
    assert stage.name == "cpu-cifar10-robust-apgd" and stage.dataset == "cifar10"
    (point,) = stage.points()  # the run still training is left for the next call
    assert point.run_id == first.run_id
    assert point.flags == {"seed": 0, "pgd-eps": "2/255", "eval-attack": "apgd",
                           "eval-only": str((tmp_path / robust.name / first.run_id).resolve())}
    assert sweep_runner.evaluation_extra(["--data-root", "/d", "--lr", "2", "--download", "--seed=3"]) == \
        ["--data-root", "/d", "--seed=3"]


def test_sweep_files_expand_to_named_points():
    study = load_sweep(REPO / "experiments" / "sweeps" / "mnist_study.yaml")
    points = study.points()
    assert len(points) == 3 * 2 * 2 * 3 and len({p.run_id for p in points}) == len(points)
    clean = next(p for p in points if not p.values["robust"])
    robust = next(p for p in points if p.values["robust"])
    assert "--attack" not in clean.argv() and "--robust" not in clean.argv()
    assert "--robust" in robust.argv() and "--attack" in robust.argv()
    assert load_sweep(REPO / "experiments" / "sweeps" / "cifar10_study.yaml").dataset == "cifar10"


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_committed_sweep_point_is_a_valid_command(path):
    """A flag misspelt or a combination vision.py refuses fails here, not hours into a compute plan. A study
    file (``cells``) is checked through its tuning and final stages (each cell at its first tried values), whose
    points carry every cell's flags (a training whose cells borrow their tuning appears only in the final)."""
    from experiments.study import final_stage, first_choices, load_study, tune_stage
    from src.cli import parse_flags
    from src.config import build_config
    from src.datasets import get_dataset, validate_for_dataset

    if "cells" in yaml.safe_load(path.read_text()):
        study = load_study(path)
        points = tune_stage(study).points() + final_stage(study, first_choices(study)).points()
        dataset = study.dataset
    else:
        sweep = load_sweep(path)
        points, dataset = sweep.points(), sweep.dataset
    spec = get_dataset(dataset)
    for point in points:
        flags, _ = parse_flags(["--dataset", dataset, *point.argv()])
        validate_for_dataset(build_config(flags, spec.defaults), spec)


def test_wandb_spec_is_the_same_grid_and_its_entry_point_applies_the_same_rule():
    sweep = load_sweep(REPO / "experiments" / "sweeps" / "mnist_study.yaml")
    spec = yaml.safe_load(yaml.safe_dump(wandb_sweep_spec(sweep)))
    assert spec["method"] == "grid" and spec["parameters"]["noise"]["values"] == [1.0, 5.0, 10.0]
    assert spec["parameters"]["attack"]["value"] == "fgsm-rs"
    # What a wandb agent passes for a clean point: --robust is absent, --attack present; the entry point drops it,
    # and gives the point --seed 0 as the local runner does (a wandb point once ran without it: to_argv read the
    # seed 0 as a false switch).
    agent_args = ["--dataset", "mnist", "--noise=1.0", "--norm=none", "--attack=fgsm-rs", "--epochs=10"]
    assert to_argv(point_flags(parse(agent_args))) == ["--seed", "0", "--dataset", "mnist", "--norm", "none",
                                                       "--epochs", "10", "--noise", "1.0"]
    assert "--attack" in to_argv(point_flags(parse(agent_args + ["--robust"])))


def _agent_command_line(spec: dict, values: dict) -> list:
    """What ``wandb agent`` runs for one grid point: the spec's command with ${args_no_boolean_flags} filled in
    (a true switch as --name, a false one left out, every other value as --name=value)."""
    fixed = [a for a in spec["command"][4:] if a != "${args_no_boolean_flags}"]
    args = [f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if v is not False]
    return fixed + args


def test_a_wandb_agent_runs_every_point_with_the_local_runners_flags():
    sweep = load_sweep(REPO / "experiments" / "sweeps" / "mnist_study.yaml")
    spec = wandb_sweep_spec(sweep)
    for point in sweep.points():
        agent = parse(to_argv(point_flags(parse(_agent_command_line(spec, {**sweep.fixed, **point.values})))))
        local = parse(["--dataset", sweep.dataset, *point.argv()])
        runner_set = {"wandb-group", "wandb", "out"}  # where each runner puts the run, not what it trains
        assert {k: v for k, v in agent.items() if k not in runner_set} == local, point.run_id


@pytest.mark.parametrize("text,words", [("name: x\ndataset: mnist\n", "lacks grid"),
                                        ("name: x\ndataset: mnist\ngrid: {noise: []}\n", "non-empty list"),
                                        ("name: x\ndataset: mnist\ngrid: {noise: [1]}\nfixed: {out: y}\n",
                                         "sets out"),
                                        ("name: a/b\ndataset: mnist\ngrid: {noise: [1]}\n", "plain folder name"),
                                        ("[", "not valid YAML")])
def test_bad_sweep_files(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        load_sweep(path)
