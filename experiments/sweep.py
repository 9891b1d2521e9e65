"""Sweep files: a grid of ``vision.py`` flags, expanded into named runs.

A sweep file (YAML) has a ``name``, a ``dataset``, a ``grid`` (flag -> list of values; every combination
is one run) and ``fixed`` flags shared by all runs. Flag names are ``vision.py``'s without the dashes'
prefix (``train-subset``); ``true``/``false`` turn a switch such as ``robust`` on or off. Each grid point
gets a stable run id built from its grid values, so a rerun finds its earlier results.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import yaml

from src.config import ROBUST_TRAINING_FLAGS
from src.errors import UserError


@dataclass(frozen=True)
class GridPoint:
    run_id: str
    values: Dict[str, Any]  # the grid's values for this point
    flags: Dict[str, Any]  # every flag of the run (fixed and grid)

    def argv(self) -> List[str]:
        return command_line(self.flags)


def command_line(flags: Dict[str, Any]) -> List[str]:
    """Flags as a ``vision.py`` command line: a switch is present when true; when false it is absent, or
    ``--no-NAME`` for a switch that a default may turn on (``download``; cifar10's ``augment``); None leaves the
    setting to its default."""
    from src.cli import negatable
    from src.config import SETTINGS

    args: List[str] = []
    for name, value in flags.items():
        if isinstance(value, bool):
            setting = SETTINGS.get(name.replace("-", "_"))
            if value:
                args.append(f"--{name}")
            elif setting is not None and negatable(setting):
                args.append(f"--no-{name}")
        elif value is not None:
            args += [f"--{name}", str(value)]
    return args


@dataclass(frozen=True)
class Sweep:
    name: str
    dataset: str
    grid: Dict[str, list]
    fixed: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def points(self) -> List[GridPoint]:
        keys = list(self.grid)
        points = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            points.append(GridPoint(run_id=_run_id(values), values=values,
                                    flags=point_flags({**self.fixed, **values})))
        return points


class Stage(Sweep):
    """A sweep of explicit points rather than a grid: a study's stages, a sweep's re-evaluations
    (``experiments.run`` runs it like any sweep)."""

    def __init__(self, name: str, dataset: str, points: List[GridPoint]):
        super().__init__(name=name, dataset=dataset, grid={}, fixed={})
        object.__setattr__(self, "_points", points)

    def points(self) -> List[GridPoint]:
        return list(self._points)


def point_flags(flags: Dict[str, Any]) -> Dict[str, Any]:
    """The flags one grid point passes to ``vision.py``: the training-attack settings of a sweep apply to its
    robust points only (``vision.py`` refuses them without ``--robust`` rather than ignore them). A sweep's
    runs are reproducible: a point without a seed gets ``--seed 0`` (``vision.py`` alone draws one from the OS)."""
    flags = {"seed": 0, **flags}
    if flags.get("robust"):
        return flags
    return {k: v for k, v in flags.items() if k.replace("-", "_") not in ROBUST_TRAINING_FLAGS}


def _run_id(values: Dict[str, Any]) -> str:
    parts = []
    for name, value in values.items():
        text = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        parts.append(f"{name}-{text}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)) or "run"


FORBIDDEN = {"dataset", "out", "run-id", "wandb-group"}  # the runner sets these itself


def read_yaml(path: Path, kind: str):
    """The contents of an experiment file (sweep, study, plan); a missing or malformed one is a one-line
    UserError naming its ``kind``."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{kind} file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UserError(f"{kind} file {path} is not valid YAML: {str(error).splitlines()[0]}") from None


def load_sweep(path) -> Sweep:
    """Read and check a sweep file; problems are one-line UserErrors."""
    path = Path(path)
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} must be a mapping with name, dataset, grid and fixed")
    missing = [k for k in ("name", "dataset", "grid") if k not in raw]
    if missing:
        raise UserError(f"sweep file {path} lacks {', '.join(missing)}")
    grid, fixed = raw["grid"] or {}, raw.get("fixed") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"sweep file {path}: every grid entry must be a non-empty list of values")
    clash = (set(grid) | set(fixed)) & FORBIDDEN
    if clash:
        raise UserError(f"sweep file {path} sets {', '.join(sorted(clash))}: the runner sets those itself")
    both = set(grid) & set(fixed)
    if both:
        raise UserError(f"sweep file {path} has {', '.join(sorted(both))} in both grid and fixed")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(raw["name"])):
        raise UserError(f"sweep name {raw['name']!r} must be a plain folder name")
    return Sweep(name=str(raw["name"]), dataset=str(raw["dataset"]), grid=grid, fixed=fixed,
                 description=str(raw.get("description", "")))


def wandb_sweep_spec(sweep: Sweep, project: str = "private_robust_vision") -> dict:
    """The same grid as a wandb sweep (``wandb sweep SPEC`` then ``wandb agent ID`` on every machine).

    Each agent run is an ordinary ``vision.py`` run with the same flags (through ``experiments.point``,
    which applies ``point_flags``), grouped under the sweep's name.
    """
    parameters = {name: {"values": values} for name, values in sweep.grid.items()}
    parameters.update({name: {"value": value} for name, value in sweep.fixed.items()})
    return {
        "name": sweep.name,
        "project": project,
        "program": "experiments/point.py",
        "method": "grid",
        "description": sweep.description,
        "command": ["${env}", "python", "-m", "experiments.point", "--dataset", sweep.dataset,
                    "--wandb-group", sweep.name, "--wandb", "online", "--out", f"runs/{sweep.name}",
                    "${args_no_boolean_flags}"],
        "parameters": parameters,
    }
