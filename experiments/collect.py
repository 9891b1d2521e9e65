"""Collect a sweep's run directories into one tidy CSV: a row per run per epoch.

    python -m experiments.collect runs/mnist-study --csv experiments/results/mnist-study.csv
    python -m experiments.collect runs/mnist-study-v2-final --evaluations runs/mnist-study-v2-autoattack

``--evaluations`` names a folder of ``vision.py --eval-only`` runs of the sweep's models (a study's AutoAttack
stage): each one's robust accuracy lands, as ``autoattack_acc`` (or ``<method>_acc``), on the last epoch's row
of the run it evaluated.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from src.errors import UserError
from src.atomic_files import atomic_write_text
from src.run_directory import RunDirectory, runs_in

COLUMNS = ["sweep", "run_id", "status", "dataset", "model", "norm", "norm_clip", "norm_noise", "act", "engine", "robust", "attack", "training",
           "pgd_eps", "target_epsilon", "noise_multiplier", "clip", "batch_size", "lr", "seed", "accountant", "delta",
           "n_train", "wall_seconds",
           "public_size", "epoch", "step", "epsilon", "val_loss", "val_acc", "test_loss", "test_acc", "robust_acc",
           "val_acc_ema", "test_acc_ema", "robust_acc_ema", "seconds",
           "autoattack_acc"]  # *_ema: the averaged weights of --ema runs
# autoattack_acc: from --evaluations, on the last epoch's row only; wall_seconds: the whole run's, on every row
# Loss and accuracy on the private training batches are never collected: epsilon does not cover them
# (runs with --unprotected-train-stats keep them, labelled, in their own metrics.jsonl only).


def training_name(robust: dict) -> str:
    """How a run trained, as the study names it: clean, fgsm-rs, pgd-<steps>, ..."""
    if not robust.get("robust"):
        return "clean"
    attack = robust.get("attack") or "pgd"
    return f"pgd-{robust['pgd_steps']}" if attack == "pgd" and robust.get("pgd_steps") else attack


def public_size(config: dict):
    """How many public images set the BatchNorm statistics: the run's ``public_images_used`` (the data may hold
    fewer than ``data.public_size`` asked for). Runs recorded before that key name it only in the source's text
    ("first N of M")."""
    if config.get("public_images_used") is not None:
        return int(config["public_images_used"])
    found = re.search(r"first (\d+)", config.get("public_data") or "")
    return int(found.group(1)) if found else None


def bn_dp_settings(model: dict) -> dict:
    """--norm bn-dp's clipping bound and noise (empty for other norms, whose runs hold the unused defaults)."""
    if model.get("norm") != "bn-dp":
        return {"norm_clip": None, "norm_noise": None}
    return {"norm_clip": model.get("norm_clip"), "norm_noise": model.get("norm_noise")}


def run_rows(run_dir: Path, sweep: str) -> list:
    """One row per epoch of one run directory ([] for a run with no finished epoch)."""
    run = RunDirectory(run_dir)
    config, summary = run.read_config(), run.read_summary()
    robust = config.get("robust", {})
    fixed = {"sweep": sweep, "run_id": run_dir.name, "status": summary.status,
             "dataset": config["data"]["dataset"], "model": config["model"].get("model"),
             "norm": config["model"]["norm"], **bn_dp_settings(config["model"]), "act": config["model"]["act"],
             "engine": config["privacy"]["engine"], "robust": bool(robust.get("robust", False)),
             "attack": robust.get("attack") if robust.get("robust") else None, "training": training_name(robust),
             "pgd_eps": robust.get("pgd_eps"), "target_epsilon": config["privacy"].get("target_epsilon"),
             "noise_multiplier": summary.noise_multiplier, "clip": config["privacy"]["clip"],
             "batch_size": config["train"]["batch_size"], "lr": config["train"]["lr"], "seed": config["train"]["seed"],
             "accountant": config["privacy"]["accountant"], "delta": summary.delta,
             "n_train": summary.n_train, "wall_seconds": getattr(summary, "wall_seconds", None),
             "public_size": public_size(config)}
    rows = []
    for metrics in run.read_metrics():
        rows.append({**fixed, **{k: metrics.get(k) for k in COLUMNS if k not in fixed}})
    return rows


def collect(sweep_dir: Path) -> pd.DataFrame:
    """Every run directory of the sweep (attempts set aside and the log folder are not runs)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a sweep folder")
    rows = []
    for run in runs_in(sweep_dir):
        rows.extend(run_rows(run.path, sweep_dir.name))
    if not rows:
        raise UserError(f"no run with a finished epoch in {sweep_dir}")
    return pd.DataFrame(rows, columns=COLUMNS)


def add_evaluations(table: pd.DataFrame, evaluations_dir: Path) -> pd.DataFrame:
    """Each finished ``--eval-only`` run's robust accuracy on the last epoch's row of the run it evaluated, as
    ``<method>_acc`` (autoattack_acc). A model evaluated twice, or an evaluation of no run here, is refused."""
    evaluations_dir = Path(evaluations_dir)
    if not evaluations_dir.is_dir():
        raise UserError(f"{evaluations_dir} is not a folder of --eval-only runs")
    table = table.copy()
    seen = set()
    for run in runs_in(evaluations_dir):
        run_dir, summary = run.path, run.read_summary()
        if not getattr(summary, "source_run", "") or summary.status != "finished":
            continue
        source = Path(summary.source_run).name
        column = f"{summary.eval_attack['method']}_acc"
        if (source, column) in seen:
            raise UserError(f"{source} is evaluated twice by {column.split('_')[0]} in {evaluations_dir}")
        seen.add((source, column))
        rows = table.index[table["run_id"] == source]
        if len(rows) == 0:
            raise UserError(f"{run_dir} evaluates {source}, which is not a run of this sweep")
        last = table.loc[rows, "epoch"].idxmax()
        if column not in table:
            table[column] = None
        table.loc[last, column] = summary.robust_acc
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, help="where to write (default experiments/results/<sweep>.csv)")
    parser.add_argument("--evaluations", type=Path, help="a folder of --eval-only runs of these models "
                        "(a study's AutoAttack stage)")
    args = parser.parse_args(argv)
    try:
        table = collect(args.sweep_dir)
        if args.evaluations:
            table = add_evaluations(table, args.evaluations)
    except UserError as error:
        print(f"experiments.collect: error: {error}", file=sys.stderr)
        return 2
    path = args.csv or Path("experiments/results") / f"{args.sweep_dir.name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, table.to_csv(index=False))
    print(f"{len(table)} rows from {table['run_id'].nunique()} runs -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
