"""Checkpoints: everything a run needs to continue exactly where it stopped (``--resume RUN_DIR``).

A checkpoint is taken at a logical-step boundary (the end of an epoch, and every ``--checkpoint-every``
steps) and holds the model, the optimizer, the accountant's history, every random stream (torch, numpy,
python, and the run's own generators: Poisson sampling, noise, attack), the step counters, the
partial epoch's running sums, the metrics and the summary so far. It is written atomically over the
previous one, so a failed write (a full disk, a kill) leaves the last good checkpoint in place.

Resuming mid-epoch restores the sampling generator *after* the epoch's data-loader iterator exists (the
iterator draws a worker seed from the same generator, unused in single-process loading) and shortens the
sampler to the epoch's remaining steps, so the remaining batches are exactly those of an uninterrupted run.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from src.errors import UserError
from src.tracking import atomic_torch_save

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class EpochProgress:
    """Running sums of the epoch in progress (what its metrics row is computed from)."""

    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    examples: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.examples, 1)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.examples, 1)


@dataclass
class Position:
    """Where a run stands: ``epoch`` epochs completed, ``step`` optimizer steps taken in all, and the
    epoch in progress (``None`` at an epoch boundary)."""

    epoch: int = 0
    step: int = 0
    partial: Optional[EpochProgress] = None


def _global_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(*, model: torch.nn.Module, optimizer, history: list, generators: dict, position: Position,
            metrics: list, summary: dict) -> dict:
    """The checkpoint as a plain dict of tensors and Python values (loadable with ``weights_only=True``)."""
    return {"version": FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "accountant_history": [tuple(entry) for entry in history],
            "rng": _global_rng_state(),
            "generators": {name: g.get_state() for name, g in generators.items() if g is not None},
            "position": {"epoch": position.epoch, "step": position.step,
                         "partial": asdict(position.partial) if position.partial else None},
            "metrics": list(metrics),
            "summary": dict(summary)}


def save(run_path: Path, checkpoint: dict) -> None:
    atomic_torch_save(Path(run_path) / CHECKPOINT_FILE, checkpoint)


def load(run_path: Path) -> dict:
    path = Path(run_path) / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"{run_path} has no {CHECKPOINT_FILE} to resume from (it stopped before its first "
                        "checkpoint, or is not a run directory)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or corrupted: torch raises several types
        raise UserError(f"cannot read {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a checkpoint this version can resume (format {FORMAT_VERSION})")
    return checkpoint


def position_of(checkpoint: dict) -> Position:
    p = checkpoint["position"]
    return Position(epoch=p["epoch"], step=p["step"],
                    partial=EpochProgress(**p["partial"]) if p["partial"] else None)


def restore(checkpoint: dict, *, model: torch.nn.Module, optimizer, accountant, generators: dict) -> None:
    """Put model, optimizer, accountant and the global random streams back. The run's generators are
    restored here too except sampling mid-epoch (see ``resumed_sampling``)."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if accountant is not None:
        accountant.history = [tuple(entry) for entry in checkpoint["accountant_history"]]
    _restore_global_rng(checkpoint["rng"])
    for name, generator in generators.items():
        if generator is not None and name in checkpoint["generators"]:
            generator.set_state(checkpoint["generators"][name])


@contextmanager
def resumed_sampling(sampler, remaining_steps: int, generator_state: Optional[torch.Tensor]):
    """While an epoch's data-loader iterator starts: draw only ``remaining_steps`` batches, from
    ``generator_state``. Yields a callable to run right after the iterator is created."""
    full_steps = sampler.steps

    def after_iterator_created() -> None:
        if generator_state is not None:
            sampler.generator.set_state(generator_state)

    sampler.steps = remaining_steps
    try:
        yield after_iterator_created
    finally:
        sampler.steps = full_steps
