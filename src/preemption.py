"""Stopping cleanly on SIGTERM (a cluster preempting the job) or SIGINT (Ctrl-C).

The first signal asks the run to stop: work that changes nothing yet (a physical batch's forward and backward
passes, an epoch's evaluation) is abandoned at once, in one process (``abortable``); an optimizer step in
progress is finished. The run checkpoints at the last finished optimizer step (a logical batch cut short is
dropped and redone on resume, with the random streams it had at its start; an evaluation cut short is redone),
marks itself ``interrupted`` with the signal's name, flushes wandb and exits with code 130. Its ``--resume``
then ends bit for bit where an uninterrupted run ends. With several processes the ranks only stop at a
logical-batch boundary, where they agree (a rank abandoning a batch alone would leave the others waiting).
A second signal exits at once (``os._exit``): every file is written atomically, so the last good checkpoint
stays.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from src.errors import TrainingStopped

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(TrainingStopped):
    """The run stopped on a signal, after checkpointing: ``--resume`` continues it."""

    def __init__(self, reason: str):
        super().__init__("interrupted", reason)


class StopNow(BaseException):
    """Raised by the signal handler inside an ``abortable`` section. A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way turns a stop into a failure."""


class StopSignals:
    """While active (a context manager in the main thread), SIGTERM and SIGINT set ``received`` instead of
    killing the process; a second one exits at once. Elsewhere (another thread) it does nothing."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}
        self._abortable = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_signal(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None:
            os.write(2, f"{name} again: exiting now; the last checkpoint stays\n".encode())
            os._exit(128 + number)
        self.received = name
        os.write(2, f"{name} received: checkpointing the last finished step and stopping (send it again to "
                    f"exit at once)\n".encode())
        if self._abortable:
            raise StopNow(name)

    @contextlib.contextmanager
    def abortable(self):
        """Work a stop may abandon at once (it changes no state a checkpoint holds). One process only."""
        if self.received is not None:
            raise StopNow(self.received)
        self._abortable = not dist.is_initialized()
        try:
            yield
        finally:
            self._abortable = False

    def requested(self) -> bool:
        """Whether to stop now. With several processes the ranks agree (a rank that got the signal stops them
        all at the same step, so no all-reduce is left waiting)."""
        asked = self.received is not None
        if dist.is_initialized():
            flag = torch.tensor([1 if asked else 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
            if asked and self.received is None:
                self.received = "a signal to another rank"
        return asked

    def reason(self, where: str) -> str:
        return f"{self.received} received: stopped {where}; continue with --resume"
