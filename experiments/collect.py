"""Collect a sweep's run directories into one tidy CSV: a row per run per epoch.

    python -m experiments.collect runs/mnist-study --csv experiments/results/mnist-study.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from src.errors import UserError
from src.atomic_files import atomic_write_text
from src.run_directory import RunDirectory

COLUMNS = ["sweep", "run_id", "status", "dataset", "norm", "act", "engine", "robust", "attack", "pgd_eps",
           "noise_multiplier", "clip", "batch_size", "lr", "seed", "accountant", "delta", "n_train", "epoch",
           "step", "epsilon", "val_loss", "val_acc", "test_loss", "test_acc", "robust_acc", "val_acc_ema",
           "test_acc_ema", "robust_acc_ema", "seconds"]  # *_ema: the averaged weights of --ema runs
# Loss and accuracy on the private training batches are never collected: epsilon does not cover them
# (runs with --unprotected-train-stats keep them, labelled, in their own metrics.jsonl only).


def run_rows(run_dir: Path, sweep: str) -> list:
    """One row per epoch of one run directory ([] for a run with no finished epoch)."""
    run = RunDirectory(run_dir)
    config, summary = run.read_config(), run.read_summary()
    robust = config.get("robust", {})
    fixed = {"sweep": sweep, "run_id": run_dir.name, "status": summary.status,
             "dataset": config["data"]["dataset"], "norm": config["model"]["norm"], "act": config["model"]["act"],
             "engine": config["privacy"]["engine"], "robust": bool(robust.get("robust", False)),
             "attack": robust.get("attack") if robust.get("robust") else None, "pgd_eps": robust.get("pgd_eps"),
             "noise_multiplier": summary.noise_multiplier, "clip": config["privacy"]["clip"],
             "batch_size": config["train"]["batch_size"], "lr": config["train"]["lr"], "seed": config["train"]["seed"],
             "accountant": config["privacy"]["accountant"], "delta": summary.delta,
             "n_train": summary.n_train}
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
    for run_dir in sorted(sweep_dir.iterdir()):
        if not run_dir.is_dir() or run_dir.name.startswith("_") or ".attempt-" in run_dir.name:
            continue
        if not RunDirectory(run_dir).is_run():
            continue
        rows.extend(run_rows(run_dir, sweep_dir.name))
    if not rows:
        raise UserError(f"no run with a finished epoch in {sweep_dir}")
    return pd.DataFrame(rows, columns=COLUMNS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, help="where to write (default experiments/results/<sweep>.csv)")
    args = parser.parse_args(argv)
    try:
        table = collect(args.sweep_dir)
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
