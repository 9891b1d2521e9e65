"""Data augmentation for DP training, on batched tensors on the training device (De et al. 2022, "Unlocking
high-accuracy differentially private image classification through scale"): a random crop of the padded
image (a shift of up to ``padding`` pixels) and, for CIFAR-10, a random horizontal flip.

Augmentation only transforms an example that was already sampled, so it is part of the per-example
computation and costs no privacy. Every draw comes from the run's own seeded generator (checkpointed), so a
resumed run augments exactly as an uninterrupted one would. ``AugmentedViews`` makes the K views of
augmentation multiplicity (``--augmult``, ``dp_layers.augmult``): example-major rows, each view drawn anew.
``FeatureViews`` lays out views computed in advance (``--mirror-views``' cached features) the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from src.dataset_spec import Augmentation


def augment(images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Each row shifted by a random crop of its reflect-padded image (and flipped with probability 1/2 when
    the augmentation flips); pixel values are only moved, never mixed."""
    b, c, h, w = images.shape
    p = augmentation.padding
    device = images.device
    padded = F.pad(images, (p, p, p, p), mode="reflect") if p else images
    shifts = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=device)
    rows = (shifts[0, :, None] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (shifts[1, :, None] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    if augmentation.flip:
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


@dataclass
class AugmentedViews:
    """A physical batch of B examples as the B*K rows the model trains on: K augmented views of each example,
    example-major (rows i*K .. i*K+K-1 are example i's), labels repeated to match."""

    augmentation: Augmentation
    views: int
    generator: torch.Generator

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        if self.views > 1:
            images, labels = images.repeat_interleave(self.views, dim=0), labels.repeat_interleave(self.views)
        return augment(images, self.augmentation, self.generator), labels


@dataclass
class FeatureViews:
    """A physical batch of B examples whose K views were computed in advance (features shaped (B, K, ...), from a
    ``FeatureTensorDataset`` with ``views`` K), as the B*K example-major rows ``AugmentedViews`` gives."""

    views: int

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> tuple:
        return features.flatten(0, 1), labels.repeat_interleave(self.views)
