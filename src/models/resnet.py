"""ResNet-18 for 32x32 images, the CIFAR-10 model of the study (and of De et al. 2022's recipe with GroupNorm and
weight standardization).

torchvision's own resnet18 does its residual add in place, which breaks Opacus's backward hooks: this one adds
out of place.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from dp_layers import make_norm
from src.models.layers import ACTIVATIONS, Standardize, conv


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


def build(spec, model_config) -> ResNet18:
    return ResNet18(norm=model_config.norm, act=model_config.act, mean=spec.mean, std=spec.std,
                    num_classes=spec.num_classes, ws=model_config.ws)
