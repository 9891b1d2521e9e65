"""The end-to-end tanh CNNs that Tramèr & Boneh (ICLR 2021) compare the ScatterNet models against (the tempered
sigmoid CNNs of Papernot et al. 2021), with ``--norm`` after each convolution like the other models.

- MNIST: conv 1->16 (8x8, stride 2), max-pool 2 (stride 1), conv 16->32 (4x4, stride 2), max-pool 2 (stride 1),
  FC 512->32->10: about 26k parameters.
- CIFAR-10: three stages of two 3x3 convolutions (32, 64, 128 channels) each followed by a max-pool 2, then FC
  2048->128->10: about 550k parameters.
"""
from __future__ import annotations

from torch import nn

from dp_layers import make_norm
from src.models.layers import ACTIVATIONS, Standardize, conv


def _mnist_layers(norm: str, act, ws: bool) -> tuple:
    """The layers before the classifier, and the width of the last one."""
    return [conv(1, 16, 8, stride=2, padding=3, ws=ws), make_norm(norm, 16), act(), nn.MaxPool2d(2, 1),
            conv(16, 32, 4, stride=2, ws=ws), make_norm(norm, 32), act(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), act()], 32


def _cifar10_layers(norm: str, act, ws: bool) -> tuple:
    layers, channels = [], 3
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [conv(channels, width, 3, padding=1, ws=ws), make_norm(norm, width), act()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    return layers + [nn.Flatten(), nn.Linear(128 * 4 * 4, 128), act()], 128


LAYERS = {"mnist": _mnist_layers, "cifar10": _cifar10_layers}


class TanhCNN(nn.Module):
    """``standardize`` -> ``features`` (convolutions, norms, pools, the hidden FC layer) -> ``classifier``."""

    def __init__(self, dataset: str, *, norm: str, act: str, mean, std, num_classes: int = 10, ws: bool = False):
        super().__init__()
        self.standardize = Standardize(mean, std)
        layers, hidden = LAYERS[dataset](norm, ACTIVATIONS[act], ws)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.features(self.standardize(x)))


def build(spec, model_config) -> TanhCNN:
    return TanhCNN(spec.name, norm=model_config.norm, act=model_config.act, mean=spec.mean, std=spec.std,
                   num_classes=spec.num_classes, ws=model_config.ws)
