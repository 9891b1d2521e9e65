"""Checkpoints: everything a run needs to continue exactly where it stopped (``--resume RUN_DIR``).

A checkpoint is taken at a logical-step boundary (the end of an epoch, and every ``--checkpoint-every``
steps) and holds the model, the optimizer, the accountant's history, every random stream (torch, numpy,
python, and the run's own generators: Poisson sampling, noise, attack), the step counters, the
partial epoch's running sums, the metrics and the summary so far, the run's seeds, and the size and
SHA-256 of the private training set and the public set (a resume on other data is refused: n and the
sample rate would change mid-run). It is written atomically over the previous one, so a failed write (a
full disk, a kill) leaves the last good checkpoint in place.

A checkpoint is secret material, like the data: its seeds and generator states replay the noise, and its
fingerprints test guesses about the training set. Nothing in it is released.

Resuming mid-epoch restores the sampling generator *after* the epoch's data-loader iterator exists (the
iterator draws a worker seed from the same generator, unused in single-process loading) and shortens the
sampler to the epoch's remaining steps, so the remaining batches are exactly those of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from src.errors import UserError
from src.atomic_files import atomic_torch_save
from src.run_directory import CHECKPOINT_FILE

FORMAT_VERSION = 2  # 2: seeds and the data's identity


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


def fingerprint(images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> str:
    """SHA-256 of a data set's shape, pixels and labels: equal only for the same examples in the same order."""
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(np.ascontiguousarray(images.cpu().numpy()).data)
    if labels is not None:
        digest.update(np.ascontiguousarray(labels.cpu().numpy()).data)
    return digest.hexdigest()


def data_identity(data) -> dict:
    """What a resumed run must find again: n and the fingerprints of the private, validation and public sets."""
    return {"n_train": len(data.train),
            "train_sha256": fingerprint(data.train.images, data.train.labels),
            "val_sha256": fingerprint(data.val.images, data.val.labels) if data.val is not None else None,
            "public_sha256": fingerprint(data.public.images) if data.public is not None else None}


def require_same_data(checkpoint: dict, identity: dict, run_path: Path) -> None:
    """Refuse to resume on other data: n, the sample rate and what epsilon covers would change mid-run."""
    saved = checkpoint["data_identity"]
    if saved["n_train"] != identity["n_train"]:
        raise UserError(f"--resume: the private training set now has {identity['n_train']} examples, the run in "
                        f"{run_path} trained on {saved['n_train']}; resume with the same --data-root")
    for key, what in (("train_sha256", "private training set"), ("val_sha256", "validation set"),
                      ("public_sha256", "public set")):
        if saved[key] != identity[key]:
            raise UserError(f"--resume: the {what} differs from the one the run in {run_path} started with "
                            "(another --data-root or changed files); resume with the same data")


def rank_streams(generators: dict) -> dict:
    """This process's random streams: the global ones and the run's generators (each rank of a multi-process
    run has its own, ``src.distributed``)."""
    return {"rng": _global_rng_state(),
            "generators": {name: g.get_state() for name, g in generators.items() if g is not None},
            "device": _generator_device(generators)}


def _generator_device(generators: dict) -> str:
    """The device type of the run's device generators ('cpu' or 'cuda'): their states fit only that type."""
    kinds = {g.device.type for name, g in generators.items() if g is not None and name != "sampling"}
    return kinds.pop() if len(kinds) == 1 else "cpu"


def capture(*, model: torch.nn.Module, optimizer, history: list, generators: dict, position: Position,
            metrics: list, summary: dict, seeds: dict, data_identity: dict, ema=None,
            streams_by_rank: Optional[list] = None) -> dict:
    """The checkpoint as a plain dict of tensors and Python values (loadable with ``weights_only=True``);
    ``ema``: the --ema average of the weights (torch's AveragedModel), with its update count; ``streams_by_rank``:
    every rank's streams in a multi-process run (``rank_streams`` of each, in rank order), whose number is
    the world size a resume must have."""
    streams = streams_by_rank or [rank_streams(generators)]
    return {"version": FORMAT_VERSION,
            "world_size": len(streams),
            "ranks": streams,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "accountant_history": [tuple(entry) for entry in history],
            "rng": streams[0]["rng"],  # rank 0's, where readers of one-process checkpoints look
            "generators": streams[0]["generators"],
            "position": {"epoch": position.epoch, "step": position.step,
                         "partial": asdict(position.partial) if position.partial else None},
            "metrics": list(metrics),
            "summary": dict(summary),
            "seeds": dict(seeds),
            "data_identity": dict(data_identity)}


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
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UserError(f"cannot read {path}: {type(error).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a checkpoint this version can resume (format {FORMAT_VERSION})")
    return checkpoint


def position_of(checkpoint: dict) -> Position:
    p = checkpoint["position"]
    return Position(epoch=p["epoch"], step=p["step"],
                    partial=EpochProgress(**p["partial"]) if p["partial"] else None)


def streams_of(checkpoint: dict, rank: int = 0) -> dict:
    """Rank ``rank``'s random streams (``rank_streams``) in a checkpoint (checkpoints written before
    multi-process runs hold one process's, at the top level)."""
    if "ranks" in checkpoint:
        return checkpoint["ranks"][rank]
    return {"rng": checkpoint["rng"], "generators": checkpoint["generators"], "device": None}


def require_resumable_here(checkpoint: dict, world_size: int, generators: dict, run_path: Path) -> None:
    """Refuse a resume with another number of processes (each rank's sampling stream and shard would change)
    or on another kind of device (a CUDA generator's state does not fit a CPU one, so the noise could not
    continue its stream)."""
    saved = checkpoint.get("world_size", 1)
    if saved != world_size:
        raise UserError(f"--resume: the run in {run_path} trained with {saved} process(es), this resume has "
                        f"{world_size}; resume with the same torchrun --nproc_per_node x --nnodes")
    device = streams_of(checkpoint)["device"]
    here = _generator_device(generators)
    if device is not None and device != here:
        raise UserError(f"--resume: the run in {run_path} trained on {device} and its random streams continue "
                        f"only there; resume with --device {device} (its model.pt loads on any device)")


def restore(checkpoint: dict, *, model: torch.nn.Module, optimizer, accountant, generators: dict,
            ema=None, rank: int = 0) -> None:
    """Put model (and its --ema average), optimizer, accountant and the global random streams back. The run's
    generators (``rank``'s own) are restored here too except sampling mid-epoch (see ``resumed_sampling``)."""
    model.load_state_dict(checkpoint["model"])
    if ema is not None:
        ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if accountant is not None:
        accountant.history = [tuple(entry) for entry in checkpoint["accountant_history"]]
    streams = streams_of(checkpoint, rank)
    _restore_global_rng(streams["rng"])
    for name, generator in generators.items():
        if generator is not None and name in streams["generators"]:
            generator.set_state(streams["generators"][name])


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
