"""Augmentation multiplicity (De et al. 2022, "Unlocking high-accuracy differentially private image
classification through scale"): each sampled example is seen in K augmented views, its gradient is the
mean of its views' gradients, and that mean is clipped once. One example still contributes one clipped
gradient, so the privacy accounting does not change.

A physical batch of B examples reaches the model as B*K rows, example-major (the K views of example i are
rows i*K .. i*K+K-1). Every engine sees per-row quantities and must group them by example before clipping:

- hooks and functorch materialise per-row gradients: their mean over each example's views is its gradient
  (``mean_views``, applied to ``grad_sample`` before Opacus clips it);
- the ghost-norm engines (mixed-ghost, bk) treat the K views as more positions of one sample: a convolution's
  unfolded input and output gradient over T positions become K*T positions of one example
  (``views_as_positions``), a linear layer's K rows become K "tokens", and the small (B, C) per-sample
  gradients of norm layers are summed over views (``sum_views``). Their norms then include the cross terms
  between views, and are exact.

The views-per-example count of the batch in flight is a context value (``views_per_example``), set by the
training loop around forward and backward, so the rules registered with Opacus (whose signature is fixed)
can read it. Outside the context it is 1 and everything is as without augmult.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_VIEWS = contextvars.ContextVar("views_per_example", default=1)


@contextmanager
def views_per_example(k: int):
    """Declare that each example of the batch in flight appears in ``k`` consecutive rows."""
    token = _VIEWS.set(int(k))
    try:
        yield
    finally:
        _VIEWS.reset(token)


def current_views() -> int:
    return _VIEWS.get()


def _examples(rows: int, k: int) -> int:
    if rows % k:
        raise ValueError(f"{rows} rows are not a whole number of examples of {k} views each")
    return rows // k


def view_share(backprops: torch.Tensor, k: int) -> torch.Tensor:
    """A view's share of its example's gradient: per-view output gradients times 1/K (the example's gradient
    is the mean over its views)."""
    return backprops if k == 1 else backprops / k


def sum_views(per_row: torch.Tensor, k: int) -> torch.Tensor:
    """(B*K, ...) -> (B, ...): each example's sum over its views."""
    if k == 1:
        return per_row
    return per_row.reshape(_examples(per_row.shape[0], k), k, *per_row.shape[1:]).sum(dim=1)


def mean_views(per_row: torch.Tensor, k: int) -> torch.Tensor:
    """(B*K, ...) -> (B, ...): each example's mean over its views (its gradient, from per-view gradients)."""
    return per_row if k == 1 else sum_views(per_row, k) / k


def views_as_positions(per_row: torch.Tensor, k: int) -> torch.Tensor:
    """(B*K, ..., T) -> (B, ..., K*T): the views of one example become more positions of that example."""
    if k == 1:
        return per_row
    b = _examples(per_row.shape[0], k)
    grouped = per_row.reshape(b, k, *per_row.shape[1:])  # (B, K, ..., T)
    grouped = grouped.movedim(1, -2)  # (B, ..., K, T)
    return grouped.reshape(*grouped.shape[:-2], k * per_row.shape[-1])


def views_as_tokens(per_row: torch.Tensor, k: int) -> torch.Tensor:
    """(B*K, ..., d) -> (B, K*..., d): a linear layer's rows (and tokens) of one example as the tokens of one
    sample."""
    if k == 1:
        return per_row
    return per_row.reshape(_examples(per_row.shape[0], k), -1, per_row.shape[-1])


def per_view(coefficients: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) -> (B*K,): an example's clipping factor for each of its views."""
    return coefficients if k == 1 else coefficients.repeat_interleave(k)


class ViewAveragedCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy whose per-example loss is the mean over the example's K views (``reduction="none"``
    gives one loss per example, as the ghost-clipping and book-keeping losses need: one clipping factor per
    example). With ``"mean"`` it equals plain cross-entropy averaged over all B*K rows; with ``"sum"`` it is
    the sum over examples of their view means."""

    def __init__(self, views: int):
        super().__init__()
        self.views = views

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_example = mean_views(F.cross_entropy(logits, labels, reduction="none"), self.views)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()
