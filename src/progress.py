"""What a training run shows while it computes: examples per second at the physical-batch level, the time
an epoch and the whole run will take, and a heartbeat while a long batch or an evaluation computes.

A logical batch of DP-SGD is split into physical batches (Opacus's BatchMemoryManager), and on a CPU one
logical batch of the CIFAR-10 recipe (4096 examples, 4 views each) takes many minutes: a bar that counts
optimizer steps sits at 0 for that long. This bar counts examples as each physical batch finishes. On a
terminal it is tqdm's live bar; when the output goes to a file (tqdm then hides itself) a log line is written
at least every ``log_every`` seconds instead, so a log shows that the run is alive and how far it is.

Nothing shown is the count the sampler drew: a Poisson batch's size is a count over the private set (under
add/remove adjacency one example changes it), which is why Opacus averages over the *expected* batch size. The
bar advances by the nominal size of each physical batch, capped at the expected size of its logical batch, and
snaps to finished steps x expected size at every step. What remains visible is when each physical batch ends,
a timing side channel like the wall time per epoch that metrics.jsonl already records: epsilon covers neither.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

from tqdm import tqdm

# The estimate is printed after this many physical batches (the first one includes one-off warm-up costs).
ESTIMATE_AFTER_BATCHES = 3
# ... or after this many seconds, if the batches are slower than that.
ESTIMATE_AFTER_SECONDS = 120.0
# A whole run estimated longer than this on a CPU gets a note naming the faster options.
SLOW_RUN_SECONDS = 2 * 3600.0
# What makes a slow run fast, in the words of the flags.
FASTER_OPTIONS = ("--device cuda on a machine with a GPU",
                  "--model scatternet-linear or scatternet-cnn (fixed scattering features and a small trained head: "
                  "minutes per epoch on a CPU)",
                  "--augmult 1 (each view is a forward and backward pass)", "fewer --epochs")


def duration(seconds: float) -> str:
    """A duration as a person reads it: 45s, 12m, 3h05m, 2d04h."""
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s" if minutes < 10 else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _speed(rate: float) -> str:
    return f"{rate:.3g}" if rate < 1000 else f"{rate:,.0f}"


@dataclass
class RunShape:
    """What the estimates extrapolate to: the epochs of the run and the examples one epoch draws on this
    process (the Poisson schedule's expected count, split over the processes of a multi-process run)."""

    epochs: int
    examples_per_epoch: float
    device: str = "cpu"


def is_terminal(stream) -> bool:
    """A terminal redraws a bar in place; in a file or a pipe each redraw would be another line."""
    return hasattr(stream, "isatty") and stream.isatty()


class TrainingProgress:
    """The progress of one run's training, epoch after epoch (one object per run, so the measured speed
    carries over from epoch to epoch and an estimate is printed once)."""

    def __init__(self, shape: RunShape, *, enabled: bool = True, stream: Optional[TextIO] = None,
                 out: Optional[TextIO] = None, log_every: float = 60.0, live: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.shape = shape
        self.enabled = enabled
        self.stream = stream or sys.stderr  # the bar and the log lines, like tqdm's
        self.out = out or sys.stdout  # the estimate, beside the run line and the epoch lines
        self.log_every = log_every
        # live: a terminal shows tqdm's bar; otherwise (a file, a pipe) log lines every log_every seconds
        self.live = is_terminal(self.stream) if live is None else live
        self.clock = clock
        self.epoch = 0
        self.done = 0.0  # examples this epoch
        self.phase = "starting"
        self.estimated = False
        self._bar: Optional[tqdm] = None
        self._lock = threading.Lock()
        self._last_line = clock()
        self._phase_started = clock()
        self._timed_examples = 0.0  # examples in the timed batches (after the first one of the run)
        self._timed_seconds = 0.0
        self._batches = 0
        self._batch_started: Optional[float] = None
        self._run_started = clock()

    # -- the training loop's calls ------------------------------------------------------------------------

    @contextlib.contextmanager
    def epoch_of(self, epoch: int, done_examples: float = 0.0):
        """While epoch ``epoch`` trains (``done_examples`` already drawn, for a resumed epoch)."""
        with self._lock:
            self.epoch, self.done, self.phase = epoch, done_examples, "training"
            self._phase_started = self._batch_started = self.clock()
            if self.enabled and self.live:
                self._bar = tqdm(total=round(self.shape.examples_per_epoch), initial=round(done_examples),
                                 desc=f"epoch {epoch}/{self.shape.epochs}", unit="img",
                                 leave=False, dynamic_ncols=True, file=self.stream, smoothing=0.1)
        try:
            yield self
        finally:
            with self._lock:
                if self._bar is not None:
                    self._bar.close()
                self._bar = None
                self.phase = "between epochs"

    def at(self, done_examples: float) -> None:
        """The epoch is ``done_examples`` in (nominal: finished steps x the expected batch size)."""
        with self._lock:
            if self._bar is not None:
                self._bar.update(round(done_examples) - self._bar.n)
            self.done = done_examples

    def physical_batch(self, examples: float) -> None:
        """A physical batch of ``examples`` (nominal, never the sampled count) finished its forward and backward
        passes."""
        with self._lock:
            now = self.clock()
            elapsed = now - (self._batch_started if self._batch_started is not None else now)
            self._batch_started = now
            self._batches += 1
            self.done += examples
            if self._batches > 1 or elapsed >= ESTIMATE_AFTER_SECONDS:  # the run's first batch warms up
                self._timed_examples += examples
                self._timed_seconds += elapsed
            if self._bar is not None:
                self._bar.update(round(self.done) - self._bar.n)
            due = (self._batches >= ESTIMATE_AFTER_BATCHES + 1
                   or (self._timed_seconds > 0 and now - self._run_started >= ESTIMATE_AFTER_SECONDS))
            if not self.estimated and self._timed_seconds > 0 and due:
                self.estimated = True
                self._write(self.estimate_line(), self.out)

    def postfix(self, **values) -> None:
        """Extra fields on the live bar (``--unprotected-train-stats``' loss and accuracy)."""
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix(refresh=False, **values)

    @contextlib.contextmanager
    def evaluating(self, epoch: int):
        """While epoch ``epoch``'s model is evaluated (test, validation, robust accuracy)."""
        with self._lock:
            self.phase, self._phase_started = f"evaluating epoch {epoch}", self.clock()
        try:
            yield
        finally:
            with self._lock:
                self.phase = "between epochs"

    # -- what is shown ---------------------------------------------------------------------------------------

    @property
    def rate(self) -> Optional[float]:
        """Examples per second over the timed batches (None before the first one)."""
        return self._timed_examples / self._timed_seconds if self._timed_seconds > 0 else None

    def seconds_per_epoch(self) -> float:
        rate = self.rate
        return self.shape.examples_per_epoch / rate if rate else math.inf

    def remaining_seconds(self) -> float:
        """Training time left in the run: the rest of this epoch and the epochs after it (evaluation excluded)."""
        rate = self.rate
        if not rate:
            return math.inf
        left_this_epoch = max(0.0, self.shape.examples_per_epoch - self.done)
        return (left_this_epoch + (self.shape.epochs - self.epoch) * self.shape.examples_per_epoch) / rate

    def estimate_line(self) -> str:
        """The one-line estimate printed after the first few physical batches, with a note when a CPU run
        would take hours."""
        per_epoch, whole = self.seconds_per_epoch(), self.seconds_per_epoch() * self.shape.epochs
        line = (f"estimate: {_speed(self.rate)} img/s on {self.shape.device}: about {duration(per_epoch)} per epoch, "
                f"{duration(whole)} for {self.shape.epochs} epoch(s) of training "
                f"({duration(self.remaining_seconds())} left; evaluations add to it)")
        if self.shape.device == "cpu" and whole > SLOW_RUN_SECONDS:
            line += "\nnote: that is long for a CPU; faster: " + "; ".join(FASTER_OPTIONS)
        return line

    def status_line(self) -> str:
        """One line for a log file: where the run is, its speed and what is left."""
        now = self.clock()
        if self.phase != "training":
            return f"{self.phase} for {duration(now - self._phase_started)}"
        total = self.shape.examples_per_epoch
        rate = self.rate
        speed = (f", {_speed(rate)} img/s, epoch ETA {duration(max(0.0, total - self.done) / rate)}, "
                 f"run ETA {duration(self.remaining_seconds())}") if rate else ""
        batch = (f", current physical batch running for {duration(now - self._batch_started)}"
                 if self._batch_started is not None and now - self._batch_started >= self.log_every else "")
        return (f"epoch {self.epoch}/{self.shape.epochs}: {self.done:.0f}/{total:.0f} images "
                f"({100 * min(1.0, self.done / total):.1f}%){speed}{batch}")

    def tick(self) -> None:
        """Called by the heartbeat: a log line when ``log_every`` seconds passed without one (files), or a
        redraw of the live bar so its clock moves during a long batch (terminals)."""
        with self._lock:
            now = self.clock()
            if self._bar is not None:
                self._bar.refresh()
            elif not self.live and now - self._last_line >= self.log_every:
                self._write(self.status_line(), self.stream)

    def _write(self, text: str, stream: TextIO) -> None:
        if not self.enabled:
            return
        self._last_line = self.clock()
        if self._bar is not None:
            self._bar.write(text, file=stream)  # clears the bar, writes, redraws it
        else:
            print(text, file=stream, flush=True)

    # -- the heartbeat ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def heartbeat(self, poll: float = 1.0):
        """A daemon thread calling ``tick`` every ``poll`` seconds while the block runs."""
        if not self.enabled:
            yield self
            return
        stopped = threading.Event()

        def beat():
            while not stopped.wait(poll):
                self.tick()

        thread = threading.Thread(target=beat, name="training-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stopped.set()
            thread.join(timeout=5)
