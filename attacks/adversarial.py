"""Adversarial training batches: each physical batch is attacked against the current weights before the
usual per-sample clipping and noise, so the Poisson batch and the accounting are those of clean training."""
from __future__ import annotations

from typing import Optional

import torch

from attacks.isolation import attack_view
from attacks.pgd import AttackSpec, perturb


class AdversarialBatches:
    """``batches(model, images, labels)`` -> the inputs to train on.

    Each example is independently replaced by its adversarial version with probability ``ratio``
    (``--adv-ratio``; 1.0 replaces all). The draw depends on nothing but the generator, and each
    adversarial input on its own example, the weights and the public statistics (``attacks.pgd``).
    """

    def __init__(self, spec: AttackSpec, ratio: float, generator: Optional[torch.Generator] = None):
        self.spec, self.ratio, self.generator = spec, ratio, generator

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if len(images) == 0 or self.ratio <= 0:
            return images
        with attack_view(model) as plain:
            if self.ratio >= 1:
                return perturb(plain, images, labels, self.spec, generator=self.generator)
            chosen = torch.rand(len(images), generator=self.generator, device=images.device) < self.ratio
            mixed = images.clone()
            if chosen.any():
                mixed[chosen] = perturb(plain, images[chosen], labels[chosen], self.spec, generator=self.generator)
            return mixed
