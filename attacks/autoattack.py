"""AutoAttack (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"), assembled from torchattacks' parts with the paper's budgets.

- ``autoattack``, the standard version: APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), each 100
  iterations and one restart, then Square with 5000 queries; each attack runs on the examples the previous ones
  left correctly classified.
- ``apgd``: its first two attacks only, APGD-CE then APGD-T. The paper finds these two account for almost all of
  the ensemble's reductions on models without gradient masking; FAB-T and Square are there to catch masking.
  Each costs as many forward and backward passes as the paper's APGD, which is what a CPU affords for models
  whose every pass runs a scattering on the pixels; where it is used, the results say so.

Why not ``torchattacks.AutoAttack(version="standard")``: in torchattacks 3.5.1 it leaves APGD, APGD-T and FAB at
their class default of 10 iterations, a tenth of the paper's (its issue #196), which makes the evaluation weaker
than the AutoAttack it is named after.

Its parts seed torch's global generator; the call runs inside ``fork_rng`` so that the run's own streams
(and a bit-for-bit resume) are untouched, with a seed drawn from the evaluation generator.
"""
from __future__ import annotations

from typing import Optional

import torch
import torchattacks

from attacks.defaults import ENSEMBLES

NORM_NAMES = {"linf": "Linf", "l2": "L2"}
ITERATIONS = 100  # APGD-CE, APGD-T and FAB-T, per target class (Croce and Hein 2020, standard version)
SQUARE_QUERIES = 5000


def ensemble(model, version: str, *, norm: str, eps: float, n_classes: int, seed: int) -> torchattacks.MultiAttack:
    """The attacks of ``version``, in the paper's order, with its budgets."""
    common = {"norm": NORM_NAMES[norm], "eps": eps, "seed": seed, "n_restarts": 1}
    attacks = [torchattacks.APGD(model, loss="ce", steps=ITERATIONS, **common),
               torchattacks.APGDT(model, steps=ITERATIONS, n_classes=n_classes, **common)]
    if version == "autoattack":
        attacks += [torchattacks.FAB(model, steps=ITERATIONS, multi_targeted=True, n_classes=n_classes, **common),
                    torchattacks.Square(model, n_queries=SQUARE_QUERIES, **common)]
    elif version != "apgd":
        raise ValueError(f"unknown AutoAttack version {version!r}; choose from {', '.join(ENSEMBLES)}")
    return torchattacks.MultiAttack(attacks)


def autoattack(model, images: torch.Tensor, labels: torch.Tensor, *, norm: str, eps: float, n_classes: int,
               generator: Optional[torch.Generator] = None, version: str = "autoattack") -> torch.Tensor:
    """Adversarial versions of ``images`` within the ``norm`` ball of radius ``eps`` (pixels in [0, 1])."""
    if len(images) == 0:
        return images.detach().clone()
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=images.device).item())
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        attack = ensemble(model, version, norm=norm, eps=eps, n_classes=n_classes, seed=seed)
        return attack(images, labels).detach()
