"""AutoAttack (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"), standard version: APGD-CE, APGD-T, FAB-T and Square, each run on the examples the
previous ones left correctly classified. torchattacks' implementation, on the plain model in eval mode.

Its parts seed torch's global generator; the call runs inside ``fork_rng`` so that the run's own streams
(and a bit-for-bit resume) are untouched, with a seed drawn from the evaluation generator.
"""
from __future__ import annotations

from typing import Optional

import torch
import torchattacks

NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def autoattack(model, images: torch.Tensor, labels: torch.Tensor, *, norm: str, eps: float, n_classes: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adversarial versions of ``images`` within the ``norm`` ball of radius ``eps`` (pixels in [0, 1])."""
    if len(images) == 0:
        return images.detach().clone()
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=images.device).item())
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        attack = torchattacks.AutoAttack(model, norm=NORM_NAMES[norm], eps=eps, version="standard",
                                         n_classes=n_classes, seed=seed)
        return attack(images, labels).detach()
