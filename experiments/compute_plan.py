"""A compute plan: the stages of a body of runs, each with its runs and their measured cost, against a budget.

    python -m experiments.compute_plan experiments/plans/cpu_results.yaml [--out runs]

Written before the runs start, so that the budget is spent on purpose. A plan file (YAML) has a ``name``, a
``budget_hours``, the ``machine`` its minutes were measured on, and ``stages`` in the order they run. A stage
names its ``sweeps`` (sweep files, run with ``python -m experiments.run``: resumable, results as they finish),
or a ``study`` file and its ``part`` (``tune``, ``final`` or ``autoattack``: the stages ``python -m
experiments.study`` runs; the final runs are counted before the tuning has chosen anything, since which value
a cell takes does not change how many runs it has), or, for a stage whose sweep can only be written once an
earlier stage has chosen its settings, declares its ``runs`` per model. ``minutes_per_run`` gives the cost of
one run of each model (the run's ``model`` flag, or the dataset's default model under the key ``default``) or,
with ``per: KEY``, of each value of another flag or cell key (e.g. ``per: training``: a robust run costs far more
than a clean one), and ``basis`` says how it was measured. Runs are counted from the sweep and study files
themselves, so the plan does not repeat them.

It prints the stages as a table (runs, minutes each, hours), the total against the budget, and with ``--out``
how many of each stage's runs are done and the hours they took. A plan over its budget is refused (exit 2).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from experiments.run import DONE_STATES, run_state
from experiments.study import attacked, final_stage, first_choices, load_study, tune_stage
from experiments.sweep import Stage as StudyStage
from experiments.sweep import Sweep, load_sweep, read_yaml
from src.errors import UserError
from src.run_directory import RunDirectory


@dataclass(frozen=True)
class Stage:
    name: str
    minutes_per_run: Dict[str, float]  # model -> minutes of one run on the plan's machine
    sweeps: List[Sweep] = field(default_factory=list)
    declared_runs: Dict[str, int] = field(default_factory=dict)  # model -> runs, before the sweep exists
    basis: str = ""
    per: str = "model"  # what minutes_per_run is keyed by: a flag or cell value of each run

    def runs(self) -> Counter:
        """Runs per model (or per ``per``): counted from the sweeps, plus the declared ones."""
        counts = Counter(self.declared_runs)
        for sweep in self.sweeps:
            counts.update(str(point.values.get(self.per, point.flags.get(self.per, "default")))
                          for point in sweep.points())
        return counts

    def hours(self) -> float:
        runs = self.runs()
        missing = sorted(set(runs) - set(self.minutes_per_run))
        if missing:
            raise UserError(f"stage {self.name}: no minutes_per_run for {', '.join(missing)}")
        return sum(n * self.minutes_per_run[model] for model, n in runs.items()) / 60

    def done(self, out: Path) -> int:
        """How many of its sweeps' runs have finished (or diverged) under ``out``."""
        return sum(run_state(out / sweep.name / point.run_id) in DONE_STATES
                   for sweep in self.sweeps for point in sweep.points())

    def spent_hours(self, out: Path) -> float:
        """The wall time its sweeps' runs under ``out`` have taken so far (a resumed run's time adds up over its
        attempts: the summary's ``wall_seconds``)."""
        seconds = 0.0
        for sweep in self.sweeps:
            for point in sweep.points():
                run = RunDirectory(out / sweep.name / point.run_id)
                if run_state(run.path) not in ("missing", "unreadable"):  # unreadable: no summary written yet
                    seconds += run.read_summary().wall_seconds or 0.0
        return seconds / 3600


@dataclass(frozen=True)
class ComputePlan:
    name: str
    budget_hours: float
    machine: str
    stages: List[Stage]

    def hours(self) -> float:
        return sum(stage.hours() for stage in self.stages)


def load_plan(path) -> ComputePlan:
    """Read a plan and the sweep files it names (relative to the repository root, as the runner takes them)."""
    path = Path(path)
    raw = read_yaml(path, "plan")
    if not isinstance(raw, dict) or not all(k in raw for k in ("name", "budget_hours", "stages")):
        raise UserError(f"plan file {path} must be a mapping with name, budget_hours and stages")
    stages = []
    for entry in raw["stages"]:
        if not entry.get("sweeps") and not entry.get("runs") and not entry.get("study"):
            raise UserError(f"plan file {path}: stage {entry.get('name')} has no sweeps, study or runs")
        sweeps = [load_sweep(s) for s in entry.get("sweeps") or []]
        if entry.get("study"):
            sweeps.append(study_part(path, entry["study"], entry.get("part")))
        stages.append(Stage(name=str(entry["name"]), minutes_per_run=dict(entry["minutes_per_run"]),
                            sweeps=sweeps, declared_runs=dict(entry.get("runs") or {}),
                            basis=str(entry.get("basis", "")), per=str(entry.get("per", "model"))))
    return ComputePlan(name=str(raw["name"]), budget_hours=float(raw["budget_hours"]),
                       machine=str(raw.get("machine", "")), stages=stages)


def study_part(plan_path: Path, study_path, part) -> Sweep:
    """One stage of a study, as the study runs it: its tuning runs, its final runs (each cell at its first tried
    values: the run ids and their number do not depend on the choice) or the final models its last evaluation
    attacks (all of them planned, finished or not)."""
    study = load_study(study_path)
    if part == "tune":
        return tune_stage(study)
    if part not in ("final", "autoattack"):
        raise UserError(f"plan file {plan_path}: a study stage's part is tune, final or autoattack, got {part}")
    final = final_stage(study, first_choices(study))
    if part == "final":
        return final
    return StudyStage(f"{study.name}-autoattack", final.dataset, attacked(final).points())


def table(plan: ComputePlan, out: Path = None) -> str:
    """The plan as a markdown table, one row per stage, and its total against the budget."""
    lines = [f"{plan.name}: {plan.machine}", "",
             "| stage | runs | minutes per run | hours |" + (" done | hours spent |" if out else ""),
             "| --- | --- | --- | --- |" + (" --- | --- |" if out else "")]
    for stage in plan.stages:
        runs = stage.runs()
        what = ", ".join(f"{n} {model}" for model, n in runs.items())
        minutes = ", ".join(f"{stage.minutes_per_run[m]:g}" for m in runs)
        row = f"| {stage.name} | {what} | {minutes} | {stage.hours():.2f} |"
        if out:
            planned = sum(len(s.points()) for s in stage.sweeps)
            row += (f" {stage.done(out)}/{planned} | {stage.spent_hours(out):.2f} |" if planned
                    else " sweep not written yet | |")
        lines.append(row)
    lines += ["", f"total {plan.hours():.2f} h of a budget of {plan.budget_hours:g} h"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compute_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--out", type=Path, help="runs folder: also count each stage's finished runs and their hours")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        print(table(plan, args.out))
        if plan.hours() > plan.budget_hours:
            raise UserError(f"plan {plan.name} needs {plan.hours():.2f} h, over its budget of {plan.budget_hours:g} h")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
