"""The building blocks every model family shares: activations, (weight-standardized) convolutions and the input
scaling kept inside the model.

No in-place operations anywhere: Opacus's backward hooks need the activations they captured intact.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dp_layers.weight_standardization import WSConv2d

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def conv(*args, ws: bool = False, **kwargs) -> nn.Conv2d:
    """A convolution, weight-standardized with ``ws`` (``--ws``; Qiao et al. 2019, De et al. 2022)."""
    return (WSConv2d if ws else nn.Conv2d)(*args, **kwargs)


class Standardize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so inputs and attacks stay in [0, 1] pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
