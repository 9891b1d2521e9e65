"""make_norm(kind, channels): the single place where a model's normalization layer is chosen.

Every kind offered here normalizes an example with statistics of that example alone (group, layer,
instance), of public data alone (bn-public), or released once under DP before training (bn-dp, for fixed
features), so per-example sensitivity stays bounded; BatchNorm on private batches is never offered.

The registry ``NORM_KINDS`` is torch-free (``--norm``'s choices come from it while ``--help`` answers
without torch); the layers are imported when one is made.
"""
from __future__ import annotations

NORM_KINDS = {
    "none": "no normalization",
    "group": "GroupNorm, at most 32 groups of at least two channels (Wu & He 2018)",
    "layer": "LayerNorm over (C, H, W): GroupNorm with one group",
    "instance": "InstanceNorm with a per-channel affine",
    "bn-public": "BatchNorm whose statistics come from the public set only",
    "bn-dp": "BatchNorm statistics of the features estimated once from the private set under DP, paid for out of "
             "epsilon (ScatterNet models; dp_layers.dp_bn)",
}
# Kinds that only a fixed feature stage has a place for (estimated once, before training): the end-to-end models'
# layers see activations that change with the weights.
FEATURE_ONLY_NORMS = ("bn-dp",)


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: at most 32 (Wu & He 2018) and at least two channels per group.

    The largest divisor of ``channels`` within that bound, so LeNet-5's 6 and 16 channels get 3 and 8
    groups instead of degenerating into instance norm, and ResNet-18's 64..512 channels get 32.
    """
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def make_norm(kind: str, channels: int):
    """A normalization layer for ``channels`` feature maps of one example.

    ``layer`` is GroupNorm with one group: LayerNorm over (C, H, W) with a per-channel affine, the form
    Wu & He (2018) use for convolutional nets, which also does not need the spatial size up front.
    """
    from torch import nn

    from dp_layers.public_bn import PublicBatchNorm

    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "bn-public":
        return PublicBatchNorm(channels)
    if kind in FEATURE_ONLY_NORMS:
        raise ValueError(f"--norm {kind} normalizes fixed features only (the scatternet models)")
    raise ValueError(f"unknown normalization {kind!r}; expected one of {', '.join(NORM_KINDS)}")
