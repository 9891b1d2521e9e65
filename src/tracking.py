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


# The dashboard's names, declared once: each flat key of a metrics.jsonl row -> its wandb key. The prefix is the
# workspace section (wandb groups panels by it); metrics.jsonl keeps the flat keys. A key of the averaged weights
# ("test_acc_ema") follows its base key ("test/acc_ema"); a key not listed keeps its flat name.
WANDB_KEYS = {
    "epoch": "progress/epoch", "step": "progress/step",
    "epsilon": "privacy/epsilon",
    "test_acc": "test/acc", "test_loss": "test/loss",
    "val_acc": "val/acc", "val_loss": "val/loss",
    "robust_acc": "robust/acc",
    "seconds": "time/epoch_seconds", "train_seconds": "time/train_seconds",
    # released only with --unprotected-train-stats, in a section whose name says that epsilon does not cover them
    "train_loss_unprotected": "unprotected/train_loss", "train_acc_unprotected": "unprotected/train_acc",
}
EPSILON_KEY = WANDB_KEYS["epsilon"]
EPOCH_KEY = WANDB_KEYS["epoch"]
# The sections drawn against the privacy spent (the study's question: accuracy against epsilon); a run without
# an epsilon (non-private) draws them against the epoch instead.
AGAINST_EPSILON = ("test/*", "val/*", "robust/*")
AVERAGED_SUFFIX = "_ema"


def wandb_key(key: str) -> str:
    """The wandb name of a metrics.jsonl key (``WANDB_KEYS``)."""
    if key in WANDB_KEYS:
        return WANDB_KEYS[key]
    if key.endswith(AVERAGED_SUFFIX) and key[:-len(AVERAGED_SUFFIX)] in WANDB_KEYS:
        return WANDB_KEYS[key[:-len(AVERAGED_SUFFIX)]] + AVERAGED_SUFFIX
    return key


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class WandbRun:
    """wandb logging (offline by default, never prompting); a no-op when disabled or once wandb fails (a warning,
    recorded in ``error``): tracking never takes a run, or a study, down with it.

    Rows are logged under ``WANDB_KEYS``'s sectioned names, with the accuracy sections declared against
    ``privacy/epsilon`` (``wandb.define_metric``), so a run's charts and a group's workspace show accuracy against
    the privacy spent. Only what the row holds is logged."""

    def __init__(self, run=None, error: Optional[str] = None):
        self._run = run
        self.error = error
        self._axes_declared = False

    @classmethod
    def start(cls, *, mode: str, project: str, group: Optional[str], run_dir: Path, run_id: str,
              config: dict, tags: list, job_type: Optional[str] = None) -> "WandbRun":
        if mode == "disabled":
            return cls()
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            run = wandb.init(mode=mode, project=project, group=group, name=run_id, dir=str(run_dir),
                             config=config, tags=tags, job_type=job_type, reinit="finish_previous",
                             settings=wandb.Settings(console="off", silent=True))
            return cls(run)
        except Exception as error:  # tracking must never take the run down with it
            log.warning("wandb could not start (%s); the run directory still records everything", _first_line(error))
            return cls(error=_first_line(error))

    @contextmanager
    def _guarded(self, action: str):
        """A wandb call that fails (its service gone, a full disk) ends the tracking with a warning, not the run."""
        try:
            yield
        except Exception as error:
            self.error = f"{action}: {_first_line(error)}"
            log.warning("wandb failed to %s (%s); tracking stops, the run directory still records everything",
                        action, _first_line(error))
            self._run = None

    def _declare_axes(self, entry: dict) -> None:
        """On the first row: the accuracy sections against epsilon, or against the epoch when the run has no
        epsilon (non-private: json_safe made its infinity null); a row with neither (--eval-only) keeps wandb's
        step."""
        self._axes_declared = True
        axis = EPSILON_KEY if entry.get(EPSILON_KEY) is not None else EPOCH_KEY if EPOCH_KEY in entry else None
        if axis is None:
            return
        self._run.define_metric(axis)
        for section in AGAINST_EPSILON:
            self._run.define_metric(section, step_metric=axis)

    def log(self, row: dict, step: int) -> None:
        """One metrics.jsonl row, under its wandb names, at the optimizer step."""
        if self._run is None:
            return
        entry = {wandb_key(key): value for key, value in json_safe(row).items()}
        with self._guarded("log"):
            if not self._axes_declared:
                self._declare_axes(entry)
            self._run.log(entry, step=step)

    def log_media(self, items: dict) -> None:
        """wandb objects (``wandb.Image``, ``wandb.Table``, charts) under the keys given, at the next step."""
        if self._run is not None:
            with self._guarded("log media"):
                self._run.log(items)

    def finish(self, summary=None, exit_code: int = 0) -> None:
        """Copy the run's summary (``src.summary``; flat keys), if any, into wandb's and close the run."""
        if self._run is not None:
            with self._guarded("finish"):
                for key, value in json_safe(summary.to_dict() if summary is not None else {}).items():
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
