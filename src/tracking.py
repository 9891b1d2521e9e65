"""Run directories and wandb.

A run directory holds config.json, metrics.jsonl, summary.json and model.pt. Every file is written
atomically (temporary file in the same folder, fsync, rename), and summary.json exists from the first
moment with ``status: running``, so a run that dies leaves readable results up to its last epoch.
wandb is imported only when enabled, and a wandb failure never costs the run its files.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch

from src.errors import TrainingStopped, UserError, WriteFailed

log = logging.getLogger(__name__)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through ``write(file_object)`` into a temporary sibling, then rename over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteFailed):
            raise WriteFailed(f"cannot write {path}: {error.strerror or error}") from error
        raise


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null (the run's status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """Serialise in memory first, so a failing disk surfaces as an OSError from the file write itself."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def git_commit() -> Optional[str]:
    """The code version that produced a run (cifar10-airbench habit); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def new_run_id(config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    seed = f"-s{config.train.seed}" if config.train.seed is not None else ""
    return f"{config.data.dataset}-{config.privacy.engine}-{config.model.norm}{seed}-{stamp}-{uuid.uuid4().hex[:4]}"


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
        atomic_write_json(self.path / "config.json", config)

    def append_metrics(self, row: dict) -> None:
        """Rewrite metrics.jsonl whole, atomically: a crash mid-write can never leave half a line."""
        self.metrics.append(json_safe(row))
        self.rewrite_metrics()

    def rewrite_metrics(self) -> None:
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.metrics))

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def save_model(self, state_dict: dict) -> None:
        atomic_torch_save(self.path / "model.pt", state_dict)


@contextmanager
def recording_outcome(summary: dict):
    """Set ``summary["status"]`` (and ``reason``) from how the block ends: finished, a clean stop
    (TrainingStopped), interrupted, or failed (re-raised). The caller writes the summary in its ``finally``."""
    try:
        yield
        summary["status"] = "finished"
    except TrainingStopped as stop:
        summary.update(status=stop.status, reason=stop.reason)
        log.error("run stopped: %s", stop.reason)
    except WriteFailed as fault:  # a fault, not a bug: one line, no traceback, the last good files kept
        summary.update(status="failed", reason=str(fault))
        log.error("run failed: %s", fault)
    except KeyboardInterrupt:
        summary.update(status="interrupted", reason="interrupted by the user (KeyboardInterrupt)")
    except Exception as error:
        summary.update(status="failed", reason=f"{type(error).__name__}: {error}")
        raise


class WandbRun:
    """wandb logging (offline by default, never prompting); a no-op when disabled or if wandb fails."""

    def __init__(self, run=None, error: Optional[str] = None):
        self._run = run
        self.error = error

    @classmethod
    def start(cls, *, mode: str, project: str, group: Optional[str], run_dir: Path, run_id: str,
              config: dict, tags: list) -> "WandbRun":
        if mode == "disabled":
            return cls()
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            run = wandb.init(mode=mode, project=project, group=group, name=run_id, dir=str(run_dir),
                             config=config, tags=tags, reinit="finish_previous",
                             settings=wandb.Settings(console="off", silent=True))
            return cls(run)
        except Exception as error:  # tracking must never take the run down with it
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.warning("wandb could not start (%s); the run directory still records everything", message)
            return cls(error=message)

    def log(self, row: dict, step: int) -> None:
        if self._run is not None:
            self._run.log(json_safe(row), step=step)

    def finish(self, summary: dict, exit_code: int) -> None:
        if self._run is not None:
            for key, value in json_safe(summary).items():
                self._run.summary[key] = value
            self._run.finish(exit_code=exit_code)
            self._run = None

    @property
    def directory(self) -> Optional[str]:
        return None if self._run is None else str(Path(self._run.dir).parent)


def check_wandb_mode(mode: str) -> None:
    """``--wandb online`` must not prompt for a login: refuse up front when no credentials exist."""
    if mode != "online":
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise UserError("--wandb online needs credentials (WANDB_API_KEY or `wandb login`); "
                    "use --wandb offline and `wandb sync` later")
