"""A study's dashboard: its figures and per-cell table logged to its wandb group, so the group's workspace shows
accuracy against epsilon per normalization without downloading anything.

    python -m experiments.dashboard experiments/results/mnist-study-v2-final.csv [--group G] [--project P]
        [--wandb offline|online|disabled] [--out images] [--prefix P] [--by COLUMN...] [--table STEM]
        [--runs runs]

Draws the figures of ``experiments.figures`` (test and robust accuracy against epsilon; bn-public's accuracy
against the public-set size when the table varies it) into ``--out`` and writes the table of ``experiments.table``
beside the CSV (``<csv>-table.md`` and ``.csv``), as those two commands do; then logs them in one wandb run of job
type ``study-summary`` in the group (default: the CSV's sweep, the group its training runs are in), whose files go
to ``<runs>/<group>-summary/wandb``:

- ``figures/<name>``: each figure as an image;
- ``tables/cells``: the per-cell table (mean and 95% half-width per measure), a ``wandb.Table``;
- ``tables/epoch_means`` and ``charts/<measure>_vs_epsilon_<training>``: per cell and epoch, the mean over seeds of
  epsilon and the accuracies, and from it wandb's own line charts of accuracy against epsilon, one line per
  normalization and noise multiplier, one chart per training.

Only what the CSV holds is logged (``experiments.collect`` keeps only numbers that epsilon covers). A wandb
failure is a warning: the files are written first. ``experiments.study`` calls ``publish_study`` when all its
stages are done (files in ``<out>/<study>-final-summary/``), unless ``--wandb disabled``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from src.atomic_files import atomic_write_text
from src.config import WANDB_MODES, OutputConfig
from src.errors import UserError
from src.run_directory import runs_in
from src.tracking import WandbRun, check_wandb_mode

log = logging.getLogger(__name__)

JOB_TYPE = "study-summary"
MEASURES = {"test_acc": "test accuracy (%)", "robust_acc": "robust accuracy (%)",
            "autoattack_acc": "AutoAttack accuracy (%)", "val_acc": "validation accuracy (%)"}
CHARTED = ("test_acc", "robust_acc")  # drawn against epsilon per epoch (AutoAttack is on the last epoch only)


@dataclass(frozen=True)
class Dashboard:
    """What a dashboard wrote and where it went in wandb."""

    figures: Dict[str, Path]  # wandb key -> PNG
    tables: List[Path]  # the cell table, Markdown and CSV
    group: str = ""
    mode: str = "disabled"
    wandb: Optional[str] = None  # the summary run's directory, or why nothing was logged
    logged: List[str] = field(default_factory=list)  # the wandb keys logged

    def describe(self) -> str:
        if self.mode == "disabled":
            return "wandb disabled: nothing logged"
        if not self.logged:
            return f"wandb: {self.wandb}; the files are written"
        return (f"wandb group {self.group}: {len(self.logged)} items (figures, tables, charts) in {self.wandb}"
                + (" (upload with wandb sync)" if self.mode == "offline" else ""))


def draw_figures(table: pd.DataFrame, out: Path, prefix: str) -> Dict[str, Path]:
    """``experiments.figures``'s study figures: wandb key -> the PNG (a PDF is written beside each)."""
    import seaborn as sns

    from experiments.figures import accuracy_vs_epsilon, accuracy_vs_public_size

    sns.set_theme(style="whitegrid", context="paper")
    drawn = {"accuracy_vs_epsilon": accuracy_vs_epsilon(table, "test_acc", out, f"{prefix}_accuracy_vs_epsilon"),
             "robust_accuracy_vs_epsilon": accuracy_vs_epsilon(table, "robust_acc", out,
                                                               f"{prefix}_robust_accuracy_vs_epsilon")}
    if "public_size" in table:
        drawn["accuracy_vs_public_size"] = accuracy_vs_public_size(table, out, f"{prefix}_accuracy_vs_public_size")
    return {f"figures/{name}": next(p for p in paths if p.suffix == ".png") for name, paths in drawn.items() if paths}


def write_cell_table(table: pd.DataFrame, stem: Path, by: Optional[List[str]] = None) -> List[Path]:
    """``experiments.table``'s per-cell table (cells made by ``by``, default its ``default_cell``) as ``<stem>.md``
    and ``<stem>.csv``."""
    from experiments.table import cell_table, default_cell, to_csv, to_markdown

    cells = cell_table(table, by or default_cell(table))
    paths = [stem.parent / f"{stem.name}.md", stem.parent / f"{stem.name}.csv"]
    atomic_write_text(paths[0], to_markdown(cells))
    atomic_write_text(paths[1], to_csv(cells))
    return paths


def _line_keys(table: pd.DataFrame) -> List[str]:
    from experiments.table import default_cell

    keys = [c for c in default_cell(table) if c in table]
    if "public_size" in table and table["public_size"].nunique() > 1:  # the public-set-size sweep
        keys.append("public_size")
    return keys


def _label(row, keys: List[str]) -> str:
    parts = [str(row["norm"])] if "norm" in keys else []
    parts += [f"noise {row['noise_multiplier']:g}"] if "noise_multiplier" in keys else []
    parts += [f"epsilon {row['target_epsilon']:g}"] if "target_epsilon" in keys else []
    parts += [f"{int(row['public_size'])} public"] if "public_size" in keys else []
    return ", ".join(parts)


def epoch_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per cell and epoch, the mean over the finished runs' seeds of epsilon and each accuracy (the figures'
    lines), with a ``line`` label (normalization, noise multiplier) for the charts."""
    from experiments.figures import _with_training
    from experiments.table import finished_only

    data = _with_training(finished_only(table))
    data = data[data["epsilon"].notna() & (data["epsilon"] != math.inf)]
    keys = _line_keys(data)
    measures = [m for m in MEASURES if m in data and data[m].notna().any()]
    if data.empty or not measures:
        return pd.DataFrame(columns=["line", *keys, "epoch", "seeds", "epsilon", *measures])
    grouped = data.groupby([*keys, "epoch"], dropna=False)
    # as in experiments.table, a measure some seed lacks at an epoch is left empty, not averaged over the others
    means = grouped[["epsilon", *measures]].agg(lambda values: values.mean(skipna=False))
    means = means.join(grouped["seed"].nunique().rename("seeds")).reset_index()
    means.insert(0, "line", [_label(row, keys) for _, row in means.iterrows()])
    return means


def _wandb_table(frame: pd.DataFrame):
    import wandb

    frame = frame.astype(object).where(frame.notna(), None)  # JSON has no NaN: an empty cell is null
    return wandb.Table(dataframe=frame)


def wandb_items(figures: Dict[str, Path], cells_csv: Path, means: pd.DataFrame) -> dict:
    """The wandb objects of a dashboard: images, tables and line charts of accuracy against epsilon."""
    import wandb

    items = {key: wandb.Image(str(path), caption=path.stem) for key, path in figures.items()}
    items["tables/cells"] = _wandb_table(pd.read_csv(cells_csv))
    if not means.empty:
        items["tables/epoch_means"] = _wandb_table(means)
    for measure in (m for m in CHARTED if m in means):
        for training, lines in means[means[measure].notna()].groupby("training", sort=True):
            chart = _wandb_table(lines[["line", "epoch", "epsilon", measure]].reset_index(drop=True))
            items[f"charts/{measure}_vs_epsilon_{training}"] = wandb.plot.line(
                chart, "epsilon", measure, stroke="line",
                title=f"{MEASURES[measure]} vs epsilon, {training} training (mean over seeds, one point per epoch)")
    return items


def publish(table: pd.DataFrame, *, figures_dir: Path, prefix: str, table_stem: Path, group: str, mode: str,
            project: str, wandb_dir: Path, source: str = "", by: Optional[List[str]] = None) -> Dashboard:
    """Draw the figures and write the table (errors here are the caller's: bad input), then log them to wandb in
    one ``study-summary`` run of ``group`` (a failure there is a warning and ``Dashboard.wandb`` says why)."""
    figures = draw_figures(table, figures_dir, prefix)
    done = Dashboard(figures=figures, tables=write_cell_table(table, table_stem, by), group=group, mode=mode)
    if mode == "disabled":
        return done
    try:
        items = wandb_items(figures, done.tables[1], epoch_means(table))
    except Exception as error:  # the files are written; a dashboard that cannot be built is only a warning
        log.warning("the wandb dashboard could not be built (%s: %s); the files are written", type(error).__name__,
                    error)
        return replace(done, wandb=f"not logged: {type(error).__name__}: {error}")
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = WandbRun.start(mode=mode, project=project, group=group, run_dir=wandb_dir, run_id=f"{group}-summary",
                         config={"source": source, "runs": int(table["run_id"].nunique()),
                                 "figures": sorted(figures), "tables": [str(p) for p in done.tables]},
                         tags=[JOB_TYPE], job_type=JOB_TYPE)
    directory = run.directory
    run.log_media(items)
    run.finish()
    if run.error:
        return replace(done, wandb=f"not logged: {run.error}")
    return replace(done, wandb=directory, logged=sorted(items))


def _wandb_names(stage_dir: Path) -> tuple:
    """The wandb project and group of a stage's runs, from a run's config.json (the runner sets the group)."""
    defaults = OutputConfig()
    for run in runs_in(stage_dir):
        output = run.read_config().get("output", {})
        return output.get("wandb_project") or defaults.wandb_project, output.get("wandb_group") or stage_dir.name
    return defaults.wandb_project, stage_dir.name


def publish_study(name: str, out: Path, mode: str) -> Dashboard:
    """``experiments.study``'s last step: the final stage's runs (with the AutoAttack stage's accuracies) collected
    into ``<out>/<name>-final-summary/`` with the figures and the table, and logged to the final runs' wandb group.
    Never raises: a study is not failed by its dashboard."""
    from experiments.collect import add_evaluations, collect

    final_dir, evaluations = out / f"{name}-final", out / f"{name}-autoattack"
    try:
        table = collect(final_dir)
        if evaluations.is_dir() and any(True for _ in runs_in(evaluations)):
            table = add_evaluations(table, evaluations)
        project, group = _wandb_names(final_dir)
        summary_dir = out / f"{group}-summary"
        summary_dir.mkdir(parents=True, exist_ok=True)
        csv = summary_dir / f"{final_dir.name}.csv"
        atomic_write_text(csv, table.to_csv(index=False))
        try:
            check_wandb_mode(mode)
        except UserError as error:
            log.warning("%s; the study's figures and table are written without wandb", error)
            mode = "disabled"
        return publish(table, figures_dir=summary_dir / "images", prefix=final_dir.name,
                       table_stem=summary_dir / f"{final_dir.name}-table", group=group, mode=mode, project=project,
                       wandb_dir=summary_dir, source=str(csv))
    except Exception as error:
        log.warning("the study's dashboard failed (%s: %s); its runs are complete", type(error).__name__, error)
        return Dashboard(figures={}, tables=[], group=f"{name}-final", mode=mode,
                         wandb=f"not logged: {type(error).__name__}: {error}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="a table from experiments.collect")
    parser.add_argument("--group", help="wandb group (default: the CSV's sweep, where its training runs are)")
    parser.add_argument("--project", default=OutputConfig().wandb_project, help="wandb project (default %(default)s)")
    parser.add_argument("--wandb", choices=WANDB_MODES, default="offline")
    parser.add_argument("--out", type=Path, default=Path("images"), help="folder for the figures (default images)")
    parser.add_argument("--prefix", help="figure file name prefix (default: the sweep name)")
    parser.add_argument("--by", nargs="+", help="the columns that make a cell of the table (default: "
                        "experiments.table's)")
    parser.add_argument("--table", type=Path, help="writes TABLE.md and TABLE.csv (default: beside the CSV, -table)")
    parser.add_argument("--runs", type=Path, default=Path("runs"),
                        help="the summary run's wandb files go to RUNS/<group>-summary (default runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        check_wandb_mode(args.wandb)
        if not args.csv.exists():
            raise UserError(f"{args.csv} does not exist; run python -m experiments.collect first")
        table = pd.read_csv(args.csv)
        if table.empty:
            raise UserError(f"{args.csv} has no rows")
        sweep = str(table["sweep"].iloc[0])
        group = args.group or sweep
        dashboard = publish(table, figures_dir=args.out, prefix=args.prefix or sweep,
                            table_stem=args.table or args.csv.with_name(f"{args.csv.stem}-table"), group=group,
                            mode=args.wandb, project=args.project, wandb_dir=args.runs / f"{group}-summary",
                            source=str(args.csv), by=args.by)
    except UserError as error:
        print(f"experiments.dashboard: error: {error}", file=sys.stderr)
        return 2
    for path in [*dashboard.figures.values(), *dashboard.tables]:
        print(path)
    print(dashboard.describe(), file=sys.stdout if dashboard.logged or args.wandb == "disabled" else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
