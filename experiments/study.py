"""A study whose learning rate is tuned per cell on the validation split, then run over seeds on the test set.

    python -m experiments.study experiments/sweeps/mnist_study_v2.yaml [--jobs 2] [--out runs] [--list]

A study file (YAML) has a ``name``, a ``dataset``, ``cells`` (a grid: every combination is one cell, e.g.
norm x noise x training), ``training`` (what each training name means as flags), ``tune`` (the values tried
per cell and the tuning seed), ``seeds`` and ``fixed`` flags. ``tune`` may name several flags: each cell tries
every combination, and a flag given as ``{values: [...], when: {norm: [bn-dp]}}`` is tried only in the cells
that match (``--norm-noise`` means nothing to the other norms). ``narrow`` cuts a training down when the budget
does not hold all of it: ``narrow: {fgsm-rs: {target-epsilon: [8], seeds: [0, 1]}}`` keeps only its cells at
those values and runs them on those seeds. Three stages, each an ordinary sweep of ``experiments.run``
(resumable: finished runs are skipped, interrupted ones resume from their checkpoint):

1. ``<name>-tune``: every cell at every tuned value, the tuning seed, no robust evaluation (a cell whose
   training is in ``borrow_tuning`` takes the choice of the same cell under the training named there). The
   choice per cell is the values with the best validation accuracy after the last epoch (ties: the first
   listed); the test numbers these runs also record are never read. Written to ``<out>/<name>-selection.json``.
2. ``<name>-final``: every cell at its chosen value, each seed: the runs the study reports.
3. ``<name>-autoattack``: ``vision.py --eval-only`` of every final model under AutoAttack (``autoattack:
   apgd`` for its white-box pair alone, ``false`` for none; models with ``eval-robust-size: 0`` are left
   out), on the same first ``eval-robust-size`` test images as its PGD number.

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
from typing import Any, Dict, List, Optional

from attacks.defaults import ENSEMBLES
from experiments.run import add_runner_arguments, evaluation_stage, run_state, run_sweep
from experiments.sweep import FORBIDDEN, GridPoint, Stage, _run_id, point_flags, read_yaml
from src.atomic_files import atomic_write_json
from src.errors import UserError
from src.run_directory import RunDirectory, runs_in


@dataclass(frozen=True)
class Tuned:
    """One tuned flag: its values, and the cells it is tried in (``when``: cell key -> allowed values; empty:
    every cell)."""

    flag: str
    values: list
    when: Dict[str, list] = field(default_factory=dict)

    def applies(self, cell: Dict[str, Any]) -> bool:
        return all(cell.get(key) in allowed for key, allowed in self.when.items())


@dataclass(frozen=True)
class Study:
    name: str
    dataset: str
    cells: Dict[str, list]  # grid of cells; "training" values are names in ``training``
    training: Dict[str, dict]
    tune: List[Tuned]  # the flags tried per cell (e.g. lr; bn-dp's noise in bn-dp cells only)
    tune_seed: int
    seeds: list
    fixed: Dict[str, Any] = field(default_factory=dict)
    autoattack: Optional[str] = "autoattack"  # the final models' last evaluation (an --eval-attack), or None
    # training name -> training name whose tuned value it takes (e.g. the costly PGD-k cells take the FGSM-RS
    # cells' choice: the study's question is the normalization, not a retuning per attack)
    borrow_tuning: Dict[str, str] = field(default_factory=dict)
    # training name -> {cell key: values kept, "seeds": seeds}: a training cut down to fit the budget
    narrow: Dict[str, dict] = field(default_factory=dict)

    def cell_values(self) -> List[Dict[str, Any]]:
        """The cells, in grid order, without those a ``narrow`` entry leaves out."""
        keys = list(self.cells)
        cells = [dict(zip(keys, combo)) for combo in itertools.product(*(self.cells[k] for k in keys))]
        return [cell for cell in cells if all(cell[key] in kept for key, kept in
                                               self.narrow.get(cell.get("training"), {}).items() if key != "seeds")]

    def seeds_of(self, cell: Dict[str, Any]) -> list:
        return list(self.narrow.get(cell.get("training"), {}).get("seeds", self.seeds))

    def trials(self, cell: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Every combination of the tuned values this cell tries, in the file's order (the first is the
        tie-breaker)."""
        tuned = [t for t in self.tune if t.applies(cell)]
        combos = itertools.product(*(t.values for t in tuned))
        return [dict(zip((t.flag for t in tuned), combo)) for combo in combos]

    def cell_flags(self, cell: Dict[str, Any]) -> Dict[str, Any]:
        """The flags of a cell: its values, with a training name replaced by what it means."""
        flags = {k: v for k, v in cell.items() if k != "training"}
        if "training" in cell:
            flags.update(self.training[cell["training"]])
        return flags


def _point(values: Dict[str, Any], flags: Dict[str, Any]) -> GridPoint:
    return GridPoint(run_id=_run_id(values), values=values, flags=point_flags(flags))


def tune_stage(study: Study) -> Stage:
    points = []
    for cell in study.cell_values():
        if cell.get("training") in study.borrow_tuning:
            continue
        for trial in study.trials(cell):
            flags = {**study.fixed, **study.cell_flags(cell), **trial, "seed": study.tune_seed,
                     "eval-robust-size": 0}
            points.append(_point({**cell, **trial}, flags))
    return Stage(f"{study.name}-tune", study.dataset, points)


def select(study: Study, out: Path) -> Dict[str, Any]:
    """Per cell (by its run-id prefix), the tuned values with the best final validation accuracy."""
    stage_dir = out / f"{study.name}-tune"
    choices = {}
    for cell in study.cell_values():
        if cell.get("training") in study.borrow_tuning:
            continue
        scores = []
        for trial in study.trials(cell):
            run = RunDirectory(stage_dir / _run_id({**cell, **trial}))
            if run_state(run.path) not in ("finished", "diverged"):
                raise UserError(f"tuning run {run.path.name} is not done ({run_state(run.path)}); run the study "
                                "again to finish it")
            val = run.read_summary().to_dict().get("val_acc")
            scores.append((val if val is not None else float("-inf"), trial))
        best_val, best = max(scores, key=lambda s: s[0])  # the first listed among ties
        choices[_run_id(cell)] = {"cell": cell, **best, "val_acc": best_val,
                                  "tried": [{**trial, "val_acc": val} for val, trial in scores]}
    for cell in study.cell_values():
        lender = study.borrow_tuning.get(cell.get("training"))
        if lender is not None:
            choice = choices[_run_id({**cell, "training": lender})]
            choices[_run_id(cell)] = {"cell": cell, **chosen_flags(study, choice), "borrowed_from": lender}
    return choices


def chosen_flags(study: Study, choice: Dict[str, Any]) -> Dict[str, Any]:
    """The tuned flags of a cell's choice (its entry in the selection also holds the cell and the scores)."""
    return {t.flag: choice[t.flag] for t in study.tune if t.flag in choice}


def first_choices(study: Study) -> Dict[str, Any]:
    """Every cell at its first tried values: the final stage's shape (its run ids and their number do not
    depend on the choice) before the tuning has chosen, for plans and checks."""
    return {_run_id(cell): {"cell": cell, **study.trials(cell)[0]} for cell in study.cell_values()}


def final_stage(study: Study, choices: Dict[str, Any]) -> Stage:
    points = []
    for cell in study.cell_values():
        chosen = chosen_flags(study, choices[_run_id(cell)])
        for seed in study.seeds_of(cell):
            values = {**cell, "seed": seed}
            points.append(_point(values, {**study.fixed, **study.cell_flags(cell), **chosen, "seed": seed}))
    return Stage(f"{study.name}-final", study.dataset, points)


def autoattack_stage(study: Study, final: Stage, out: Path) -> Stage:
    """``--eval-only`` of every finished final model under the study's ``autoattack`` (AutoAttack, or ``apgd``:
    its white-box pair; same images, same radius and norm), except the models whose robust evaluation is off
    (``eval-robust-size: 0``, e.g. the CIFAR-10 study's clean-trained models: 0% at any radius worth reporting,
    and an attack through the scattering is the costliest part of a run)."""
    return evaluation_stage(attacked(final), out, study.autoattack, name=f"{study.name}-autoattack")


def attacked(final: Stage) -> Stage:
    """The final runs whose robust evaluation is on: the ones the last evaluation attacks."""
    return Stage(final.name, final.dataset, [p for p in final.points() if p.flags.get("eval-robust-size") != 0])


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
    tuned = [_tuned(path, flag, spec, raw["cells"]) for flag, spec in tune.items()]
    if not tuned:
        raise UserError(f"study file {path}: tune names at least one flag and its list of values")
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
    narrow = raw.get("narrow") or {}
    for name, kept in narrow.items():
        if name not in names or not isinstance(kept, dict) or set(kept) - set(raw["cells"]) - {"seeds"} \
                or not all(isinstance(v, list) and v for v in kept.values()):
            raise UserError(f"study file {path}: narrow maps a training name to lists of kept cell values (or "
                            f"seeds), got {name}: {kept}")
    study = Study(name=str(raw["name"]), dataset=str(raw["dataset"]), cells=raw["cells"], training=training,
                  tune=tuned, tune_seed=int(tune_seed), seeds=list(raw["seeds"]), fixed=fixed,
                  autoattack=_final_attack(path, raw.get("autoattack", True)), borrow_tuning=dict(borrow),
                  narrow=dict(narrow))
    cells = study.cell_values()
    for cell in cells:  # a borrowing cell needs its lender among the cells
        lender = borrow.get(cell.get("training"))
        if lender is not None and {**cell, "training": lender} not in cells:
            raise UserError(f"study file {path}: {_run_id(cell)} borrows from a cell the study does not run")
    return study


def _final_attack(path: Path, setting) -> Optional[str]:
    """The study's ``autoattack``: true (AutoAttack's standard ensemble), false (none) or an ensemble's name."""
    if isinstance(setting, bool):
        return "autoattack" if setting else None
    if setting not in ENSEMBLES:
        raise UserError(f"study file {path}: autoattack is true, false or one of {', '.join(ENSEMBLES)}, "
                        f"got {setting}")
    return str(setting)


def _tuned(path: Path, flag: str, spec, cells: Dict[str, list]) -> Tuned:
    """A ``tune`` entry: a flag's list of values, or ``{values: [...], when: {cell key: [values]}}``."""
    if isinstance(spec, dict):
        values, when = spec.get("values"), spec.get("when") or {}
    else:
        values, when = spec, {}
    well_formed = isinstance(values, list) and values and isinstance(when, dict)
    if not well_formed or not all(isinstance(v, list) and k in cells for k, v in when.items()):
        raise UserError(f"study file {path}: tune.{flag} is a list of values, or values and a when that names "
                        f"cell keys and their lists, got {spec}")
    return Tuned(flag, list(values), dict(when))


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
