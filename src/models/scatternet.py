"""ScatterNet models (Tramèr & Boneh, "Differentially Private Learning Needs Better Features (or Much More Data)",
ICLR 2021): fixed wavelet scattering features, a normalization of the features, and a small trained head.

The scattering (Bruna & Mallat 2013) is a fixed cascade of wavelet filters and moduli, computed with kymatio's
``Scattering2D`` (J=2, L=8, order 2): 81 coefficients per input channel at a quarter of the resolution, so MNIST
gives 81x7x7 features and CIFAR-10 243x8x8. It has no parameters and holds no statistics of any data, so it costs
no privacy: only the head is trained under DP-SGD, and every engine sees an ordinary model whose trainable layers
are the head's. Under DP, such features with a linear head beat end-to-end CNNs at a fraction of the compute
(CIFAR-10 at epsilon 3: 67.0% with a linear head, 69.3% with the CNN head, against 59.2% end to end).

The model maps pixels in [0, 1] to logits (``scattering`` then ``head``), so attacks differentiate through the
scattering; ``scattering`` alone is what a feature cache stores.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from dp_layers.dp_bn import PrivateStandardize
from dp_layers.public_bn import PublicStandardize
from src.models.layers import Standardize

J, ORDERS, ANGLES = 2, 2, 8  # Tramèr & Boneh's scattering: scale 2^J = 4, order 2, 8 angles
COEFFICIENTS = 1 + J * ANGLES + ANGLES ** 2 * J * (J - 1) // 2  # 81 per input channel
# Input scaling before the scattering, as Tramèr & Boneh's: for CIFAR-10 the ImageNet mean and standard deviation
# (public values, not statistics of the private images); for MNIST MNIST's usual public values.
INPUT_SCALING = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
DEFAULT_GROUPS = 27  # GroupNorm of the features: 27 groups (Tramèr & Boneh), 9 channels each for CIFAR-10


def _scattering_module(image_size: tuple) -> nn.Module:
    """kymatio's 2-D torch frontend, imported by its own module path: ``kymatio.torch`` (the documented entry
    point) also imports the 3-D frontend, whose filter bank needs ``scipy.special.sph_harm``, which SciPy 1.17
    removed (kymatio 0.3.0 is the newest release). The 2-D transform never uses it; its module imports cleanly
    with any SciPy, so nothing is pinned back and nothing is patched (docs/models.md)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=image_size, L=ANGLES, max_order=ORDERS)


def _apply(transform: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return transform(x)


@functools.lru_cache(maxsize=None)
def compiled_apply():
    """``_apply`` through torch.compile, made once per process and shared by every scattering (a model's copies
    for the weight average among them: the module is an input of the graph, not a constant in it). Batch sizes
    vary under Poisson sampling, so the shapes are dynamic from the start rather than recompiled per size.

    Why: kymatio's transform is a few hundred small FFTs joined by elementwise products, moduli and
    periodizations, and those elementwise passes, not the FFTs, take most of its time on a CPU (a profile of
    256 CIFAR-10 images forward and backward: multiplications 41%, FFTs 22%, divisions 11%). Inductor fuses
    them; the FFTs stay the same calls, so the coefficients agree with kymatio's to float32 rounding."""
    return torch.compile(_apply, dynamic=True)


class Scattering(nn.Module):
    """Pixels in [0, 1] -> standardized -> scattering coefficients (B, C * 81, H / 4, W / 4). Fixed: no
    parameters; kymatio's filters are buffers, the same for every dataset of this image size.

    ``compiled``: passes that will be differentiated back to the pixels (attacks and robust training, where the
    scattering runs forward and backward at every step) go through ``compiled_apply``; the others (clean
    features, evaluation) stay eager, where compiling gains little and every grad mode would compile anew."""

    def __init__(self, channels: int, image_size: tuple, mean: Sequence[float], std: Sequence[float],
                 compiled: bool = False):
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.transform = _scattering_module(tuple(image_size))
        self.out_channels = channels * COEFFICIENTS
        self.out_size = tuple(s // 2 ** J for s in image_size)
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        differentiated = self.compiled and torch.is_grad_enabled() and x.requires_grad
        coefficients = compiled_apply()(self.transform, x) if differentiated else self.transform(x)
        return coefficients.flatten(1, 2)  # (B, C, 81, H/4, W/4) -> (B, C * 81, H/4, W/4)

    @property
    def out_shape(self) -> tuple:
        return (self.out_channels, *self.out_size)

    def description(self) -> str:
        """Everything its output depends on besides the image: what keys a feature cache (src.feature_cache)."""
        import kymatio

        return (f"kymatio {kymatio.__version__} Scattering2D J={J} L={ANGLES} order {ORDERS}; input (x - "
                f"{self.standardize.mean.flatten().tolist()}) / {self.standardize.std.flatten().tolist()}; "
                f"float32 {self.out_shape}")


def feature_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """The normalization of the features: per example, from public data only, or with statistics released once
    under DP (``bn-dp``, dp_layers.dp_bn); no trained parameters (as Tramèr & Boneh's)."""
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        if channels % groups:
            raise ValueError(f"--norm-groups {groups} does not divide the {channels} scattering channels")
        return nn.GroupNorm(groups, channels, affine=False)
    if kind == "bn-public":
        return PublicStandardize(channels)  # frozen statistics of the public images' features
    if kind == "bn-dp":
        return PrivateStandardize(channels)  # frozen statistics estimated from the private features under DP
    raise ValueError(f"--norm {kind} has no form for scattering features")


def linear_head(features: tuple, num_classes: int) -> nn.Module:
    """A linear classifier of the flattened features."""
    channels, height, width = features
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes))


def cnn_head(features: tuple, num_classes: int) -> nn.Module:
    """Tramèr & Boneh's small tanh CNN on the features: for MNIST's 81x7x7 conv 81->16 (3x3, stride 2), conv
    16->32 (3x3), FC 512->32->10 (33k parameters); for CIFAR-10's 243x8x8 conv 243->64 (3x3), max-pool 2, conv
    64->64 (3x3), FC 1024->10 (187k parameters)."""
    channels, height, width = features
    if channels == COEFFICIENTS:  # one input channel: MNIST
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(),
            nn.Flatten(), nn.Linear(32 * ((height + 1) // 2) * ((width + 1) // 2), 32), nn.Tanh(),
            nn.Linear(32, num_classes))
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(64 * (height // 2) * (width // 2), num_classes))


class ScatterNet(nn.Module):
    """``scattering`` (fixed) -> ``norm`` of the features -> ``head`` (trained).

    It takes pixels, or the scattering's output computed earlier (a batch shaped ``scattering.out_shape``, which
    no image is): clean training on cached features and attacks on pixels go through the same model, so its
    engine, weight average, checkpoint and saved weights are one."""

    # ``norm`` sees the fixed scattering's output only: statistics of public features computed once stay exact
    # (src.loop.public_refresher)
    normalizes_fixed_features = True

    def __init__(self, scattering: Scattering, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.scattering, self.norm, self.head = scattering, norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x if tuple(x.shape[1:]) == self.scattering.out_shape else self.scattering(x)
        return self.head(self.norm(features))


HEADS = {"scatternet-linear": linear_head, "scatternet-cnn": cnn_head}


def build(spec, model_config) -> ScatterNet:
    mean, std = INPUT_SCALING.get(spec.name, (spec.mean, spec.std))
    scattering = Scattering(spec.image_shape[0], spec.image_shape[1:], mean, std, model_config.compile_scattering)
    norm = feature_norm(model_config.norm, scattering.out_channels, model_config.norm_groups or DEFAULT_GROUPS)
    return ScatterNet(scattering, norm, HEADS[model_config.model](scattering.out_shape, spec.num_classes))
