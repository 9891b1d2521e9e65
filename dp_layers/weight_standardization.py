"""Weight-standardized convolutions (Qiao et al. 2019; with GroupNorm, the ResNet choice of De et al. 2022)
and their exact per-sample gradients with respect to the raw weight.

The layer convolves with w_hat = (w - mean(w)) / s per output filter, s = sqrt(var(w) + eps), over the
filter's n = (in_channels / groups) * kernel elements. The trainable parameter is the raw w, so DP-SGD must
clip the per-sample gradient of w, taken through the standardization. For one filter, with G the per-sample
gradient with respect to w_hat, the Jacobian is symmetric and

    J^T G = (G - mean(G) - w_hat (w_hat . G) / n) / s,
    ||J^T G||^2 = (||G||^2 - (1 . G)^2 / n + (w_hat . G)^2 (||w_hat||^2 / n^2 - 2 / n)) / s^2,

which is the ghost form of the design note, (||G||^2 - (1.G)^2/n - (w_hat.G)^2/n) / s^2, when ||w_hat||^2 = n
(eps = 0). Each term has a ghost form over the layer's positions t, with a_t the unfolded input and g_t the
output gradient: ||G_o||^2 = sum_ts g_ot g_os (a_t . a_s) (the input Gram matrix the ordinary ghost norm uses,
per filter), 1 . G_o = sum_t g_ot (1 . a_t), and w_hat_o . G_o = sum_t g_ot (w_hat_o . a_t), where w_hat_o . a_t
is the layer's own pre-bias output. ``ws_weight_norms`` uses that form or instantiates G, whichever the
convolution's plan (``dp_layers.norm_rules``) finds cheaper.

Registered with Opacus for every engine: a grad sampler (hooks, the stock ghost engine), a norm sampler
(mixed-ghost); the book-keeping engine has its own rule (``dp_layers.bk``); functorch differentiates the
layer itself. All of them are exact under augmentation multiplicity.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import nn

from dp_layers.augmult import current_views, view_share
from dp_layers.norm_rules import conv_bias_per_sample, conv_factors, conv_plan, instantiate_conv_weight

EPS = 1e-5


class WSConv2d(nn.Conv2d):
    """Conv2d whose filters are standardized (zero mean, unit variance over their fan-in) at every forward."""

    eps = EPS
    ghost_needs_unfolded_input = True  # its ghost norm reads U itself, not U U^T alone (dp_layers.norm_rules)

    def standardization(self) -> tuple:
        """(w_hat, s): the standardized weight and each filter's scale, shaped (out, fan-in) and (out, 1)."""
        flat = self.weight.reshape(self.out_channels, -1)
        centred = flat - flat.mean(dim=1, keepdim=True)
        scale = torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return centred / scale, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat, _ = self.standardization()
        return F.conv2d(x, w_hat.reshape(self.weight.shape), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def raw_weight_gradient(layer: WSConv2d, per_sample_hat: torch.Tensor) -> torch.Tensor:
    """J^T G for per-sample gradients G with respect to w_hat, shaped (B, out, ...) like the weight."""
    with torch.no_grad():
        w_hat, scale = (t.to(per_sample_hat.dtype) for t in layer.standardization())
    g = per_sample_hat.reshape(len(per_sample_hat), layer.out_channels, -1)
    n = g.shape[-1]
    along = (g * w_hat).sum(dim=-1, keepdim=True)
    raw = (g - g.mean(dim=-1, keepdim=True) - w_hat * along / n) / scale
    return raw.reshape(per_sample_hat.shape)


def _ghost_norms(layer: WSConv2d, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||J^T G_i|| per sample from the ghost form (module doc); u (B, groups, d, T), g (B, groups, p, T)."""
    with torch.no_grad():
        w_hat, scale = (t.to(g.dtype) for t in layer.standardization())
    groups, n = layer.groups, u.shape[2]
    w_hat, scale = w_hat.reshape(groups, -1, n), scale.reshape(groups, -1)
    input_gram = torch.einsum("bgdt,bgds->bgts", u, u)
    squared = (torch.einsum("bgpt,bgts->bgps", g, input_gram) * g).sum(dim=-1)  # ||G_o||^2
    ones = torch.einsum("bgpt,bgt->bgp", g, u.sum(dim=2))  # 1 . G_o
    outputs = torch.einsum("gpd,bgdt->bgpt", w_hat, u)  # w_hat_o . a_t, the pre-bias output
    along = (g * outputs).sum(dim=-1)  # w_hat_o . G_o
    w_norm = w_hat.pow(2).sum(dim=-1)  # ||w_hat_o||^2 (n when eps is 0)
    per_filter = (squared - ones.pow(2) / n + along.pow(2) * (w_norm / n ** 2 - 2 / n)) / scale.pow(2)
    return per_filter.sum(dim=(1, 2)).clamp(min=0).sqrt()


def ws_weight_norms(layer: WSConv2d, x: torch.Tensor, share: torch.Tensor, views: int = 1) -> tuple:
    """(per-sample norms of the raw weight's gradient, the per-sample raw gradients if instantiated else None).
    ``share`` is each view's share of its example's output gradient (augmult: 1/K of the per-view gradient)."""
    if conv_plan(layer, x.shape, views=views).method == "ghost":
        u, g = conv_factors(layer, x, share, views=views)
        return _ghost_norms(layer, u, g), None
    raw = raw_weight_gradient(layer, instantiate_conv_weight(layer, x, share, views))
    return raw.reshape(len(raw), -1).norm(2, dim=1), raw


@register_grad_sampler(WSConv2d)
def ws_conv_grad_sample(layer: WSConv2d, activations: List[torch.Tensor],
                        backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-row gradients of the raw weight: J^T of those with respect to w_hat (Opacus's own convolution
    sampler only handles the exact type nn.Conv2d)."""
    x = activations[0].to(backprops.dtype)
    per_row = {}
    if layer.weight.requires_grad:
        per_row[layer.weight] = raw_weight_gradient(layer, instantiate_conv_weight(layer, x, backprops))
    if layer.bias is not None and layer.bias.requires_grad:
        per_row[layer.bias] = conv_bias_per_sample(backprops)
    return per_row


@register_norm_sampler(WSConv2d)
def ws_conv_norm_sample(layer: WSConv2d, activations: List[torch.Tensor],
                        backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    x, k = activations[0].to(backprops.dtype), current_views()
    if x.shape[0] == 0:
        empty = x.new_zeros(0)
        return {p: empty for p in layer.parameters() if p.requires_grad}
    norms = {}
    share = view_share(backprops, k)
    if layer.weight.requires_grad:
        norms[layer.weight], _ = ws_weight_norms(layer, x, share, views=k)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = conv_bias_per_sample(share, k).norm(2, dim=1)
    return norms
