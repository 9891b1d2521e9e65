"""Layers and per-sample gradient rules that keep DP-SGD exact and cheap.

- ``norms``: ``make_norm``, the single place where a model's normalization is chosen.
- ``public_bn``: BatchNorm whose statistics come from public data only.
- ``norm_rules``: per-sample gradient-norm rules registered with Opacus (mixed ghost clipping).
- ``bk``: the book-keeping engine, clipped gradients from one backward pass.

Importing the package registers the rules with Opacus (``register_grad_sampler`` and
``register_norm_sampler``), the way Opacus registers its own.
"""
from dp_layers import norm_rules  # noqa: F401  (registers the rules with Opacus)
from dp_layers.norms import NORM_KINDS, group_count, make_norm
from dp_layers.public_bn import PublicBatchNorm, has_public_batchnorm, refresh_public_statistics

__all__ = ["NORM_KINDS", "PublicBatchNorm", "group_count", "has_public_batchnorm", "make_norm",
           "refresh_public_statistics"]
