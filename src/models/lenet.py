"""LeNet-5, the MNIST model of the normalization study (the CS523 study's architecture)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dp_layers import make_norm
from src.models.layers import ACTIVATIONS, Standardize, conv


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 grey images: two 5x5 convolutions with pooling, then 120-84-classes.

    A normalization layer follows each convolution. tanh is the default activation: bounded activations
    keep gradient norms small and do better under clipping (Papernot et al. 2021).
    """

    def __init__(self, *, norm: str, act: str, mean: Sequence[float], std: Sequence[float], num_classes: int = 10,
                 ws: bool = False):
        super().__init__()
        activation = ACTIVATIONS[act]
        self.standardize = Standardize(mean, std)
        self.features = nn.Sequential(
            conv(1, 6, kernel_size=5, padding=2, ws=ws), make_norm(norm, 6), activation(), nn.MaxPool2d(2),
            conv(6, 16, kernel_size=5, ws=ws), make_norm(norm, 16), activation(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), activation(),
            nn.Linear(120, 84), activation(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.standardize(x)))


def build(spec, model_config) -> LeNet5:
    return LeNet5(norm=model_config.norm, act=model_config.act, mean=spec.mean, std=spec.std,
                  num_classes=spec.num_classes, ws=model_config.ws)
