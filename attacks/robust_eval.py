"""Robust accuracy, and the checks that expose gradient masking.

Noisy DP models can look robust because their input gradients are uninformative, not because they are.
``masking_checks`` therefore reports, next to the robust accuracy: the accuracy as the radius grows (it
must fall towards zero), under more steps and more restarts (they must never raise it), and under
adversarial examples transferred from another model (a black-box attack beating the white-box one is the
classic sign of masking).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from attacks.defaults import default_alpha
from attacks.isolation import attack_view, plain_module
from attacks.pgd import AttackSpec, perturb

TOLERANCE_PP = 0.5  # accuracy differences (percentage points) below this count as equal


def _first(dataset, size: int):
    size = min(size, len(dataset))
    return dataset.__getitems__(range(size))


def robust_accuracy(model: torch.nn.Module, dataset, spec: AttackSpec, *, size: int, batch_size: int,
                    device: torch.device, seed: int = 0, source: Optional[torch.nn.Module] = None) -> float:
    """Accuracy (%) of ``model`` on the first ``size`` examples of ``dataset`` under ``spec``, in eval mode.

    With ``source``, the adversarial examples are crafted on ``source`` (a transfer attack) and only
    evaluated on ``model``.
    """
    images, labels = _first(dataset, size)
    generator = torch.Generator(device=device).manual_seed(seed)
    attacked = model if source is None else source
    modes = [(m, m.training) for m in {id(model): model, id(attacked): attacked}.values()]
    correct = 0
    try:
        for m, _ in modes:
            m.eval()
        for start in range(0, len(labels), batch_size):
            x, y = images[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
            with attack_view(attacked) as plain:
                adversarial = perturb(plain, x, y, spec, generator=generator)
            with torch.no_grad():  # eval mode and no graph: no per-sample hook records anything
                correct += (plain_module(model)(adversarial).argmax(dim=1) == y).sum().item()
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


def largest_radius(spec: AttackSpec, image_numel: int) -> float:
    """A radius at which any image can be moved to mid-grey, so no classifier keeps real accuracy."""
    return 0.5 if spec.norm == "linf" else 0.5 * image_numel ** 0.5


def masking_checks(model: torch.nn.Module, dataset, spec: AttackSpec, *, size: int, batch_size: int,
                   device: torch.device, seed: int = 0, source: Optional[torch.nn.Module] = None,
                   baseline: Optional[float] = None) -> dict:
    """The gradient-masking report (module doc). ``baseline`` is the robust accuracy under ``spec`` if
    already known."""
    def accuracy(s: AttackSpec, **kw) -> float:
        return robust_accuracy(model, dataset, s, size=size, batch_size=batch_size, device=device, seed=seed, **kw)

    base = accuracy(spec) if baseline is None else baseline
    image_numel = dataset.__getitems__(range(1))[0][0].numel()
    radii = sorted({spec.eps * 2, spec.eps * 4, largest_radius(spec, image_numel)})
    curve = [{"eps": spec.eps, "robust_acc": base}]
    for eps in radii:
        if eps <= spec.eps:
            continue
        scaled = replace(spec, method="pgd", eps=eps, alpha=default_alpha("pgd", eps, spec.steps))
        curve.append({"eps": eps, "robust_acc": accuracy(scaled)})
    more_steps = replace(spec, steps=spec.steps * 2, alpha=spec.alpha / 2)
    more_restarts = replace(spec, restarts=spec.restarts + 2, random_start=True)
    report = {
        "radius_curve": curve,
        "more_steps": {"steps": more_steps.steps, "robust_acc": accuracy(more_steps)},
        "more_restarts": {"restarts": more_restarts.restarts, "robust_acc": accuracy(more_restarts)},
    }
    accs = [point["robust_acc"] for point in curve]
    report["falls_towards_zero"] = accs[-1] <= 10.0 and all(b <= a + TOLERANCE_PP for a, b in zip(accs, accs[1:]))
    report["stronger_attacks_never_raise"] = (report["more_steps"]["robust_acc"] <= base + TOLERANCE_PP
                                              and report["more_restarts"]["robust_acc"] <= base + TOLERANCE_PP)
    if source is not None:
        transfer = accuracy(spec, source=source)
        report["transfer"] = {"robust_acc": transfer}
        report["white_box_beats_transfer"] = base <= transfer + TOLERANCE_PP
    report["passed"] = all(v for k, v in report.items() if isinstance(v, bool))
    return report
