"""BatchNorm whose statistics come from public data only (Davody et al. 2020; the CS523 study of DP and
robust training with BatchNorm).

A private example is normalized with the mean and variance that the *public* batch has at that layer, so
its output and per-sample gradient depend only on itself, the weights and the public data: per-sample
clipping still bounds its influence. The layer is split in two so Opacus can wrap it:

- ``PublicStandardize``: no parameters; public mean/variance as buffers. It changes them only inside
  ``collecting_public_statistics`` (a forward pass of the public batch), never from private data.
- ``ChannelAffine``: the trainable per-channel scale and shift, with registered per-sample gradient and
  gradient-norm rules (``dp_layers.grad_rules``).

In the backward pass the statistics are constants (Opacus hooks see an ordinary affine map), which keeps
per-sample gradients exact and cheap; the statistics are refreshed from the public data before every
optimizer step, as the weights change.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class PublicStandardize(nn.Module):
    """(x - public_mean) / sqrt(public_var + eps) per channel; statistics set only from public batches."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("public_mean", torch.zeros(num_features))
        self.register_buffer("public_var", torch.ones(num_features))
        self.register_buffer("refreshed", torch.tensor(False))  # saved with the weights in model.pt
        self.collecting = False
        self._ready = False  # mirrors ``refreshed`` without a device sync on every forward

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.refreshed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.collecting:
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            self.public_mean.copy_(mean.detach())
            self.public_var.copy_(var.detach())
            self.refreshed.fill_(True)
            self._ready = True
        elif not self._ready:
            raise RuntimeError("public BatchNorm statistics were never computed: call refresh_public_statistics "
                               "with the public images first")
        return (x - self.public_mean.view(shape)) * torch.rsqrt(self.public_var.view(shape) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ChannelAffine(nn.Module):
    """x * weight + bias per channel (dimension 1): BatchNorm's affine part, initialised to identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class PublicBatchNorm(nn.Sequential):
    """BatchNorm with public statistics: ``PublicStandardize`` then ``ChannelAffine``."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(PublicStandardize(num_features, eps), ChannelAffine(num_features))


def public_standardizers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, PublicStandardize)]


def has_public_batchnorm(model: nn.Module) -> bool:
    return bool(public_standardizers(model))


@contextmanager
def collecting_public_statistics(model: nn.Module):
    """Inside this context every ``PublicStandardize`` takes its statistics from the batch it sees."""
    layers = public_standardizers(model)
    for layer in layers:
        layer.collecting = True
    try:
        yield
    finally:
        for layer in layers:
            layer.collecting = False


@torch.no_grad()
def refresh_public_statistics(model: nn.Module, public_images: torch.Tensor) -> None:
    """Recompute every layer's public statistics for the current weights with one forward pass of the
    public batch (each layer sees the public activations normalized by the layers before it, exactly as
    BatchNorm in training mode would). No gradient, no Opacus state, no private data involved."""
    was_training = model.training
    model.eval()
    try:
        with collecting_public_statistics(model):
            model(public_images)
    finally:
        model.train(was_training)
