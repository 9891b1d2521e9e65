"""experiments.study: per-cell tuning on the validation split, then the seeds at the chosen value, then
AutoAttack on every final model; resumable like any sweep, and refusing a study without a validation split."""
from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pandas as pd
import pytest

import experiments.run
from experiments.study import compute_hours, load_study, main
from src.errors import UserError
from tests.cli_process import ForkedPopen

STUDY = """name: tiny-study
dataset: mnist
cells:
  norm: [none]
  training: [clean, fgsm-rs, pgd]
training:
  clean: {{robust: false}}
  fgsm-rs: {{robust: true, attack: fgsm-rs}}
  pgd: {{robust: true, attack: pgd, pgd-steps: 2}}
borrow_tuning:
  pgd: fgsm-rs
tune:
  lr: [0.001, 0.5]
  seed: 0
seeds: [1]
fixed:
  data-root: {root}
  val-size: 60
  epochs: 1
  batch-size: 32
  noise: 0.5
  pgd-eps: 0.1
  eval-robust-size: 12
"""


@pytest.mark.slow
def test_study_tunes_on_validation_then_runs_seeds_then_autoattack(tiny_root, tmp_path, capsys, monkeypatch):
    # The study's ten vision.py runs fork from preloaded interpreters (tests.cli_process) instead of each importing
    # torch afresh; the runner's real processes and their signals are tested in tests/test_preemption.py.
    monkeypatch.setattr(experiments.run, "subprocess", SimpleNamespace(Popen=ForkedPopen, STDOUT=subprocess.STDOUT))
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(root=tiny_root))
    out = tmp_path / "runs"
    assert main([str(path), "--out", str(out), "--wandb", "disabled"]) == 0
    selection = json.loads((out / "tiny-study-selection.json").read_text())
    assert len(selection) == 3
    tuned = [p for p in (out / "tiny-study-tune").iterdir() if p.name != "_logs"]
    assert len(tuned) == 4, "the pgd cell borrows the fgsm-rs cell's choice instead of being tuned"
    borrowed = next(c for c in selection.values() if c["cell"]["training"] == "pgd")
    lender = next(c for c in selection.values() if c["cell"]["training"] == "fgsm-rs")
    assert borrowed["borrowed_from"] == "fgsm-rs" and borrowed["lr"] == lender["lr"]
    for choice in (c for c in selection.values() if "tried" in c):
        tried = {t["lr"]: t["val_acc"] for t in choice["tried"]}
        assert choice["val_acc"] == max(tried.values()) and tried[choice["lr"]] == choice["val_acc"]
    for run in (out / "tiny-study-tune").iterdir():
        if run.name != "_logs":
            config = json.loads((run / "config.json").read_text())
            assert config["robust"]["eval_robust_size"] == 0 and config["data"]["val_size"] == 60
    finals = sorted(p for p in (out / "tiny-study-final").iterdir() if p.name != "_logs")
    assert len(finals) == 3
    for run in finals:
        config = json.loads((run / "config.json").read_text())
        cell = next(c for c in selection.values() if f"training-{c['cell']['training']}_" in run.name)
        assert config["train"]["lr"] == cell["lr"] and config["train"]["seed"] == 1
        attacked = json.loads((out / "tiny-study-autoattack" / run.name / "summary.json").read_text())
        assert attacked["eval_attack"]["method"] == "autoattack" and attacked["status"] == "finished"
        assert attacked["eval_robust_size"] == 12
    # A second call does nothing new: every stage is done; the compute spent is reported per stage.
    capsys.readouterr()
    assert main([str(path), "--out", str(out), "--wandb", "disabled"]) == 0
    hours = {s: compute_hours(out / f"tiny-study-{s}") for s in ("tune", "final", "autoattack")}
    assert all(h > 0 for h in hours.values())
    printed = capsys.readouterr().out
    assert "final: 3 runs, 3 already done, 0 finished now" in printed and "run-hours so far" in printed

    # The report: one CSV with AutoAttack on each run's last row, then the per-cell table.
    from experiments import collect, table
    csv = tmp_path / "final.csv"
    assert collect.main([str(out / "tiny-study-final"), "--csv", str(csv), "--evaluations",
                         str(out / "tiny-study-autoattack")]) == 0
    rows = pd.read_csv(csv)
    assert set(rows["training"]) == {"clean", "fgsm-rs", "pgd-2"}
    last = rows.loc[rows.groupby("run_id")["epoch"].idxmax()]
    assert last["autoattack_acc"].notna().all() and rows["autoattack_acc"].notna().sum() == 3
    for run_id, measured in zip(last["run_id"], last["autoattack_acc"]):
        attacked = json.loads((out / "tiny-study-autoattack" / run_id / "summary.json").read_text())
        assert measured == pytest.approx(attacked["robust_acc"])
    assert table.main([str(csv), "--out", str(tmp_path / "cells")]) == 0
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert len(cells) == 3 and "robust acc (AutoAttack), final mean" in cells


def test_a_study_without_validation_split_is_refused(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(root=tmp_path).replace("  val-size: 60\n", ""))
    with pytest.raises(UserError, match="validation split"):
        load_study(path)


@pytest.mark.parametrize("runner", ["study", "run"])
def test_both_runners_refuse_zero_jobs_before_listing(runner, capsys):
    from experiments import run, study
    from tests.conftest import REPO

    shipped = REPO / "experiments" / "sweeps" / ("mnist_study_v2.yaml" if runner == "study" else "smoke.yaml")
    main_of = study.main if runner == "study" else run.main
    assert main_of([str(shipped), "--list", "--out", "no-such-folder"]) == 0
    with pytest.raises(SystemExit) as refused:
        main_of([str(shipped), "--jobs", "0", "--list"])
    assert refused.value.code == 2 and "--jobs: must be at least 1" in capsys.readouterr().err


def choices_for(study):
    from experiments.sweep import _run_id
    return {_run_id(cell): {"lr": 0.5} for cell in study.cell_values()}


def test_the_shipped_study_files_load():
    """The normalization study v2 and its public-set-size companion parse, with the cells the issue asks for."""
    from experiments.study import final_stage, tune_stage
    from experiments.sweep import load_sweep
    from tests.conftest import REPO

    study = load_study(REPO / "experiments" / "sweeps" / "mnist_study_v2.yaml")
    assert set(study.cells["norm"]) == {"none", "group", "layer", "bn-public"} and study.cells["noise"] == [1, 5, 10]
    assert study.fixed["val-size"] > 0 and study.seeds == [0, 1, 2]
    tuned_cells = 4 * 3 * 2  # the pgd-3 cells borrow the fgsm-rs choice
    assert len(tune_stage(study).points()) == tuned_cells * len(study.tune[0].values)
    assert len(final_stage(study, choices_for(study)).points()) == 4 * 3 * 3 * 3
    sizes = load_sweep(REPO / "experiments" / "sweeps" / "mnist_public_size.yaml")
    assert sorted({p.values["public-size"] for p in sizes.points()}) == [16, 32, 64, 105]
    # MNIST's public set is the KMNIST file the data installer lays out (no download here): both files name it.
    assert study.fixed["public-data"] == sizes.fixed["public-data"] == "data/KMNIST/kmnist_partial.npz"
    cifar = load_study(REPO / "experiments" / "sweeps" / "cifar10_study_v2.yaml")
    assert cifar.dataset == "cifar10" and set(cifar.cells["norm"]) == {"none", "group", "bn-public"}
    assert len(tune_stage(cifar).points()) + len(final_stage(cifar, choices_for(cifar)).points()) == 135


NARROWED = """name: narrow-study
dataset: cifar10
cells:
  norm: [group, bn-dp]
  target-epsilon: [1, 8]
  training: [clean, fgsm-rs]
training:
  clean: {robust: false, eval-robust-size: 0}
  fgsm-rs: {robust: true, attack: fgsm-rs}
borrow_tuning:
  fgsm-rs: clean
autoattack: apgd
narrow:
  fgsm-rs: {target-epsilon: [8], seeds: [0, 1]}
tune:
  lr: [2, 4]
  norm-noise: {values: [8, 16], when: {norm: [bn-dp]}}
  seed: 0
seeds: [0, 1, 2]
fixed:
  val-size: 5000
"""


def test_a_flag_tuned_in_some_cells_and_a_training_narrowed_to_fit(tmp_path):
    """The CIFAR-10 study's shape: bn-dp's noise is tried only in bn-dp cells (other norms refuse the flag), the
    robust arm runs at epsilon 8 on two seeds with the clean cell's choice, and the choice of the best pair is
    read from validation accuracy alone."""
    from experiments.study import final_stage, select, tune_stage
    from experiments.sweep import _run_id

    path = tmp_path / "study.yaml"
    path.write_text(NARROWED)
    study = load_study(path)
    assert [c for c in study.cell_values() if c["training"] == "fgsm-rs"] == [
        {"norm": "group", "target-epsilon": 8, "training": "fgsm-rs"},
        {"norm": "bn-dp", "target-epsilon": 8, "training": "fgsm-rs"}]
    tune = tune_stage(study).points()
    assert len(tune) == 2 * 2 + 2 * 4  # group: 2 lr; bn-dp: 2 lr x 2 noise; clean cells only (fgsm-rs borrows)
    assert all(("norm-noise" in p.flags) == (p.values["norm"] == "bn-dp") for p in tune)
    assert {p.flags["seed"] for p in tune} == {0} and all(p.flags["eval-robust-size"] == 0 for p in tune)

    # Validation accuracies the runs "wrote": best is bn-dp at lr 4, noise 16 (eps 1); ties go to the first listed.
    for point in tune:
        noisier_wins = point.flags.get("norm-noise") == 16 and point.values["target-epsilon"] == 1
        val = 60.0 + (point.flags["lr"] == 4) + 2 * noisier_wins
        run = tmp_path / "narrow-study-tune" / point.run_id
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"status": "finished", "val_acc": val, "test_acc": 100 - val}))
    choices = select(study, tmp_path)
    eps1 = choices[_run_id({"norm": "bn-dp", "target-epsilon": 1, "training": "clean"})]
    assert (eps1["lr"], eps1["norm-noise"], eps1["val_acc"]) == (4, 16, 63.0) and len(eps1["tried"]) == 4
    eps8 = choices[_run_id({"norm": "bn-dp", "target-epsilon": 8, "training": "clean"})]
    assert (eps8["lr"], eps8["norm-noise"]) == (4, 8)  # 16 ties with 8 at epsilon 8: the first listed
    robust = choices[_run_id({"norm": "bn-dp", "target-epsilon": 8, "training": "fgsm-rs"})]
    assert robust["borrowed_from"] == "clean" and (robust["lr"], robust["norm-noise"]) == (4, 8)
    assert "norm-noise" not in choices[_run_id({"norm": "group", "target-epsilon": 1, "training": "clean"})]

    final = final_stage(study, choices).points()
    assert len(final) == 4 * 3 + 2 * 2  # clean: 4 cells x 3 seeds; fgsm-rs: 2 cells x 2 seeds
    robust_runs = [p for p in final if p.values["training"] == "fgsm-rs"]
    assert {p.flags["seed"] for p in robust_runs} == {0, 1}
    assert all(p.flags["robust"] and p.flags["target-epsilon"] == 8 for p in robust_runs)
    assert all(p.flags.get("norm-noise") == (8 if p.values["norm"] == "bn-dp" else None) for p in robust_runs)

    # The last evaluation: APGD (the study's setting) of the finished robust models only; clean ones have none.
    from experiments.study import autoattack_stage
    from experiments.sweep import Stage
    for point in final:
        run = tmp_path / "narrow-study-final" / point.run_id
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"status": "finished", "test_acc": 50.0}))
    attacked = autoattack_stage(study, Stage("narrow-study-final", "cifar10", final), tmp_path)
    assert sorted(p.run_id for p in attacked.points()) == sorted(p.run_id for p in robust_runs)
    assert {p.flags["eval-attack"] for p in attacked.points()} == {"apgd"}


@pytest.mark.parametrize("change, message", [
    (("  norm-noise: {values: [8, 16], when: {norm: [bn-dp]}}", "  norm-noise: {values: [8], when: {nrm: [x]}}"),
     "tune.norm-noise"),
    (("  fgsm-rs: {target-epsilon: [8], seeds: [0, 1]}", "  fgsm-rs: {noise: [8]}"), "narrow"),
    (("  fgsm-rs: {target-epsilon: [8], seeds: [0, 1]}", "  clean: {target-epsilon: [8]}"), "borrows from a cell"),
    (("autoattack: apgd", "autoattack: square"), "autoattack is true, false or one of"),
])
def test_a_malformed_tune_or_narrow_is_refused(tmp_path, change, message):
    path = tmp_path / "study.yaml"
    path.write_text(NARROWED.replace(*change))
    with pytest.raises(UserError, match=message):
        load_study(path)
