"""Book-keeping DP-SGD (Bu et al. 2023): clipped gradients from one backward pass.

Ghost clipping needs two backward passes: one for the per-sample norms, one for the reweighted loss.
Book-keeping needs one, and not even a full one: autograd is asked for the gradients of the trainable
layers' outputs only, so it propagates output gradients through the network but never forms a weight
gradient (nor the input gradient of the first layer). As each layer's output gradient arrives during that
pass (a hook on the layer's output), the layer computes its per-sample gradient norms (ghost or instantiated,
``dp_layers.norm_rules``) and keeps only what its clipped gradient sum will need; everything else it held is
released there and then, so the step's memory is the backward pass's own plus one small state per layer.
The state is whichever is smaller (``keeps_per_sample``): the per-sample gradients where the layer
instantiated them and they are smaller than its input and output gradient (early, wide-image convolutions),
else the input and the output gradient (and the per-sample gradients, if formed for the norm, are freed).
Once all norms are known, every layer's ``sum_i c_i g_i`` is either a weighted sum of its kept per-sample
gradients or one weight-gradient computation with the output gradients scaled by the clipping factors
``c_i``; each layer's state is dropped as soon as its sum is taken.

It plugs into Opacus as a ``GradSampleModuleFastGradientClipping`` subclass, so Opacus's DP optimizer
adds the noise and its accountant counts the steps.

Book-keeping needs every trainable parameter to be covered by exactly one recorded layer call: its
per-sample norm is that call's norm, and that call's clipped sum is its gradient. Models that break this
(a layer called twice, tied weights, a trainable layer in eval mode or unused) are refused with
``UnsupportedModelError`` before any gradient is touched (``BookKeepingGradSampleModule.check_records``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.utils.module_utils import requires_grad, trainable_parameters
from torch import nn

from dp_layers.augmult import current_views, per_view, sum_views, view_share, views_as_tokens
from dp_layers.norm_rules import CONV_TYPES, conv_bias_per_sample, conv_plan, conv_weight_norms
from dp_layers.weight_standardization import WSConv2d, raw_weight_gradient, ws_weight_norms
from src.engines import BK_KEEP_POLICIES

ClippedSum = Callable[[torch.Tensor], Dict[nn.Parameter, torch.Tensor]]
CONV_WEIGHT_GRADIENT = {nn.Conv1d: torch.nn.grad.conv1d_weight, nn.Conv2d: torch.nn.grad.conv2d_weight,
                        nn.Conv3d: torch.nn.grad.conv3d_weight}

# What a layer that instantiated its per-sample gradients keeps for its clipped sum (``keeps_per_sample``).
KEEP_POLICIES = BK_KEEP_POLICIES
KEPT_PER_SAMPLE, KEPT_FACTORS = "per-sample gradients", "input and output gradient"
KEPT_NOTHING = "nothing: a second backward pass computes its clipped sum"  # over --bk-layer-budget
KEPT_EMPTY = "nothing: an empty batch"


class UnsupportedModelError(ValueError):
    """A model that book-keeping would clip wrongly, so that the update would no longer be bounded by the
    clipping norm (and the DP guarantee would not hold). Raised before any gradient is modified."""


SHARED_PARAMETER_ADVICE = ("book-keeping cannot clip a parameter used by more than one layer call (shared or tied "
                           "weights); use --engine hooks or functorch")
UNRECORDED_ADVICE = ("its per-sample norms would be stale; put it in train mode or freeze its parameters "
                     "(requires_grad=False)")


def keeps_per_sample(policy: str, per_sample_numel: int, factors_numel: int) -> bool:
    """Whether a layer whose per-sample gradients were instantiated (for its norm) keeps them for its clipped
    sum, or keeps its input and output gradient instead and frees them. ``smaller`` (the default) keeps
    whichever holds fewer numbers: at 32x32 ResNet-18's stem and first stage keep per-sample gradients
    (64x64x9 weights against 64x1024 input and output positions), deeper layers their factors, at the price of
    one weight-gradient convolution each for the sum. ``per-sample`` and ``factors`` force one side (tests and
    benchmarks compare them); either gives the same update up to the summation order."""
    if policy not in KEEP_POLICIES:
        raise ValueError(f"unknown keep policy {policy!r}; expected one of {', '.join(KEEP_POLICIES)}")
    if policy == "smaller":
        return per_sample_numel <= factors_numel
    return policy == "per-sample"


def planned_state(layer: nn.Module, input_shape: tuple, output_shape: tuple, views: int = 1,
                  keep: str = "smaller") -> Tuple[str, int]:
    """What one call of ``layer`` on batch-first ``input_shape`` rows (``views`` per example) keeps for its
    clipped sum, and how many numbers: the rules below decide the same way from the same sizes. Used to
    apply the memory budget before the backward pass and by ``--explain-engine``."""
    examples = input_shape[0] // views
    rule = _rule_for(layer)
    if rule is linear_rule and len(input_shape) != 2:
        rule = generic_rule
    if rule is generic_rule:
        return KEPT_PER_SAMPLE, examples * sum(p.numel() for p in covered_parameters(layer))
    factors = math.prod(input_shape) + math.prod(output_shape)
    if rule is linear_rule:
        return KEPT_FACTORS, factors
    bias = examples * layer.out_channels if layer.bias is not None and layer.bias.requires_grad else 0
    if not layer.weight.requires_grad:
        return KEPT_PER_SAMPLE, bias
    per_sample = examples * layer.weight.numel()
    instantiated = conv_plan(layer, input_shape, views=views).method == "instantiate"
    if instantiated and keeps_per_sample(keep, per_sample, factors):
        return KEPT_PER_SAMPLE, per_sample + bias
    return KEPT_FACTORS, factors + bias


@dataclass
class LayerBook:
    """One layer call's part of a step: its per-sample norms, the function that returns its clipped sum
    ``sum_i c_i g_i`` once the clipping factors are known (None for a layer over the budget, whose sum the
    second backward pass computes), and what that function keeps alive until then."""

    norms: Dict[nn.Parameter, torch.Tensor]
    clipped_sum: Optional[ClippedSum]
    kept: str


def _weighted_sum(per_sample: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return torch.einsum("b,b...->...", coef.to(per_sample.dtype), per_sample)


def _scale(backprops: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return backprops * coef.to(backprops.dtype).view(-1, *([1] * (backprops.dim() - 1)))


def _sum_of(parts: List[ClippedSum]) -> ClippedSum:
    """One clipped-sum function from the parts of a layer (each closes over its own tensors only, so that
    what one part does not need is not kept alive by another's closure)."""
    def clipped_sum(coef):
        grads = {}
        for part in parts:
            grads.update(part(coef))
        return grads

    return clipped_sum


def _per_sample_part(per_sample: Dict[nn.Parameter, torch.Tensor]) -> ClippedSum:
    return lambda coef: {p: _weighted_sum(gs, coef).reshape(p.shape) for p, gs in per_sample.items()}


def _conv_weight_part(layer: nn.Module, x: torch.Tensor, share: torch.Tensor, views: int,
                      standardized: bool = False) -> ClippedSum:
    """The clipped sum of a convolution's weight from its input and output gradient: one weight-gradient
    convolution with each row's output gradient scaled by its example's factor (for a weight-standardized
    layer, taken through the standardization: J^T is linear and the same for every example)."""
    weight_gradient = next(f for t, f in CONV_WEIGHT_GRADIENT.items() if isinstance(layer, t))

    def part(coef):
        summed = weight_gradient(x, layer.weight.shape, _scale(share, per_view(coef, views)), stride=layer.stride,
                                 padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return {layer.weight: raw_weight_gradient(layer, summed.unsqueeze(0))[0] if standardized else summed}

    return part


def _conv_book(layer: nn.Module, x: torch.Tensor, share: torch.Tensor, views: int, keep: str,
               weight_norms: Optional[torch.Tensor], per_sample: Optional[torch.Tensor],
               standardized: bool = False) -> LayerBook:
    """Norms, clipped sum and kept state of a convolution (plain or weight-standardized) whose weight norms
    (and, if instantiated, per-sample weight gradients) are computed; the bias's per-sample gradients are
    (B, out_channels), always kept."""
    norms, parts, kept = {}, [], KEPT_PER_SAMPLE
    if layer.weight.requires_grad:
        norms[layer.weight] = weight_norms
        if per_sample is not None and keeps_per_sample(keep, per_sample.numel(), x.numel() + share.numel()):
            parts.append(_per_sample_part({layer.weight: per_sample}))
        else:
            parts.append(_conv_weight_part(layer, x, share, views, standardized))
            kept = KEPT_FACTORS
    if layer.bias is not None and layer.bias.requires_grad:
        bias_per_sample = conv_bias_per_sample(share, views)
        norms[layer.bias] = bias_per_sample.norm(2, dim=1)
        parts.append(_per_sample_part({layer.bias: bias_per_sample}))
    return LayerBook(norms, _sum_of(parts), kept)


def linear_rule(layer: nn.Linear, activations: List[torch.Tensor], backprops: torch.Tensor,
                views: int = 1, keep: str = "smaller") -> LayerBook:
    """For (B, features) inputs the norms factorise: ||g_i a_i^T|| = ||g_i|| ||a_i||. With augmult the K
    rows of an example are its tokens: ||sum_k g_k a_k^T||^2 = sum_kl (g_k . g_l)(a_k . a_l). Keeps the
    input and output gradient (never larger than the per-sample gradients of a dense layer)."""
    a = activations[0].to(backprops.dtype)
    if a.dim() != 2:
        return generic_rule(layer, activations, backprops, views, keep)
    share = view_share(backprops, views)
    norms = {}
    if layer.weight.requires_grad:
        if views == 1:
            norms[layer.weight] = share.norm(2, dim=1) * a.norm(2, dim=1)
        else:
            g, x = views_as_tokens(share, views), views_as_tokens(a, views)
            gram = torch.einsum("bkp,blp->bkl", g, g) * torch.einsum("bkd,bld->bkl", x, x)
            norms[layer.weight] = gram.sum(dim=(1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = sum_views(share, views).norm(2, dim=1)

    def clipped_sum(coef):
        scaled = _scale(share, per_view(coef, views))
        grads = {}
        if layer.weight.requires_grad:
            grads[layer.weight] = scaled.t() @ a
        if layer.bias is not None and layer.bias.requires_grad:
            grads[layer.bias] = scaled.sum(dim=0)
        return grads

    return LayerBook(norms, clipped_sum, KEPT_FACTORS)


def conv_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
              views: int = 1, keep: str = "smaller") -> LayerBook:
    """Ghost norm or instantiated per-sample gradient, whichever the plan finds cheaper (with augmult, over
    the K*T positions of an example's views); then the smaller state (``keeps_per_sample``)."""
    x = activations[0].to(backprops.dtype)
    share = view_share(backprops, views)
    weight_norms = per_sample = None
    if layer.weight.requires_grad:
        weight_norms, per_sample = conv_weight_norms(layer, conv_plan(layer, x.shape, views=views), x, share, views)
    return _conv_book(layer, x, share, views, keep, weight_norms, per_sample)


def ws_conv_rule(layer: WSConv2d, activations: List[torch.Tensor], backprops: torch.Tensor,
                 views: int = 1, keep: str = "smaller") -> LayerBook:
    """Weight-standardized convolution: norms of the raw weight's per-sample gradients (ghost form or
    instantiated, ``dp_layers.weight_standardization``); the clipped sum is J^T of the clipped sum with
    respect to the standardized weight, J being the same for every example."""
    x = activations[0].to(backprops.dtype)
    share = view_share(backprops, views)
    weight_norms = raw = None
    if layer.weight.requires_grad:
        weight_norms, raw = ws_weight_norms(layer, x, share, views)
    return _conv_book(layer, x, share, views, keep, weight_norms, raw, standardized=True)


def generic_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
                 views: int = 1, keep: str = "smaller") -> LayerBook:
    """Any other layer: its registered Opacus grad sampler (or functorch) gives per-sample gradients,
    cheap for the small norm and affine layers this covers (with augmult, summed over each example's views)."""
    sampler = BookKeepingGradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
    per_row = sampler(layer, activations, view_share(backprops, views))
    per_sample = {p: sum_views(gs, views) for p, gs in per_row.items()}
    norms = {p: gs.reshape(len(gs), -1).norm(2, dim=1) for p, gs in per_sample.items()}
    return LayerBook(norms, _per_sample_part(per_sample), KEPT_PER_SAMPLE)


def _empty_batch_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
                      views: int = 1, keep: str = "smaller") -> LayerBook:
    params = [p for _, p in trainable_parameters(layer)]
    return LayerBook({p: backprops.new_zeros(0) for p in params},
                     lambda coef: {p: torch.zeros_like(p) for p in params}, KEPT_EMPTY)


def _rule_for(layer: nn.Module):
    if isinstance(layer, nn.Linear):
        return linear_rule
    if isinstance(layer, WSConv2d):
        return ws_conv_rule
    if isinstance(layer, CONV_TYPES) and not isinstance(layer.padding, str):
        return conv_rule
    return generic_rule


def covered_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters whose per-sample norm and clipped sum one recorded call of ``module``
    provides: its own (direct) parameters for the layers with a rule or a registered grad sampler
    (their trainable children are recorded themselves, ``iterate_submodules``), the whole subtree for
    the layers functorch handles (``ft_compute_per_sample_gradient`` differentiates all of them)."""
    direct = (isinstance(module, nn.Linear) or isinstance(module, CONV_TYPES)
              or type(module) in BookKeepingGradSampleModule.GRAD_SAMPLERS)
    return [p for p in module.parameters(recurse=not direct) if p.requires_grad]


@dataclass(eq=False)
class _Record:
    """One recorded layer call: its inputs (detached) until its output gradient arrives, then its book."""

    module: nn.Module
    activations: Optional[List[torch.Tensor]]
    output_like: tuple  # (shape, dtype, device) of the output: zeros stand in if it never gets a gradient
    recompute: bool = False  # over the layer budget: keep only its norms (``BookKeepingGradSampleModule``)
    book: Optional[LayerBook] = None


@dataclass(frozen=True)
class _Step:
    """What the output-gradient hooks need while ``clipped_backward`` runs its backward pass."""

    examples: int
    views: int
    scale: float
    second_pass: bool = False  # layers over the budget keep only their norms (their sums come from it)


class BookKeepingGradSampleModule(GradSampleModuleFastGradientClipping):
    """Opacus fast-gradient-clipping module that does the book-keeping (module doc).

    Forward hooks record each trainable layer's input and put a hook on its output.
    ``clipped_backward(per_sample_losses)`` then runs one backward pass towards the outputs of the layers that
    read no gradient-carrying input (and towards any model input that requires a gradient), which reaches
    every recorded output; no weight gradient is ever formed. As each output's gradient arrives its hook
    applies the layer's rule and frees what the layer no longer needs (``LayerBook``). Once the pass is done
    it leaves ``sum_i c_i g_i`` in every parameter's ``.grad``, as the second backward pass of ghost clipping
    would, releasing each layer's state as soon as its sum is taken.

    ``keep`` chooses what layers with instantiated per-sample gradients keep (``keeps_per_sample``).
    ``layer_budget_mb`` trades time for memory, per layer and explicitly: a layer whose kept state for the
    batch would exceed it (``planned_state``) keeps only its norms, and its clipped sum comes from a second
    backward pass of ``sum_i c_i loss_i`` over the retained graph (ghost clipping's way, Li et al. 2022);
    with no budget (the default) there is no second pass.

    Models whose parameters are not covered by exactly one recorded layer call (shared or tied weights, a
    trainable layer in eval mode or unused) are refused with ``UnsupportedModelError``: at every step by
    ``clipped_backward`` before it touches a gradient, and before training by ``probe(example)``.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 max_grad_norm: float = 1.0, strict: bool = True, keep: str = "smaller",
                 layer_budget_mb: Optional[float] = None):
        keeps_per_sample(keep, 0, 0)  # refuse an unknown policy now, not at the first step
        self.keep, self.layer_budget_mb = keep, layer_budget_mb
        self._records: List[_Record] = []
        self._sources: List[torch.Tensor] = []  # where the backward pass must arrive (``_record_layer``)
        self._step: Optional[_Step] = None  # set while clipped_backward's backward pass runs
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
                         max_grad_norm=max_grad_norm, use_ghost_clipping=True)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Forward hooks only: the backward work happens in the output hooks they register."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for module in self.iterate_submodules(self._module):
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(self._record_layer))
        self.enable_hooks()

    def forward(self, *args, **kwargs):
        """The model's forward pass; a model input that requires a gradient becomes a target of the backward
        pass, so that layers reached only through it still get their output gradients."""
        recorded = len(self._records)
        output = super().forward(*args, **kwargs)
        if len(self._records) > recorded:
            self._add_sources(t for t in (*args, *kwargs.values())
                              if isinstance(t, torch.Tensor) and t.requires_grad)
        return output

    def _add_sources(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            if not any(tensor is known for known in self._sources):
                self._sources.append(tensor)

    def _record_layer(self, module: nn.Module, inputs, output) -> None:
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled() and requires_grad(module)):
            return
        record = _Record(module, [t.detach() for t in inputs], (output.shape, output.dtype, output.device),
                         recompute=self._over_budget(module, inputs, output))
        self._records.append(record)
        if not output.requires_grad:
            return
        # A layer whose inputs carry no gradient starts a path of the backward pass: aiming the pass at its
        # output reaches every recorded output downstream (any trainable parameter upstream of a layer is
        # covered by a recorded call, ``check_records``), without capturing any other output gradient.
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            self._sources.append(output)
        output.register_hook(functools.partial(self._on_output_gradient, record))

    def _over_budget(self, module: nn.Module, inputs, output: torch.Tensor) -> bool:
        if self.layer_budget_mb is None:
            return False
        _, numel = planned_state(module, tuple(inputs[0].shape), tuple(output.shape), current_views(), self.keep)
        return numel * output.element_size() > self.layer_budget_mb * 2 ** 20

    def _on_output_gradient(self, record: _Record, grad: torch.Tensor) -> None:
        """Autograd hands over a recorded output's gradient: do the layer's book-keeping now, so that its
        input and output gradient are freed unless its clipped sum needs them."""
        if self._step is not None and record.book is None:
            self._book(record, grad, self._step)

    def _book(self, record: _Record, grad: torch.Tensor, step: _Step) -> None:
        # Per-view gradients of the per-view losses (as Opacus's hooks scale them); each rule takes 1/K of
        # them as the view's share of its example's gradient. A new tensor: autograd may hand the same
        # gradient to two outputs (a residual block's branches), so nothing here may scale in place.
        # Under bf16 autocast (--precision bf16) the input and output gradient are upcast to the parameters'
        # float32 first: norms, clipping factors and clipped sums are all taken in float32.
        dtype = next(p.dtype for p in record.module.parameters())
        backprops = grad.detach().to(dtype) * step.scale
        activations = [a.to(dtype) if a.is_floating_point() else a for a in record.activations]
        rule = _empty_batch_rule if step.examples == 0 else _rule_for(record.module)
        book = rule(record.module, activations, backprops, step.views, self.keep)
        if record.recompute and step.second_pass:
            book = LayerBook(book.norms, None, KEPT_NOTHING)  # its state is freed here
        record.book, record.activations = book, None

    def clipped_backward(self, per_sample_losses: torch.Tensor) -> None:
        records, self._records = self._records, []  # a refused step must not poison the next one
        sources, self._sources = self._sources, []
        self.check_records(records)  # before any .grad or _norm_sample is touched: a refused step changes nothing
        n, views = per_sample_losses.shape[0], current_views()  # examples; augmult views of each (dp_layers.augmult)
        backward = n > 0 and bool(sources) and per_sample_losses.requires_grad
        second_pass = backward and any(record.recompute for record in records)
        step = _Step(examples=n, views=views, scale=n * views if self.loss_reduction == "mean" else views,
                     second_pass=second_pass)
        if backward:
            reduced = per_sample_losses.mean() if self.loss_reduction == "mean" else per_sample_losses.sum()
            self._step = step
            try:  # the hooks do the work
                torch.autograd.grad(reduced, sources, allow_unused=True, retain_graph=second_pass)
            finally:
                self._step = None
        for record in records:
            if record.book is None:  # its output does not reach the loss (or the batch is empty): no gradient
                shape, dtype, device = record.output_like
                self._book(record, torch.zeros(shape, dtype=dtype, device=device), step)
            for param, norm in record.book.norms.items():
                param._norm_sample = norm
        coef = self.get_clipping_coef()
        if second_pass:
            self._recompute_clipped_sums(records, per_sample_losses, coef)
        for record in records:
            book, record.book = record.book, None  # each layer's state goes as soon as its sum is taken
            if book.clipped_sum is not None:
                self._add_clipped_sum(book, coef)
            del book

    @staticmethod
    def _add_clipped_sum(book: LayerBook, coef: torch.Tensor) -> None:
        """Add a layer's clipped sum to its parameters' ``.grad`` (the seam tests use to audit, example by
        example, what the sum is made of)."""
        for param, grad in book.clipped_sum(coef).items():
            param.grad = grad if param.grad is None else param.grad + grad

    @staticmethod
    def _recompute_clipped_sums(records: List[_Record], per_sample_losses: torch.Tensor,
                                coef: torch.Tensor) -> None:
        """The clipped sums of the layers over the budget: the gradient of sum_i c_i loss_i (c_i fixed) with
        respect to their parameters alone, from the graph the first pass retained (then released)."""
        params = [p for record in records if record.book.clipped_sum is None for p in record.book.norms]
        weighted = (coef.to(per_sample_losses.dtype) * per_sample_losses).sum()
        grads = torch.autograd.grad(weighted, params, allow_unused=True)
        for param, grad in zip(params, grads):
            grad = torch.zeros_like(param) if grad is None else grad
            param.grad = grad if param.grad is None else param.grad + grad

    def check_records(self, records: Iterable[_Record]) -> None:
        """Refuse (``UnsupportedModelError``) unless the step's records cover every trainable parameter of
        the model exactly once.

        Book-keeping (Bu et al. 2023) takes a parameter's per-sample gradient norm from the one layer call
        that produced it. A parameter reached by two calls (a layer called twice in a forward pass, or a
        Parameter shared by two modules) would get the norm of the last call only while both calls'
        clipped sums reach ``.grad``: the update would exceed the bound ``C`` per example (up to about
        twice it). Opacus's ghost clipping refuses such models for the same reason ("Parameter tying is not
        supported with Ghost Clipping"). A trainable parameter that no call covers (its layer is in eval
        mode, so the forward hook does not record it, or it is unused in the forward pass) would keep the
        ``_norm_sample`` of an earlier step and be clipped with a stale norm. Frozen parameters
        (``requires_grad`` False) are neither clipped nor required; but they must have been frozen before
        the model was wrapped, since Opacus's clipping factor (``get_norm_sample``) counts the norms of the
        parameters that were trainable then (a parameter unfrozen later would reach ``.grad`` unbounded,
        one frozen later would add a stale norm).
        """
        records = list(records)
        owners: Dict[int, List[nn.Module]] = {}  # id(param) -> the layer calls that cover it, in call order
        for record in records:
            for param in covered_parameters(record.module):
                owners.setdefault(id(param), []).append(record.module)
        trainable = [param for _, param in trainable_parameters(self._module)]
        shared = [param for param in trainable if len(owners.get(id(param), ())) > 1]
        if shared:
            names, module_names = self._parameter_names(), self._module_names()
            details = "; ".join(
                f"parameter {' = '.join(repr(n) for n in names[id(param)])} is used by {len(owners[id(param)])} "
                f"layer calls ({', '.join(repr(module_names.get(id(m), type(m).__name__)) for m in owners[id(param)])})"
                for param in shared)
            raise UnsupportedModelError(f"{SHARED_PARAMETER_ADVICE}: {details}")
        # Opacus's clipping factor (get_norm_sample) counts the parameters trainable when the model was wrapped.
        counted = {id(param) for param in self.trainable_parameters}
        changed = [param for param in trainable if id(param) not in counted]
        changed += [param for param in self.trainable_parameters if not param.requires_grad]
        if changed:
            names = self._parameter_names()
            raise UnsupportedModelError(
                f"book-keeping cannot clip parameters whose requires_grad changed after the model was wrapped "
                f"({', '.join(repr(names.get(id(p), ['?'])[0]) for p in changed)}): the clipping factor would "
                f"count stale norms or miss gradients; freeze or unfreeze parameters before wrapping the model")
        missing = [param for param in trainable if id(param) not in owners]
        if missing:
            raise UnsupportedModelError(self._unrecorded_message(missing, bool(records)))

    def _module_names(self) -> Dict[int, str]:
        return {id(m): name or type(m).__name__ for name, m in self._module.named_modules(remove_duplicate=False)}

    def _parameter_names(self) -> Dict[int, List[str]]:
        names: Dict[int, List[str]] = {}
        for name, param in self._module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        return names

    def _unrecorded_message(self, missing: List[nn.Parameter], anything_recorded: bool) -> str:
        missing_ids = {id(p) for p in missing}
        layers = []  # (layer name, layer, its uncovered parameter names), in model order
        for name, module in self._module.named_modules():
            own = [f"{name}.{pname}" if name else pname for pname, p in module.named_parameters(recurse=False)
                   if id(p) in missing_ids]
            if own:
                layers.append((name or type(module).__name__, module, own))
        parts = []
        for name, module, own in layers[:5]:
            state = "eval mode" if not module.training else "train mode but produced no record"
            parts.append(f"trainable submodule {name!r} is in eval mode (or unused in forward) [it is in {state}; "
                         f"parameters {', '.join(own)}]")
        more = f"; and {len(layers) - 5} more layers" if len(layers) > 5 else ""
        hint = "" if anything_recorded else (" (no layer call was recorded at all: the model is in eval mode, the "
                                             "forward ran under torch.no_grad, or the hooks are disabled)")
        return (f"book-keeping cannot clip parameters no layer call recorded{hint}: {'; '.join(parts)}{more}: "
                f"{UNRECORDED_ADVICE}")

    def probe(self, example: torch.Tensor) -> None:
        """Refuse an unsupported model before training starts: one forward pass of ``example`` (e.g.
        ``torch.zeros(1, C, H, W)``, moved to the parameters' device and floating dtype) with gradients
        enabled and the hooks on, in the module's current train/eval mode, then ``check_records`` on the
        records it made. Raises ``UnsupportedModelError`` as ``clipped_backward`` would.

        Leaves nothing behind, also when it raises: its records are dropped (any earlier ones kept), no
        backward is run (no ``.grad``, no ``_norm_sample``), buffers, the hook switch and the random number
        generators are restored, so a training run is the same with or without the probe.
        """
        first = next(self._module.parameters(), None)
        if first is not None:
            example = example.to(device=first.device,
                                 dtype=first.dtype if example.is_floating_point() and first.is_floating_point()
                                 else None)
        earlier, self._records = self._records, []
        earlier_sources, self._sources = self._sources, []
        hooks_were_enabled = self.hooks_enabled
        buffers = [(b, b.detach().clone()) for b in self._module.buffers()]
        devices = [example.device.index if example.device.index is not None else torch.cuda.current_device()] \
            if example.is_cuda else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                self.enable_hooks()
                self._module(example)
            self.check_records(self._records)
        finally:
            self._records, self._sources = earlier, earlier_sources
            self.hooks_enabled = hooks_were_enabled
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


class BookKeepingLoss:
    """The criterion for ``BookKeepingGradSampleModule``: ``criterion(logits, labels).backward()`` runs the
    one book-keeping backward pass (the same contract as Opacus's ``DPLossFastGradientClipping``)."""

    def __init__(self, module: BookKeepingGradSampleModule, criterion: nn.Module):
        self.module, self.criterion = module, criterion

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> "_BookKeepingTensor":
        reduction = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            per_sample = self.criterion(logits, labels)
        finally:
            self.criterion.reduction = reduction
        return _BookKeepingTensor(self.module, per_sample)


class _BookKeepingTensor:
    def __init__(self, module: BookKeepingGradSampleModule, per_sample_losses: torch.Tensor):
        self.module, self.per_sample_losses = module, per_sample_losses

    def backward(self) -> None:
        self.module.clipped_backward(self.per_sample_losses)

    def detach(self) -> torch.Tensor:
        return self.per_sample_losses.detach().mean()

    def item(self) -> float:
        return self.detach().item()
