"""Per-sample gradient-norm rules for every layer of LeNet-5 and ResNet-18, registered with Opacus.

Stock Opacus 1.6 ghost mode has norm rules only for Linear and Embedding; for every other layer it
materialises per-sample gradients. Here, registered through ``register_norm_sampler``:

- Conv1d/2d/3d, mixed as in Bu et al. (2022): per layer and input shape, either the *ghost norm*
  ``||G_i^T U_i||^2 = <U_i U_i^T, G_i G_i^T>`` from Gram matrices of the unfolded input U_i (T x d) and
  output gradient G_i (T x p), costing ~T^2 (d + p) per example, or the instantiated per-sample gradient
  G_i^T U_i, costing ~T d p (for Conv2d formed as one grouped convolution, without unfolding the input).
  The cheaper one is chosen (the paper's rule 2 T^2 < d p weighs memory instead; here both fit and time is
  what we pay). For a zero-padded Conv2d the input's Gram U_i U_i^T can also come from the padded input's
  channel Gram, summed over the kernel offsets (``shifted_input_gram``), when that is cheaper. On ResNet-18 (one view)
  at 32x32 that instantiates the stem, stage 1 and the strided convolutions and ghosts the rest; LeNet-5
  instantiates both convolutions; ScatterNet + CNN ghosts both.
- GroupNorm, LayerNorm, InstanceNorm and the public BatchNorm's ChannelAffine: their per-sample gradients
  are only (B, channels), so the norm is taken from them directly.
- Linear: Opacus's own ghost norm, after grouping augmult views into tokens.

Every rule is exact under augmentation multiplicity (``dp_layers.augmult``): the K views of an example are
grouped (as positions, tokens or a sum) before any norm is taken.

``OPACUS_NORM_SAMPLERS`` keeps Opacus's own rules from before these registrations, so the stock ghost
engine can still be run (and benchmarked) in the same process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Dict, List

import torch
from opacus.grad_sample import GradSampleModule, register_grad_sampler, register_norm_sampler
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.utils.tensor_utils import unfold2d, unfold3d
from torch import nn

from dp_layers.augmult import current_views, sum_views, view_share, views_as_positions, views_as_tokens
from dp_layers.public_bn import ChannelAffine

OPACUS_NORM_SAMPLERS = dict(GradSampleHooksFastGradientClipping.NORM_SAMPLERS)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SMALL_PARAMETER_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                          ChannelAffine)


@register_grad_sampler(ChannelAffine)
def channel_affine_grad_sample(layer: ChannelAffine, activations: List[torch.Tensor],
                               backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """y = x * weight + bias per channel: d/dweight sums x * dy over positions, d/dbias sums dy."""
    x, n = activations[0], backprops.shape[0]
    grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = (x * backprops).reshape(n, x.shape[1], -1).sum(dim=2)
    if layer.bias.requires_grad:
        grads[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(dim=2)
    return grads


def _norms_of(grad_samples: Dict[nn.Parameter, torch.Tensor]) -> Dict[nn.Parameter, torch.Tensor]:
    return {p: g.reshape(len(g), -1).norm(2, dim=1) for p, g in grad_samples.items()}


@register_norm_sampler(list(SMALL_PARAMETER_LAYERS))
def small_layer_norm_sample(layer: nn.Module, activations: List[torch.Tensor],
                            backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Norm layers and ChannelAffine hold a few parameters per channel: their (B, C) per-sample
    gradients are as cheap as any Gram matrix, so the norm is read off them."""
    k = current_views()
    per_row = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, activations, view_share(backprops, k))
    return _norms_of({p: sum_views(g, k) for p, g in per_row.items()})


@register_norm_sampler(nn.Linear)
def linear_norm_sample(layer: nn.Linear, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus's ghost norm for Linear; with augmult, an example's K rows are the tokens of one sample."""
    k = current_views()
    opacus_rule = OPACUS_NORM_SAMPLERS[nn.Linear]
    if k == 1:
        return opacus_rule(layer, activations, backprops)
    return opacus_rule(layer, [views_as_tokens(activations[0], k)], views_as_tokens(view_share(backprops, k), k))


@dataclass(frozen=True)
class ConvPlan:
    """How one convolution (for one input shape) computes its per-sample gradient norms."""

    method: str  # "ghost" or "instantiate"
    positions: int  # T: output positions per example (all its augmult views')
    inputs_per_group: int  # d: (in_channels / groups) * kernel elements
    outputs_per_group: int  # p: out_channels / groups
    groups: int
    kernel_elements: int = 1  # k: d / (in_channels / groups)
    padded_positions: int = 0  # P: positions of the zero-padded input per example (all views); 0: no shifted Gram
    input_gram: str = "unfolded"  # how the ghost norm forms U U^T: "unfolded" or "shifted" (``shifted_input_gram``)

    @property
    def unfolded_gram_cost(self) -> int:
        """Multiply-adds per example and group for U U^T from the unfolded input."""
        return self.positions ** 2 * self.inputs_per_group

    @property
    def shifted_gram_cost(self) -> int:
        """The same from the padded input's channel Gram (P^2 c), then k shifted T x T sums (counted as
        multiply-adds: they are gathers, slower each but few)."""
        channels = self.inputs_per_group // self.kernel_elements
        return self.padded_positions ** 2 * channels + self.positions ** 2 * self.kernel_elements

    @property
    def ghost_cost(self) -> int:
        """Multiply-adds per example for the two Gram matrices and their inner product."""
        t, p = self.positions, self.outputs_per_group
        gram = self.shifted_gram_cost if self.input_gram == "shifted" else self.unfolded_gram_cost
        return self.groups * (gram + t * t * (p + 1))

    @property
    def instantiate_cost(self) -> int:
        """Multiply-adds per example to form the per-sample gradient."""
        return self.groups * self.positions * self.inputs_per_group * self.outputs_per_group


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@lru_cache(maxsize=None)
def _plan(kernel: tuple, stride: tuple, padding, dilation: tuple, in_channels: int, out_channels: int,
          groups: int, spatial: tuple, views: int, shifted: bool) -> ConvPlan:
    positions, padded = views, views  # augmult: an example's views are more of its positions
    for size, k, s, dl, pad in zip(spatial, kernel, stride, dilation, _padding_pairs(padding, kernel, dilation)):
        positions *= (size + pad[0] + pad[1] - dl * (k - 1) - 1) // s + 1
        padded *= size + pad[0] + pad[1]
    kernel_elements = math.prod(kernel)
    plan = ConvPlan(method="", positions=positions, inputs_per_group=in_channels // groups * kernel_elements,
                    outputs_per_group=out_channels // groups, groups=groups, kernel_elements=kernel_elements,
                    padded_positions=padded if shifted else 0)
    if shifted and plan.shifted_gram_cost < plan.unfolded_gram_cost:
        plan = replace(plan, input_gram="shifted")
    return replace(plan, method="ghost" if plan.ghost_cost < plan.instantiate_cost else "instantiate")


def _padding_pairs(padding, kernel: tuple, dilation: tuple) -> list:
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        pairs = []
        for k, dl in zip(kernel, dilation):
            total = dl * (k - 1)
            pairs.append((total // 2, total - total // 2))
        return pairs
    return [(p, p) for p in padding]


def shifted_gram_applies(layer: nn.Module) -> bool:
    """Whether the ghost norm may form U U^T from shifted channel Grams (``shifted_input_gram``): a 2-D
    convolution with zero padding whose norm rule reads U U^T alone (a weight-standardized layer's rule needs the
    unfolded input itself, so it says so with ``ghost_needs_unfolded_input``)."""
    return (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
            and not getattr(layer, "ghost_needs_unfolded_input", False))


def conv_plan(layer: nn.Module, input_shape: tuple, views: int = 1) -> ConvPlan:
    """The cached per-layer decision for a (C, *spatial) or (B, C, *spatial) input shape, with ``views``
    augmult views per example."""
    n = len(layer.kernel_size)
    spatial = tuple(input_shape[-n:])
    padding = layer.padding if isinstance(layer.padding, str) else _as_tuple(layer.padding, n)
    return _plan(tuple(layer.kernel_size), _as_tuple(layer.stride, n), padding, _as_tuple(layer.dilation, n),
                 layer.in_channels, layer.out_channels, layer.groups, spatial, views, shifted_gram_applies(layer))


def shifted_input_gram(layer: nn.Conv2d, x: torch.Tensor, views: int = 1) -> torch.Tensor:
    """U U^T (B, groups, T, T) of a zero-padded Conv2d's unfolded input without unfolding it: entry (t, s) is
    the sum over kernel offsets o of <x_pad[:, t + o], x_pad[:, s + o]>, that is of k entries of the padded
    input's channel Gram X^T X (P x P, over the group's c channels), each offset's a strided slice of it. That
    costs P^2 c + k T^2 per example against T^2 c k for the unfolded one: for ScatterNet + CNN's 243 -> 64 3x3
    convolution on 8x8 maps, 0.25 s instead of 0.66 s for the per-sample norms of 1024 examples (2-core CPU).
    Augmult views are more positions (view-major, as ``views_as_positions``)."""
    pairs = _padding_pairs(layer.padding, layer.kernel_size, layer.dilation)
    padded = torch.nn.functional.pad(x, (*pairs[1], *pairs[0]))
    groups, channels = layer.groups, x.shape[1] // layer.groups
    n, hp, wp = x.shape[0] // views, padded.shape[-2], padded.shape[-1]
    per_view = padded.reshape(n, views, groups, channels, hp * wp).movedim(1, 3)  # (B, groups, c, K, P)
    by_position = per_view.reshape(n * groups, channels, views * hp * wp)
    gram = torch.bmm(by_position.transpose(1, 2), by_position).reshape(n * groups, views, hp, wp, views, hp, wp)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    rows, cols = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    total = None
    for i in range(kh):
        for j in range(kw):
            r, c = slice(i * dh, i * dh + sh * (rows - 1) + 1, sh), slice(j * dw, j * dw + sw * (cols - 1) + 1, sw)
            shifted = gram[:, :, r, c, :, r, c]
            total = shifted.clone() if total is None else total.add_(shifted)
    side = views * rows * cols
    return total.reshape(n, groups, side, side)


def conv_factors(layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor, views: int = 1) -> tuple:
    """(U, G): unfolded input (B, groups, d, T) and output gradient (B, groups, p, T) of a convolution,
    so that the per-sample weight gradient of group g is G[:, g] @ U[:, g]^T. With ``views`` > 1 the rows
    are B*K views and T becomes K*T positions per example (``backprops`` already scaled by 1/K)."""
    n, groups = x.shape[0], layer.groups
    x = x.contiguous()  # Opacus's unfold2d reads a channels-last input's memory as NCHW (norms of 0)
    if isinstance(layer, nn.Conv2d):
        unfolded = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                            dilation=layer.dilation)
    elif isinstance(layer, nn.Conv1d):
        padding = layer.padding if isinstance(layer.padding, str) else (0, layer.padding[0])
        unfolded = unfold2d(x.unsqueeze(-2), kernel_size=(1, layer.kernel_size[0]), padding=padding,
                            stride=(1, layer.stride[0]), dilation=(1, layer.dilation[0]))
    else:
        unfolded = unfold3d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                            dilation=layer.dilation)
    positions = unfolded.shape[-1]
    u = unfolded.reshape(n, groups, -1, positions)
    g = backprops.reshape(n, groups, -1, positions)
    return views_as_positions(u, views), views_as_positions(g, views)


# Rows per grouped convolution in ``per_sample_conv2d_weight``, and their input channels at most. oneDNN's
# grouped weight gradient on a CPU falls off a cliff past some number of groups: for ScatterNet + CNN's first
# convolution (243 -> 64, 3x3, 8x8 maps) 448 rows took 1.5 ms each and 480 rows 41 ms each (torch 2.14, 2 cores;
# a batch of 1024 took 45 s instead of about 1.4 s). Chunks of at most 256 rows (and 65536 input channels) stay
# below it and cost little elsewhere: 1.3-1.4 ms a row at 128-320 rows for 64 -> 64 at 32x32, and MNIST's
# 81 -> 16 took 0.06 ms a row in chunks of 256 against 0.13 ms in one of 1024.
GROUPED_ROWS, GROUPED_CHANNELS = 256, 2 ** 16


def grouped_rows(in_channels: int) -> int:
    """How many rows one grouped convolution of ``per_sample_conv2d_weight`` takes (``GROUPED_ROWS``)."""
    return max(1, min(GROUPED_ROWS, GROUPED_CHANNELS // in_channels))


def per_sample_conv2d_weight(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-row weight gradients (N, *weight.shape) of a Conv2d as grouped convolutions: a chunk of n rows
    becomes n groups of one (1, n * in_channels) image, so that group i convolves row i's input with row i's
    output gradient (Rochette et al. 2019, "Efficient per-example gradient computations in convolutional neural
    networks"). Unlike unfolding the input (im2col, a copy 9x the input for 3x3 kernels) it materialises
    nothing larger than the result. Chunked (``grouped_rows``): too many groups in one call is 30x slower."""
    n = x.shape[0]
    weight_shape = layer.weight.shape
    grads = x.new_empty((n, *weight_shape))
    step = grouped_rows(x.shape[1])
    for start in range(0, n, step):
        rows = min(step, n - start)
        chunk = torch.nn.grad.conv2d_weight(
            x[start:start + rows].reshape(1, rows * x.shape[1], *x.shape[2:]), (rows * weight_shape[0],
            *weight_shape[1:]), backprops[start:start + rows].reshape(1, rows * backprops.shape[1],
                                                                      *backprops.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=rows * layer.groups)
        grads[start:start + rows] = chunk.reshape(rows, *weight_shape)
    return grads


def instantiate_conv_weight(layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor, views: int = 1
                            ) -> torch.Tensor:
    """Each example's weight gradient (B, *weight.shape): the sum over its ``views`` rows (``backprops`` already
    each view's share). Conv2d (numeric padding) by grouped convolution, other convolutions by unfolding."""
    if isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str):
        return sum_views(per_sample_conv2d_weight(layer, x, backprops), views)
    u, g = conv_factors(layer, x, backprops, views=views)
    return torch.einsum("bgpt,bgdt->bgpd", g, u).reshape(len(u), *layer.weight.shape)


def conv_weight_norms(layer: nn.Module, plan: ConvPlan, x: torch.Tensor, backprops: torch.Tensor,
                      views: int = 1) -> tuple:
    """(per-sample Frobenius norms of the weight gradient, the per-sample gradients (B, *weight.shape) if the
    plan instantiated them, else None). ``backprops`` are each view's share of its example's gradient."""
    if plan.method == "ghost":
        if plan.input_gram == "shifted":
            input_gram = shifted_input_gram(layer, x, views)
            g = views_as_positions(backprops.reshape(len(backprops), layer.groups, -1,
                                                     math.prod(backprops.shape[2:])), views)
        else:
            u, g = conv_factors(layer, x, backprops, views=views)
            input_gram = torch.einsum("bgdt,bgds->bgts", u, u)
        output_gram = torch.einsum("bgpt,bgps->bgts", g, g)
        return (input_gram * output_gram).sum(dim=(1, 2, 3)).clamp(min=0).sqrt(), None
    per_sample = instantiate_conv_weight(layer, x, backprops, views)
    return per_sample.reshape(len(per_sample), -1).norm(2, dim=1), per_sample


def conv_bias_per_sample(backprops: torch.Tensor, views: int = 1) -> torch.Tensor:
    """(B, out_channels): each example's bias gradient, the output gradient summed over positions and views."""
    return sum_views(backprops.reshape(*backprops.shape[:2], -1).sum(dim=2), views)


@register_norm_sampler(list(CONV_TYPES))
def conv_norm_sample(layer: nn.Module, activations: List[torch.Tensor],
                     backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    x = activations[0].to(backprops.dtype)
    norms = {}
    if x.shape[0] == 0:  # an empty Poisson batch
        empty = torch.zeros(0, device=x.device, dtype=x.dtype)
        return {p: empty for p in layer.parameters() if p.requires_grad}
    k = current_views()
    share = view_share(backprops, k)
    if layer.weight.requires_grad:
        norms[layer.weight], _ = conv_weight_norms(layer, conv_plan(layer, x.shape, views=k), x, share, k)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = conv_bias_per_sample(share, k).norm(2, dim=1)
    return norms
