"""A study whose learning rate is tuned per cell on the validation split, then run over seeds on the test set.

    python -m experiments.study experiments/sweeps/mnist_study_v2.yaml [--jobs 2] [--out runs] [--list]

A study file (YAML) has a ``name``, a ``dataset``, ``cells`` (a grid: every combination is one cell, e.g.
norm x noise x training), ``training`` (what each training name means as flags), ``tune`` (the values tried
per cell and the tuning seed), ``seeds`` and ``fixed`` flags. Three stages, each an ordinary sweep of
``experiments.run`` (resumable: finished runs are skipped, interrupted ones resume from their checkpoint):

1. ``<name>-tune``: every cell at every tuned value, the tuning seed, no robust evaluation (a cell whose
   training is in ``borrow_tuning`` takes the choice of the same cell under the training named there). The
   choice per cell is the value with the best validation accuracy after the last epoch (ties: the first
   listed); the test numbers these runs also record are never read. Written to ``<out>/<name>-selection.json``.
2. ``<name>-final``: every cell at its chosen value, each seed: the runs the study reports.
3. ``<name>-autoattack``: ``vision.py --eval-only`` of every final model under AutoAttack, on the same first
   ``eval-robust-size`` test images as its PGD number.

The validation split must be in ``fixed`` (``val-size``): tuning on test images is refused. When every stage is
done, unless ``--wandb disabled``, ``experiments.dashboard`` collects the final runs (with their AutoAttack
accuracies) into ``<out>/<name>-final-summary/`` with the figures and the per-cell table, and logs them to the final
runs' wandb group (a wandb failure is a warning, not a failed study).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from experiments.run import add_runner_arguments, evaluation_stage, run_state, run_sweep
from experiments.sweep import FORBIDDEN, GridPoint, Stage, _run_id, point_flags, read_yaml
from src.atomic_files import atomic_write_json
from src.errors import UserError
from src.run_directory import RunDirectory, runs_in


@dataclass(frozen=True)
class Study:
    name: str
    dataset: str
    cells: Dict[str, list]  # grid of cells; "training" values are names in ``training``
    training: Dict[str, dict]
    tune: Dict[str, list]  # flag -> values tried per cell (one flag, e.g. lr)
    tune_seed: int
    seeds: list
    fixed: Dict[str, Any] = field(default_factory=dict)
    autoattack: bool = True
    # training name -> training name whose tuned value it takes (e.g. the costly PGD-k cells take the FGSM-RS
    # cells' choice: the study's question is the normalization, not a retuning per attack)
    borrow_tuning: Dict[str, str] = field(default_factory=dict)

    def cell_values(self) -> List[Dict[str, Any]]:
        keys = list(self.cells)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.cells[k] for k in keys))]

    def cell_flags(self, cell: Dict[str, Any]) -> Dict[str, Any]:
        """The flags of a cell: its values, with a training name replaced by what it means."""
        flags = {k: v for k, v in cell.items() if k != "training"}
        if "training" in cell:
            flags.update(self.training[cell["training"]])
        return flags

    @property
    def tuned(self) -> str:
        return next(iter(self.tune))


def _point(values: Dict[str, Any], flags: Dict[str, Any]) -> GridPoint:
    return GridPoint(run_id=_run_id(values), values=values, flags=point_flags(flags))


def tune_stage(study: Study) -> Stage:
    points = []
    for cell in study.cell_values():
        if cell.get("training") in study.borrow_tuning:
            continue
        for value in study.tune[study.tuned]:
            values = {**cell, study.tuned: value}
            flags = {**study.fixed, **study.cell_flags(cell), study.tuned: value, "seed": study.tune_seed,
                     "eval-robust-size": 0}
            points.append(_point(values, flags))
    return Stage(f"{study.name}-tune", study.dataset, points)


def select(study: Study, out: Path) -> Dict[str, Any]:
    """Per cell (by its run-id prefix), the tuned value with the best final validation accuracy."""
    stage_dir = out / f"{study.name}-tune"
    choices = {}
    for cell in study.cell_values():
        if cell.get("training") in study.borrow_tuning:
            continue
        scores = []
        for value in study.tune[study.tuned]:
            run = RunDirectory(stage_dir / _run_id({**cell, study.tuned: value}))
            if run_state(run.path) not in ("finished", "diverged"):
                raise UserError(f"tuning run {run.path.name} is not done ({run_state(run.path)}); run the study "
                                "again to finish it")
            val = run.read_summary().to_dict().get("val_acc")
            scores.append((val if val is not None else float("-inf"), value))
        best = max(scores, key=lambda s: s[0])  # the first listed among ties
        choices[_run_id(cell)] = {"cell": cell, study.tuned: best[1], "val_acc": best[0],
                                  "tried": [{study.tuned: v, "val_acc": s} for s, v in scores]}
    for cell in study.cell_values():
        lender = study.borrow_tuning.get(cell.get("training"))
        if lender is not None:
            choice = choices[_run_id({**cell, "training": lender})]
            choices[_run_id(cell)] = {"cell": cell, study.tuned: choice[study.tuned], "borrowed_from": lender}
    return choices


def final_stage(study: Study, choices: Dict[str, Any]) -> Stage:
    points = []
    for cell in study.cell_values():
        chosen = choices[_run_id(cell)][study.tuned]
        for seed in study.seeds:
            values = {**cell, "seed": seed}
            points.append(_point(values, {**study.fixed, **study.cell_flags(cell), study.tuned: chosen,
                                          "seed": seed}))
    return Stage(f"{study.name}-final", study.dataset, points)


def autoattack_stage(study: Study, final: Stage, out: Path) -> Stage:
    """``--eval-only`` of every finished final model under AutoAttack (same images, same radius and norm)."""
    return evaluation_stage(final, out, "autoattack", name=f"{study.name}-autoattack")


def compute_hours(stage_dir: Path) -> float:
    """Run time summed over a stage's runs (set-aside attempts included; a resumed run counts every part),
    in hours: the study's compute, whatever --jobs ran at once."""
    return sum(run.read_summary().wall_seconds or 0.0 for run in runs_in(stage_dir, attempts=True)) / 3600


def run_study(study: Study, *, out: Path, jobs: int, wandb_mode: str = "offline") -> dict:
    report = {"tune": run_sweep(tune_stage(study), out=out, jobs=jobs, extra=[], wandb_mode=wandb_mode)}
    if report["tune"]["stopped_by"]:
        return report
    choices = select(study, out)
    atomic_write_json(out / f"{study.name}-selection.json", choices)
    final = final_stage(study, choices)
    report["final"] = run_sweep(final, out=out, jobs=jobs, extra=[], wandb_mode=wandb_mode)
    if study.autoattack and not report["final"]["stopped_by"]:
        report["autoattack"] = run_sweep(autoattack_stage(study, final, out), out=out, jobs=jobs, extra=[],
                                         wandb_mode=wandb_mode)
    return report


def load_study(path) -> Study:
    path = Path(path)
    raw = read_yaml(path, "study")
    missing = [k for k in ("name", "dataset", "cells", "tune", "seeds") if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise UserError(f"study file {path} lacks {', '.join(missing)}")
    tune = dict(raw["tune"])
    tune_seed = tune.pop("seed", 0)
    fixed, training = raw.get("fixed") or {}, raw.get("training") or {}
    if len(tune) != 1 or not all(isinstance(v, list) and v for v in tune.values()):
        raise UserError(f"study file {path}: tune names one flag and its list of values (and optionally seed)")
    if not fixed.get("val-size"):
        raise UserError(f"study file {path}: tuning needs a validation split; set val-size in fixed")
    names = set(raw["cells"].get("training", []))
    if names - set(training):
        raise UserError(f"study file {path}: training {sorted(names - set(training))} not defined under training")
    clash = (set(raw["cells"]) | set(fixed) | set(tune)) & (FORBIDDEN | {"seed", "eval-only"})
    if clash:
        raise UserError(f"study file {path} sets {', '.join(sorted(clash))}: the study sets those itself")
    borrow = raw.get("borrow_tuning") or {}
    if not set(borrow) <= names or not set(borrow.values()) <= names - set(borrow):
        raise UserError(f"study file {path}: borrow_tuning maps a training name to a tuned one, got {borrow}")
    return Study(name=str(raw["name"]), dataset=str(raw["dataset"]), cells=raw["cells"], training=training,
                 tune=tune, tune_seed=int(tune_seed), seeds=list(raw["seeds"]), fixed=fixed,
                 autoattack=bool(raw.get("autoattack", True)), borrow_tuning=dict(borrow))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study_file")
    add_runner_arguments(parser, out_help="folder for the stages' folders",
                         list_help="list the tuning runs and their state, run nothing")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study_file)
        if args.list:
            stage = tune_stage(study)
            for point in stage.points():
                print(f"{run_state(args.out / stage.name / point.run_id):10s} {stage.name}/{point.run_id}")
            return 0
        report = run_study(study, out=args.out, jobs=args.jobs, wandb_mode=args.wandb)
    except UserError as error:
        print(f"experiments.study: error: {error}", file=sys.stderr)
        return 2
    for stage, summary in report.items():
        print(f"{stage}: {summary['runs']} runs, {summary['skipped']} already done, {summary['finished']} finished "
              f"now, {summary['failed']} failed, {summary['resumed']} resumed, {summary['stopped']} stopped or not "
              f"started; {summary['directory']}; {compute_hours(summary['directory']):.2f} run-hours so far")
    stopped = next((s["stopped_by"] for s in report.values() if s["stopped_by"]), "")
    if stopped:
        print(f"stopped by {stopped}: the next call continues")
        return 130
    failed = any(s["failed"] for s in report.values())
    if not failed and "final" in report and args.wandb != "disabled":  # every stage done: the study's dashboard
        from experiments.dashboard import publish_study  # pandas and seaborn, only when drawing

        dashboard = publish_study(study.name, args.out, args.wandb)
        print(f"dashboard: {', '.join(str(p) for p in dashboard.tables) or 'not written'}; {dashboard.describe()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
