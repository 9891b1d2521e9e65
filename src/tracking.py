"""Tracking a run: wandb, the run's outcome (status and reason), its id and code version.

The files of a run directory are ``src.run_directory``; atomic writes are ``src.atomic_files``. wandb is
imported only when enabled, and a wandb failure never costs the run its files.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from src.atomic_files import json_safe
from src.errors import TrainingStopped, UserError, WriteFailed

log = logging.getLogger(__name__)


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


@contextmanager
def recording_outcome(summary):
    """Set the summary's ``status`` (and ``reason``) from how the block ends: finished, a clean stop
    (TrainingStopped), interrupted, or failed (re-raised). The caller writes the summary in its ``finally``."""
    try:
        yield
        summary.status = "finished"
    except TrainingStopped as stop:
        summary.update(status=stop.status, reason=stop.reason)
        if stop.status != "interrupted":  # a stop on request is no error: the outcome line says how to resume
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

    def finish(self, summary, exit_code: int) -> None:
        """Copy the run's summary (``src.summary``) into wandb's and close the run."""
        if self._run is not None:
            for key, value in json_safe(summary.to_dict()).items():
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
