"""A run directory, ``<out>/<run id>/``: the one place that knows its files, for writing and for reading.

    config.json      every resolved setting, the privacy plan, data notes, git commit (written once)
    metrics.jsonl    one row per epoch (rewritten whole, atomically, so never half a line)
    summary.json     status, reason and the final numbers; exists from the first moment as ``running``
    model.pt         the plain ``state_dict`` of the last finished epoch
    model_ema.pt     with --ema, the average of the weights at that epoch (post-processing of model.pt's steps)
    checkpoint.pt    everything a resume needs (``src.checkpoint``); secret material, never released

Training writes it; ``--resume``, ``--eval-only``/``--transfer-from``, the sweep runner, ``experiments.collect``
and the figures read it through the same class. Importing this module does not import torch (the sweep
runner and collect stay light); loading a model does.
"""
from __future__ import annotations

import json
from pathlib import Path

from src.atomic_files import atomic_torch_save, atomic_write_json, atomic_write_text, json_safe
from src.errors import UserError
from src.summary import RunSummary

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
MODEL_EMA_FILE = "model_ema.pt"  # --ema: the average of the weights, evaluated beside model.pt
CHECKPOINT_FILE = "checkpoint.pt"


class RunDirectory:
    """``<out>/<run id>/``: created exclusively, never overwriting an existing run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics: list = []

    @classmethod
    def create(cls, out: str, run_id: str) -> "RunDirectory":
        root = Path(out)
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / run_id).mkdir()
        except FileExistsError:
            raise UserError(f"run directory {root / run_id} already exists; choose another --run-id") from None
        except OSError as error:
            raise UserError(f"cannot create run directory under {root}: {error.strerror or error}") from None
        return cls(root / run_id)

    @property
    def run_id(self) -> str:
        return self.path.name

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.path / CONFIG_FILE, config)

    def append_metrics(self, row: dict) -> None:
        """Rewrite metrics.jsonl whole, atomically: a crash mid-write can never leave half a line."""
        self.metrics.append(json_safe(row))
        self.rewrite_metrics()

    def rewrite_metrics(self) -> None:
        atomic_write_text(self.path / METRICS_FILE,
                          "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.metrics))

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.path / SUMMARY_FILE, summary.to_dict())

    def save_model(self, state_dict: dict, averaged: bool = False) -> None:
        atomic_torch_save(self.path / (MODEL_EMA_FILE if averaged else MODEL_FILE), state_dict)

    # Reading. Missing files raise FileNotFoundError and unreadable ones ValueError/OSError, as the callers
    # turn them into their own one-line messages.

    def read_config(self) -> dict:
        return json.loads((self.path / CONFIG_FILE).read_text())

    def trained_dataset(self) -> str:
        """The dataset the run trained on, from its config.json (``--eval-only RUN`` needs no ``--dataset``)."""
        try:
            dataset = self.read_config().get("data", {}).get("dataset")
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a finished run directory: {CONFIG_FILE} is missing") from None
        except (OSError, ValueError, AttributeError) as error:
            raise UserError(f"cannot read {self.path / CONFIG_FILE}: {type(error).__name__}: {error}") from None
        if not dataset:
            raise UserError(f"{self.path / CONFIG_FILE} does not name the dataset the run trained on")
        return dataset

    def read_summary(self) -> RunSummary:
        return RunSummary.from_dict(json.loads((self.path / SUMMARY_FILE).read_text()))

    def read_metrics(self) -> list:
        """The per-epoch rows written so far ([] before the first epoch ends)."""
        path = self.path / METRICS_FILE
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def status(self) -> str:
        """'missing' (no directory), the status in summary.json, or 'unreadable'."""
        if not self.path.exists():
            return "missing"
        try:
            return self.read_summary().status
        except (OSError, ValueError):
            return "unreadable"

    def is_run(self) -> bool:
        """Whether this folder holds a run (config.json and summary.json), not a log folder or a stray file."""
        return (self.path / CONFIG_FILE).exists() and (self.path / SUMMARY_FILE).exists()

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT_FILE).is_file()

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    def load_model_state(self, map_location=None, averaged: bool = False) -> dict:
        import torch

        return torch.load(self.path / (MODEL_EMA_FILE if averaged else MODEL_FILE), map_location=map_location,
                          weights_only=True)


class FollowerRunDirectory(RunDirectory):
    """The run directory as a rank other than 0 of a multi-process run sees it (``src.distributed``): the same
    path and metrics in memory, and no writes, since rank 0 alone writes the run's files."""

    def write_config(self, config: dict) -> None:
        pass

    def rewrite_metrics(self) -> None:
        pass

    def write_summary(self, summary: RunSummary) -> None:
        pass

    def save_model(self, state_dict: dict, averaged: bool = False) -> None:
        pass


def runs_in(folder, *, attempts: bool = False) -> list:
    """The run directories in a sweep's folder, sorted by name: not its ``_logs`` folder or stray files, and not
    the set-aside ``<run id>.attempt-N`` folders unless ``attempts`` (their run time still counts)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [RunDirectory(path) for path in sorted(folder.iterdir())
                  if path.is_dir() and not path.name.startswith("_") and (attempts or ".attempt-" not in path.name)]
    return [run for run in candidates if run.is_run()]
