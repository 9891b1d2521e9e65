"""``--ema DECAY``: an exponential moving average of the weights, evaluated beside the trained model (De et
al. 2022 average the weights of their DP models this way).

The average is computed from the weights after each step, which are already the DP output, so it is
post-processing and costs no privacy. It is torch's ``AveragedModel`` over a fresh copy of the model (a deep
copy of the training model would copy Opacus's hooks with it), with the decay warmed up as TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` does, min(DECAY, (1 + t) / (10 + t)) at update t, so that a run
of a few hundred steps is not an average dominated by its first weights.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim.swa_utils import AveragedModel


def warmed_up_ema(decay: float) -> Callable:
    """AveragedModel's ``multi_avg_fn``: ema <- d ema + (1 - d) w with d = min(decay, (1 + t) / (10 + t))."""

    @torch.no_grad()
    def update(averaged: list, current: list, updates: torch.Tensor) -> None:
        t = int(updates)
        d = min(decay, (1 + t) / (10 + t))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


def weight_average(fresh_model: torch.nn.Module, decay: Optional[float]) -> Optional[AveragedModel]:
    """The EMA of the weights in ``fresh_model`` (a new model of the same architecture, on the training
    device), or None without ``--ema`` (or with ``--ema 0``). Buffers are not averaged: public BatchNorm
    statistics are recomputed for the averaged weights before it is evaluated."""
    if not decay:
        return None
    for param in fresh_model.parameters():
        param.requires_grad_(False)
    return AveragedModel(fresh_model, multi_avg_fn=warmed_up_ema(decay), use_buffers=False)
