"""The two architectures of the study, built around one normalization factory (``dp_layers.make_norm``).

No in-place operations anywhere: Opacus's backward hooks need the activations they captured intact,
which is why torchvision's own resnet18 (in-place residual add) fails under them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from dp_layers import make_norm
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a (projected when needed) shortcut; the residual add is out of place."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, norm: str, act: str, ws: bool = False):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, ws=ws)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = ACTIVATIONS[act]()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False, ws=ws)
        self.norm2 = make_norm(norm, out_channels)
        self.act2 = ACTIVATIONS[act]()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False, ws=ws), make_norm(norm, out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 colour images (kuangliu/pytorch-cifar topology).

    3x3 stem without max-pool, four stages of two basic blocks (64, 128, 256, 512 channels), global
    average pooling and a linear classifier.
    """

    def __init__(self, *, norm: str, act: str, mean: Sequence[float], std: Sequence[float], num_classes: int = 10,
                 ws: bool = False):
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.stem = nn.Sequential(conv(3, 64, 3, padding=1, bias=False, ws=ws), make_norm(norm, 64),
                                  ACTIVATIONS[act]())
        stages, in_channels = [], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(
                BasicBlock(in_channels, out_channels, stride, norm=norm, act=act, ws=ws),
                BasicBlock(out_channels, out_channels, 1, norm=norm, act=act, ws=ws)))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(self.standardize(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
