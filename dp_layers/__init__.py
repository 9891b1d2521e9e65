"""Layers and per-sample gradient rules that keep DP-SGD exact and cheap.

- ``norms``: ``make_norm``, the single place where a model's normalization is chosen, and the registry of
  normalization kinds (torch-free).
- ``public_bn``: BatchNorm whose statistics come from public data only.
- ``norm_rules``: per-sample gradient-norm rules registered with Opacus (mixed ghost clipping).
- ``bk``: the book-keeping engine, clipped gradients from one backward pass.

The package's names are loaded on first use (PEP 562), so reading the registry does not import torch; the
first layer taken from the package registers the rules with Opacus (``register_grad_sampler`` and
``register_norm_sampler``), the way Opacus registers its own, as does importing ``dp_layers.norm_rules``.
"""
from __future__ import annotations

import importlib

_HOMES = {"NORM_KINDS": "norms", "group_count": "norms", "make_norm": "norms", "PublicBatchNorm": "public_bn",
          "has_public_batchnorm": "public_bn", "refresh_public_statistics": "public_bn"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'dp_layers' has no attribute {name!r}")
    if name != "NORM_KINDS":
        importlib.import_module("dp_layers.norm_rules")  # registers the rules with Opacus
    return getattr(importlib.import_module(f"dp_layers.{_HOMES[name]}"), name)
