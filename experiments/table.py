"""The study's table: per cell, final and best-epoch accuracy over seeds with 95% intervals, and robust accuracy
under PGD and AutoAttack.

    python -m experiments.table experiments/results/mnist-study-v2-final.csv [MORE.csv ...]
        [--by norm noise_multiplier training] [--out experiments/results/mnist-study-v2-table]
        [--published experiments/results/published-cpu.csv]

Writes ``<out>.md`` (a Markdown table for the docs) and ``<out>.csv``; several CSVs make one table (e.g. the
MNIST and CIFAR-10 sweeps of one README table). "Best epoch" is the epoch with the
best *validation* accuracy of each run (the test set never picks it); runs without a validation split have no
best-epoch column. ``--published FILE`` puts the published numbers beside each cell: a CSV with some of the
``--by`` columns and a ``published`` column (the number and who reported it). "Minutes per run" is the mean of
the runs' own wall time (a resumed run's parts summed).
Intervals are Student-t 95% intervals of the mean over seeds (mean +- t * sd / sqrt(n)), the honest choice for
three seeds: a bootstrap over three values understates the spread.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd
from scipy import stats

from src.atomic_files import atomic_write_text
from src.errors import UserError

CELL = ["norm", "noise_multiplier", "training"]


def budget_column(table: pd.DataFrame) -> str:
    """What a study holds equal across normalizations: the noise multiplier, or the total epsilon when every run
    was calibrated to one (``--target-epsilon``; the noise then differs per cell, e.g. bn-dp's is larger because
    its statistics are paid for inside the same epsilon)."""
    calibrated = "target_epsilon" in table and not table.empty and table["target_epsilon"].notna().all()
    return "target_epsilon" if calibrated else "noise_multiplier"


def default_cell(table: pd.DataFrame) -> List[str]:
    """The study's cell: normalization x privacy budget (``budget_column``) x training."""
    return [budget_column(table) if c == "noise_multiplier" else c for c in CELL]


@dataclass(frozen=True)
class Interval:
    """Mean over seeds and the half-width of its Student-t 95% interval (nan with one seed)."""

    mean: float
    half_width: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> "Interval":
        values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not values:
            return Interval(math.nan, math.nan, 0)
        n, mean = len(values), sum(values) / len(values)
        if n == 1:
            return Interval(mean, math.nan, 1)
        return Interval(mean, stats.t.ppf(0.975, n - 1) * stats.sem(values), n)

    def bounds(self) -> tuple:
        return self.mean - self.half_width, self.mean + self.half_width

    def text(self) -> str:
        if math.isnan(self.mean):
            return "-"
        return f"{self.mean:.2f}" if math.isnan(self.half_width) else f"{self.mean:.2f} ± {self.half_width:.2f}"


def t_interval(values) -> tuple:
    """The 95% interval as seaborn's ``errorbar`` callable wants it: (low, high)."""
    return Interval.of(list(values)).bounds()


def accuracy_band(values) -> tuple:
    """``t_interval`` of accuracies (%), cut to 0-100: with three seeds far apart (a clean model's robust accuracy
    of 0, 5 and 30) the t-interval reaches below 0, where no mean accuracy can lie. Tables keep the full
    half-width."""
    low, high = t_interval(values)
    return max(low, 0.0), min(high, 100.0)


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's last epoch."""
    return table.loc[table.groupby("run_id")["epoch"].idxmax()]


def best_epoch_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's epoch of best validation accuracy (first among ties); empty without validation numbers."""
    validated = table[table["val_acc"].notna()]
    if validated.empty:
        return validated
    return validated.loc[validated.groupby("run_id")["val_acc"].idxmax()]


MEASURES = [  # (column title, rows, column)
    ("test acc, final", final_rows, "test_acc"),
    ("test acc, best epoch", best_epoch_rows, "test_acc"),
    ("robust acc (PGD), final", final_rows, "robust_acc"),
    ("robust acc (PGD), best epoch", best_epoch_rows, "robust_acc"),
    ("robust acc (AutoAttack), final", final_rows, "autoattack_acc"),
    ("robust acc (APGD-CE + APGD-T), final", final_rows, "apgd_acc"),
]


def finished_only(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of finished runs: a run still going (or stopped) would enter with a last epoch that is not the
    plan's last, and a cell would mix accuracies after different amounts of training."""
    return table[table["status"] == "finished"] if "status" in table else table


def cell_table(table: pd.DataFrame, by: List[str]) -> pd.DataFrame:
    """One row per cell: seeds, epsilon at the end, and every measure as an Interval over the cell's runs. A measure
    some run of the cell lacks is left empty ("-"): a mean over the runs that have it would be a different
    sample (e.g. robust accuracy at the best epoch of clean runs, measured only after the last epoch)."""
    missing = [c for c in by if c not in table]
    if missing:
        raise UserError(f"the table has no column {', '.join(missing)}")
    table = finished_only(table)
    if table.empty:
        raise UserError("no finished run in the table")
    finals = final_rows(table)
    rows = []
    for key, cell in finals.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["seeds"] = cell["seed"].nunique()
        row["epsilon"] = cell["epsilon"].max()
        row["lr"] = ", ".join(f"{v:g}" for v in sorted(set(cell["lr"])))
        if "wall_seconds" in cell and cell["wall_seconds"].notna().all():
            row["minutes per run"] = cell["wall_seconds"].mean() / 60
        runs = set(cell["run_id"])
        for title, pick, column in MEASURES:
            if column not in table or table[column].isna().all():
                continue
            picked = pick(table[table["run_id"].isin(runs)])
            complete = len(picked) == len(runs) and picked[column].notna().all()
            row[title] = Interval.of(picked[column].tolist() if complete else [])
        rows.append(row)
    cells = pd.DataFrame(rows)
    empty = [c for c in cells.columns if all(isinstance(v, Interval) and v.n == 0 for v in cells[c])]
    return cells.drop(columns=empty)  # e.g. best epoch for runs without a validation split


def with_published(cells: pd.DataFrame, published: pd.DataFrame, by: List[str]) -> pd.DataFrame:
    """``cells`` with a ``published`` column after its key columns, matched on the ``by`` columns that
    ``published`` has (numbers compared as numbers: a target epsilon of 3 matches 3.0); "-" where none was
    published."""
    keys = [c for c in by if c in published]
    if "published" not in published or not keys:
        raise UserError(f"a published-numbers file needs a 'published' column and at least one of {', '.join(by)}")

    def key(frame: pd.DataFrame) -> pd.Series:
        def cell(value):
            number = pd.to_numeric(value, errors="coerce")
            return f"{number:g}" if not pd.isna(number) else str(value)
        return frame[keys].apply(lambda row: tuple(cell(v) for v in row), axis=1)

    numbers = dict(zip(key(published), published["published"].fillna("-").astype(str)))
    cells = cells.copy()
    cells.insert(len(by), "published", [numbers.get(k, "-") for k in key(cells)])  # cell_table: never empty
    return cells


def to_markdown(cells: pd.DataFrame) -> str:
    def text(column, value):
        if isinstance(value, Interval):
            return value.text()
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.2f}" if column == "epsilon" else f"{value:.1f}" if column.startswith("minutes") \
                else f"{value:g}"
        return str(value)

    columns = list(cells.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(text(c, row[c]) for c in columns) + " |" for _, row in cells.iterrows()]
    return "\n".join(lines) + "\n"


def to_csv(cells: pd.DataFrame) -> str:
    flat = {}
    for column in cells.columns:
        values = cells[column].tolist()
        if values and isinstance(values[0], Interval):
            flat[f"{column} mean"] = [v.mean for v in values]
            flat[f"{column} ci95"] = [v.half_width for v in values]
        else:
            flat[column] = values
    return pd.DataFrame(flat).to_csv(index=False)


def read_runs(paths: Sequence[Path]) -> pd.DataFrame:
    """The collected tables of ``paths`` as one. Run ids are only unique within a sweep (two sweeps both have a
    ``model-scatternet-cnn_seed-0``), so each is prefixed with its file's name: otherwise a cell would pick up the
    other sweep's epochs of the same id."""
    frames = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist; run python -m experiments.collect first")
        frame = pd.read_csv(path)
        if "run_id" in frame:
            frame["run_id"] = path.stem + "/" + frame["run_id"].astype(str)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, nargs="+", help="tables from experiments.collect (one table of all)")
    parser.add_argument("--by", nargs="+", help=f"the columns that make a cell (default {CELL}, or with the total "
                        "epsilon in place of the noise when every run was calibrated to one)")
    parser.add_argument("--out", type=Path, help="writes OUT.md and OUT.csv (default: beside the CSV, -table)")
    parser.add_argument("--published", type=Path, help="a CSV of published numbers to put beside the cells (some "
                        "--by columns and 'published')")
    args = parser.parse_args(argv)
    try:
        if args.published is not None and not args.published.exists():
            raise UserError(f"{args.published} does not exist")
        table = read_runs(args.csv)
        by = args.by or default_cell(table)
        cells = cell_table(table, by)
        if args.published:
            cells = with_published(cells, pd.read_csv(args.published), by)
    except UserError as error:
        print(f"experiments.table: error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.csv[0].with_name(f"{args.csv[0].stem}-table")
    markdown_path, csv_path = out.parent / f"{out.name}.md", out.parent / f"{out.name}.csv"
    markdown = to_markdown(cells)
    atomic_write_text(markdown_path, markdown)
    atomic_write_text(csv_path, to_csv(cells))
    print(markdown, end="")
    unfinished = table.loc[table["status"] != "finished", "run_id"].nunique() if "status" in table else 0
    print(f"-> {markdown_path}, {csv_path}" + (f" ({unfinished} unfinished runs left out)" if unfinished else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
