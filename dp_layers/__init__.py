"""Layers that keep differential privacy intact: the single place where normalization is chosen.

Public-data BatchNorm and the per-layer ghost-clipping norm rules arrive with the dp_layers issue.
"""
from dp_layers.norms import NORM_KINDS, group_count, make_norm

__all__ = ["NORM_KINDS", "group_count", "make_norm"]
