"""Book-keeping DP-SGD (Bu et al. 2023): clipped gradients from one backward pass.

Ghost clipping needs two backward passes: one for the per-sample norms, one for the reweighted loss.
Book-keeping needs one, and not even a full one: autograd is asked for the gradients of the trainable
layers' outputs only, so it propagates output gradients through the network but never forms a weight
gradient (nor the input gradient of the first layer). Each layer then computes its per-sample gradient
norms (ghost or instantiated, ``dp_layers.norm_rules``) from its recorded input and output gradient, and
keeps what its clipped gradient sum needs: the per-sample gradients where they were instantiated (early,
wide-image layers), or its input and output gradient where the ghost norm was used. Once all norms are
known, every layer's ``sum_i c_i g_i`` is one weight-gradient computation with the output gradients
scaled by the clipping factors ``c_i``.

It plugs into Opacus as a ``GradSampleModuleFastGradientClipping`` subclass, so Opacus's DP optimizer
adds the noise and its accountant counts the steps.

Book-keeping needs every trainable parameter to be covered by exactly one recorded layer call: its
per-sample norm is that call's norm, and that call's clipped sum is its gradient. Models that break this
(a layer called twice, tied weights, a trainable layer in eval mode or unused) are refused with
``UnsupportedModelError`` before any gradient is touched (``BookKeepingGradSampleModule.check_records``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.utils.module_utils import requires_grad, trainable_parameters
from torch import nn

from dp_layers.augmult import current_views, per_view, sum_views, view_share, views_as_tokens
from dp_layers.norm_rules import CONV_TYPES, conv_bias_per_sample, conv_plan, conv_weight_norms
from dp_layers.weight_standardization import WSConv2d, raw_weight_gradient, ws_weight_norms

ClippedSum = Callable[[torch.Tensor], Dict[nn.Parameter, torch.Tensor]]
CONV_WEIGHT_GRADIENT = {nn.Conv1d: torch.nn.grad.conv1d_weight, nn.Conv2d: torch.nn.grad.conv2d_weight,
                        nn.Conv3d: torch.nn.grad.conv3d_weight}


class UnsupportedModelError(ValueError):
    """A model that book-keeping would clip wrongly, so that the update would no longer be bounded by the
    clipping norm (and the DP guarantee would not hold). Raised before any gradient is modified."""


SHARED_PARAMETER_ADVICE = ("book-keeping cannot clip a parameter used by more than one layer call (shared or tied "
                           "weights); use --engine hooks or functorch")
UNRECORDED_ADVICE = ("its per-sample norms would be stale; put it in train mode or freeze its parameters "
                     "(requires_grad=False)")


def _weighted_sum(per_sample: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return torch.einsum("b,b...->...", coef.to(per_sample.dtype), per_sample)


def _scale(backprops: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return backprops * coef.to(backprops.dtype).view(-1, *([1] * (backprops.dim() - 1)))


def linear_rule(layer: nn.Linear, activations: List[torch.Tensor], backprops: torch.Tensor,
                views: int = 1) -> tuple:
    """For (B, features) inputs the norms factorise: ||g_i a_i^T|| = ||g_i|| ||a_i||. With augmult the K
    rows of an example are its tokens: ||sum_k g_k a_k^T||^2 = sum_kl (g_k . g_l)(a_k . a_l)."""
    a = activations[0].to(backprops.dtype)
    if a.dim() != 2:
        return generic_rule(layer, activations, backprops, views)
    backprops = view_share(backprops, views)
    norms = {}
    if layer.weight.requires_grad:
        if views == 1:
            norms[layer.weight] = backprops.norm(2, dim=1) * a.norm(2, dim=1)
        else:
            g, x = views_as_tokens(backprops, views), views_as_tokens(a, views)
            gram = torch.einsum("bkp,blp->bkl", g, g) * torch.einsum("bkd,bld->bkl", x, x)
            norms[layer.weight] = gram.sum(dim=(1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = sum_views(backprops, views).norm(2, dim=1)

    def clipped_sum(coef):
        scaled = _scale(backprops, per_view(coef, views))
        grads = {}
        if layer.weight.requires_grad:
            grads[layer.weight] = scaled.t() @ a
        if layer.bias is not None and layer.bias.requires_grad:
            grads[layer.bias] = scaled.sum(dim=0)
        return grads

    return norms, clipped_sum


def conv_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
              views: int = 1) -> tuple:
    """Ghost norm or instantiated per-sample gradient, whichever the plan finds cheaper (with augmult, over
    the K*T positions of an example's views)."""
    x = activations[0].to(backprops.dtype)
    backprops = view_share(backprops, views)
    plan = conv_plan(layer, x.shape, views=views)
    norms, per_sample = {}, None
    if layer.weight.requires_grad:
        norms[layer.weight], per_sample = conv_weight_norms(layer, plan, x, backprops, views)
    bias_per_sample = None
    if layer.bias is not None and layer.bias.requires_grad:
        bias_per_sample = conv_bias_per_sample(backprops, views)
        norms[layer.bias] = bias_per_sample.norm(2, dim=1)

    def clipped_sum(coef):
        grads = {}
        if layer.weight.requires_grad:
            if per_sample is not None:
                grads[layer.weight] = _weighted_sum(per_sample, coef).reshape(layer.weight.shape)
            else:
                grads[layer.weight] = CONV_WEIGHT_GRADIENT[type(layer)](
                    x, layer.weight.shape, _scale(backprops, per_view(coef, views)), stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        if bias_per_sample is not None:
            grads[layer.bias] = _weighted_sum(bias_per_sample, coef)
        return grads

    return norms, clipped_sum


def ws_conv_rule(layer: WSConv2d, activations: List[torch.Tensor], backprops: torch.Tensor,
                 views: int = 1) -> tuple:
    """Weight-standardized convolution: norms of the raw weight's per-sample gradients (ghost form or
    instantiated, ``dp_layers.weight_standardization``); the clipped sum is J^T of the clipped sum with
    respect to the standardized weight, J being the same for every example."""
    x = activations[0].to(backprops.dtype)
    share = view_share(backprops, views)
    weight_norms, raw = ws_weight_norms(layer, x, share, views)
    norms, bias_per_sample = {}, None
    if layer.weight.requires_grad:
        norms[layer.weight] = weight_norms
    if layer.bias is not None and layer.bias.requires_grad:
        bias_per_sample = conv_bias_per_sample(share, views)
        norms[layer.bias] = bias_per_sample.norm(2, dim=1)

    def clipped_sum(coef):
        grads = {}
        if layer.weight.requires_grad:
            if raw is not None:
                grads[layer.weight] = _weighted_sum(raw, coef)
            else:
                summed = CONV_WEIGHT_GRADIENT[nn.Conv2d](
                    x, layer.weight.shape, _scale(share, per_view(coef, views)), stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
                grads[layer.weight] = raw_weight_gradient(layer, summed.unsqueeze(0))[0]
        if bias_per_sample is not None:
            grads[layer.bias] = _weighted_sum(bias_per_sample, coef)
        return grads

    return norms, clipped_sum


def generic_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
                 views: int = 1) -> tuple:
    """Any other layer: its registered Opacus grad sampler (or functorch) gives per-sample gradients,
    cheap for the small norm and affine layers this covers (with augmult, summed over each example's views)."""
    sampler = BookKeepingGradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
    per_row = sampler(layer, activations, view_share(backprops, views))
    per_sample = {p: sum_views(gs, views) for p, gs in per_row.items()}
    norms = {p: gs.reshape(len(gs), -1).norm(2, dim=1) for p, gs in per_sample.items()}
    return norms, lambda coef: {p: _weighted_sum(gs, coef) for p, gs in per_sample.items()}


def _empty_batch_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
                      views: int = 1) -> tuple:
    params = [p for _, p in trainable_parameters(layer)]

    def clipped_sum(coef):
        return {p: torch.zeros_like(p) for p in params}

    return {p: backprops.new_zeros(0) for p in params}, clipped_sum


def _rule_for(layer: nn.Module):
    if isinstance(layer, nn.Linear):
        return linear_rule
    if isinstance(layer, WSConv2d):
        return ws_conv_rule
    if isinstance(layer, CONV_TYPES) and not isinstance(layer.padding, str):
        return conv_rule
    return generic_rule


class BookKeepingGradSampleModule(GradSampleModuleFastGradientClipping):
    """Opacus fast-gradient-clipping module that does the book-keeping (module doc).

    Forward hooks record each trainable layer's input and output. ``clipped_backward(per_sample_losses)``
    then asks autograd for the gradients of those outputs alone (so no weight gradient and no input
    gradient of the first layer is ever formed), applies each layer's rule, and leaves ``sum_i c_i g_i``
    in every parameter's ``.grad``, as the second backward pass of ghost clipping would.

    Models whose parameters are not covered by exactly one recorded layer call (shared or tied weights, a
    trainable layer in eval mode or unused) are refused with ``UnsupportedModelError``: at every step by
    ``clipped_backward`` before it touches a gradient, and before training by ``probe(example)``.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 max_grad_norm: float = 1.0, strict: bool = True):
        self._records: List[tuple] = []
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
                         max_grad_norm=max_grad_norm, use_ghost_clipping=True)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Forward hooks only: the backward work happens in ``clipped_backward``."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for module in self.iterate_submodules(self._module):
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(self._record_layer))
        self.enable_hooks()

    def _record_layer(self, module: nn.Module, inputs, output) -> None:
        if self.hooks_enabled and module.training and torch.is_grad_enabled() and requires_grad(module):
            self._records.append((module, [t.detach() for t in inputs], output))

    def clipped_backward(self, per_sample_losses: torch.Tensor) -> None:
        records, self._records = self._records, []  # a refused step must not poison the next one
        self.check_records(records)  # before any .grad or _norm_sample is touched: a refused step changes nothing
        n, views = per_sample_losses.shape[0], current_views()  # examples; augmult views of each (dp_layers.augmult)
        reduced = per_sample_losses.mean() if self.loss_reduction == "mean" else per_sample_losses.sum()
        output_grads = torch.autograd.grad(reduced, [output for _, _, output in records], allow_unused=True)
        # Per-view gradients of the per-view losses (as Opacus's hooks scale them); each rule takes 1/K of
        # them as the view's share of its example's gradient.
        scale = n * views if self.loss_reduction == "mean" else views
        clipped_sums = []
        for (module, activations, output), grad in zip(records, output_grads):
            backprops = torch.zeros_like(output) if grad is None else grad.detach() * scale
            rule = _empty_batch_rule if n == 0 else _rule_for(module)
            norms, clipped_sum = rule(module, activations, backprops, views)
            for param, norm in norms.items():
                param._norm_sample = norm
            clipped_sums.append(clipped_sum)
        coef = self.get_clipping_coef()
        for clipped_sum in clipped_sums:
            for param, grad in clipped_sum(coef).items():
                param.grad = grad if param.grad is None else param.grad + grad

    def _covered_parameters(self, module: nn.Module) -> List[nn.Parameter]:
        """The trainable parameters whose per-sample norm and clipped sum one recorded call of ``module``
        provides: its own (direct) parameters for the layers with a rule or a registered grad sampler
        (their trainable children are recorded themselves, ``iterate_submodules``), the whole subtree for
        the layers functorch handles (``ft_compute_per_sample_gradient`` differentiates all of them)."""
        direct = (isinstance(module, nn.Linear) or isinstance(module, CONV_TYPES)
                  or type(module) in BookKeepingGradSampleModule.GRAD_SAMPLERS)
        return [p for p in module.parameters(recurse=not direct) if p.requires_grad]

    def check_records(self, records: Iterable[tuple]) -> None:
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
        for module, _, _ in records:
            for param in self._covered_parameters(module):
                owners.setdefault(id(param), []).append(module)
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
            self._records = earlier
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
