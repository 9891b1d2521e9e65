"""PGD (L-infinity and L2, random start, restarts) and FGSM with random start, in [0, 1] pixel space.

Every attack is a function of (model, images, labels, random start) only. The loss is the *sum* of the
per-example cross-entropies, so the gradient for example i is the gradient of example i's own loss: a
model without cross-example interaction (public-statistics BatchNorm, GroupNorm, ...) gives each example
an adversarial input that depends on that example, the weights and the public data alone. Gradients are
taken with ``torch.autograd.grad`` with respect to the input only; callers that attack a model being
trained wrap the call in ``attacks.isolation.attack_view`` so that no parameter gradient or per-sample
gradient state is formed.

The update and projection follow the standard formulation (Madry et al. 2018), written the way the
reference implementation in torchattacks writes it, so that with the random start off the two agree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from attacks.defaults import ENSEMBLES


_TINY = 1e-10  # keeps the L2 step finite where an input gradient is exactly zero (as torchattacks does)


@dataclass(frozen=True)
class AttackSpec:
    """One attack's settings; ``alpha`` is the step size (for fgsm-rs, the size of its single step)."""

    method: str = "pgd"
    norm: str = "linf"
    eps: float = 0.1
    alpha: float = 0.01
    steps: int = 10
    restarts: int = 1
    random_start: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.method == "autoattack":
            return f"AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) {self.norm} eps {self.eps:g}"
        if self.method == "apgd":
            return f"APGD-CE + APGD-T (AutoAttack's white-box pair) {self.norm} eps {self.eps:g}"
        if self.method == "fgsm-rs":
            return f"FGSM-RS linf eps {self.eps:g} (step {self.alpha:g})"
        restarts = f", {self.restarts} restarts" if self.restarts > 1 else ""
        return f"PGD-{self.steps} {self.norm} eps {self.eps:g} (step {self.alpha:g}{restarts})"


def per_example_losses(model, images: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(input gradient of the summed per-example losses, per-example losses, logits)."""
    images = images.detach().requires_grad_(True)
    logits = model(images)
    losses = F.cross_entropy(logits, labels, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), images)
    return grad, losses.detach(), logits.detach()


def random_start(images: torch.Tensor, spec: AttackSpec, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A perturbation drawn uniformly from the L-inf ball, or with a uniform radius in a random L2 direction."""
    if spec.norm == "linf":
        return (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * spec.eps
    direction = torch.randn(images.shape, generator=generator, device=images.device)
    norms = direction.flatten(1).norm(p=2, dim=1).clamp_min(_TINY)
    radius = torch.rand(len(images), generator=generator, device=images.device) * spec.eps
    return direction * _per_example(radius / norms, images)


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def project(adversarial: torch.Tensor, images: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Back into the eps-ball around ``images`` and into [0, 1]."""
    delta = adversarial - images
    if spec.norm == "linf":
        delta = torch.clamp(delta, min=-spec.eps, max=spec.eps)
    else:
        norms = delta.flatten(1).norm(p=2, dim=1)
        factor = torch.min(spec.eps / norms, torch.ones_like(norms))
        delta = delta * _per_example(factor, delta)
    return torch.clamp(images + delta, min=0, max=1)


def _ascent_step(adversarial: torch.Tensor, grad: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    if spec.norm == "linf":
        return adversarial + spec.alpha * grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1) + _TINY
    return adversarial + spec.alpha * (grad / _per_example(norms, grad))


def pgd_once(model, images: torch.Tensor, labels: torch.Tensor, spec: AttackSpec, *,
             start: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One PGD run. ``start`` fixes the random start (a perturbation); without it one is drawn when
    ``spec.random_start`` is on."""
    images = images.detach()
    adversarial = images.clone()
    if start is not None:
        adversarial = torch.clamp(images + start, min=0, max=1)
    elif spec.random_start:
        adversarial = torch.clamp(images + random_start(images, spec, generator), min=0, max=1)
    for _ in range(spec.steps):
        grad, _, _ = per_example_losses(model, adversarial, labels)
        adversarial = project(_ascent_step(adversarial.detach(), grad, spec), images, spec).detach()
    return adversarial


def fgsm_rs(model, images: torch.Tensor, labels: torch.Tensor, spec: AttackSpec, *,
            start: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FGSM from a uniform random start (Wong, Rice and Kolter 2020): one signed step of ``alpha``
    (they recommend 1.25 eps), projected back into the L-inf ball."""
    images = images.detach()
    delta = start if start is not None else random_start(images, spec, generator)
    adversarial = torch.clamp(images + delta, min=0, max=1)
    grad, _, _ = per_example_losses(model, adversarial, labels)
    return project(_ascent_step(adversarial, grad, spec), images, spec).detach()


def _worse(candidate: tuple, incumbent: tuple) -> torch.Tensor:
    """Per example: does the candidate (wrong, loss) beat the incumbent? Misclassified first, then loss."""
    cand_wrong, cand_loss = candidate
    inc_wrong, inc_loss = incumbent
    return (cand_wrong & ~inc_wrong) | ((cand_wrong == inc_wrong) & (cand_loss > inc_loss))


@torch.no_grad()
def _score(model, adversarial: torch.Tensor, labels: torch.Tensor) -> tuple:
    logits = model(adversarial)
    return logits.argmax(dim=1) != labels, F.cross_entropy(logits, labels, reduction="none")


def perturb(model, images: torch.Tensor, labels: torch.Tensor, spec: AttackSpec, *,
            generator: Optional[torch.Generator] = None, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attack ``spec`` describes; with restarts, the worst case per example (misclassified first, then
    the highest loss). An empty batch is returned as is."""
    if len(images) == 0:
        return images.detach().clone()
    if spec.method in ENSEMBLES:  # their own restarts and budgets (attacks.autoattack)
        from attacks.autoattack import autoattack

        with torch.no_grad():
            n_classes = model(images[:1]).shape[1]
        return autoattack(model, images, labels, norm=spec.norm, eps=spec.eps, n_classes=n_classes,
                          generator=generator, version=spec.method)
    attack = fgsm_rs if spec.method == "fgsm-rs" else pgd_once
    best = attack(model, images, labels, spec, start=start, generator=generator)
    if spec.restarts <= 1 or (not spec.random_start and spec.method == "pgd"):
        return best
    best_score = _score(model, best, labels)
    for _ in range(spec.restarts - 1):
        candidate = attack(model, images, labels, spec, generator=generator)
        score = _score(model, candidate, labels)
        take = _worse(score, best_score)
        best = torch.where(_per_example(take, best), candidate, best)
        best_score = (torch.where(take, score[0], best_score[0]), torch.where(take, score[1], best_score[1]))
    return best
