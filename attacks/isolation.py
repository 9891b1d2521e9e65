"""Attacking a model that is being trained without touching its training state.

Inside ``attack_view(model)`` every parameter has ``requires_grad`` off and the per-sample gradient hooks
of Opacus (and of the book-keeping engine) are disabled. So an attack's ``torch.autograd.grad`` with
respect to the input forms no parameter gradient, leaves ``.grad`` and all per-sample state alone, and does
not pay for per-sample machinery: an attack step costs one forward pass and one input-gradient backward.
The optimizer, the accountant and the public BatchNorm statistics are never reached from here.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def plain_module(model: nn.Module) -> nn.Module:
    """The model without Opacus's wrapper."""
    return getattr(model, "_module", model)


@contextmanager
def attack_view(model: nn.Module):
    """Yield the plain model with frozen parameters and per-sample hooks off; restore both on exit."""
    parameters = list(model.parameters())
    trainable = [p.requires_grad for p in parameters]
    hooks_were_enabled = getattr(model, "hooks_enabled", False)
    try:
        if hooks_were_enabled:
            model.disable_hooks()
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield plain_module(model)
    finally:
        for parameter, flag in zip(parameters, trainable):
            parameter.requires_grad_(flag)
        if hooks_were_enabled:
            model.enable_hooks()
