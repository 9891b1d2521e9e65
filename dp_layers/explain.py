"""What each engine does, layer by layer: the table behind ``vision.py --explain-engine``."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dp_layers.bk import KEPT_NOTHING, planned_state
from dp_layers.norm_rules import CONV_TYPES, OPACUS_NORM_SAMPLERS, conv_plan
from dp_layers.public_bn import collecting_public_statistics
from src.engines import ENGINES


def layer_shapes(model: nn.Module, image_shape: tuple) -> dict:
    """(input shape, output shape), without batch, of every module, from one forward pass of a blank image
    on a copy (the copy's public BatchNorm statistics come from that image, so the real model is untouched)."""
    probe = copy.deepcopy(model).eval()
    shapes, handles = {}, []
    for name, module in probe.named_modules():
        def record(_module, inputs, output, name=name):
            shapes[name] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]) if torch.is_tensor(output) else ())
        handles.append(module.register_forward_hook(record))
    with torch.no_grad(), collecting_public_statistics(probe):
        probe(torch.zeros(1, *image_shape))
    for handle in handles:
        handle.remove()
    return shapes


def _method(engine: str, module: nn.Module, input_shape: tuple, views: int = 1) -> str:
    if engine == "non-private":
        return "no per-sample gradients"
    if ENGINES[engine].per_sample_gradients:
        return f"per-sample gradient ({ENGINES[engine].per_sample_gradients})"
    if engine == "ghost" and type(module) not in OPACUS_NORM_SAMPLERS:
        return "per-sample gradient, then its norm (stock Opacus ghost has no rule for this layer)"
    if isinstance(module, nn.Linear):
        return "ghost norm ‖g‖·‖a‖"
    if isinstance(module, CONV_TYPES):
        plan = conv_plan(module, input_shape, views=views)  # the views are more positions: the run's choice
        gram = ", shifted input Gram" if plan.method == "ghost" and plan.input_gram == "shifted" else ""
        return (f"{plan.method}{gram} (T={plan.positions}, d={plan.inputs_per_group}, p={plan.outputs_per_group}; "
                f"ghost {plan.ghost_cost:.3g} vs instantiate {plan.instantiate_cost:.3g} MACs/example)")
    return "per-sample gradient, then its norm (a few parameters per channel)"


@dataclass(frozen=True)
class BookKeepingOptions:
    """The run settings that decide bk's kept state: physical batch (examples), augmult views, policy, budget."""

    batch: int
    views: int = 1
    keep: str = "smaller"
    layer_budget_mb: Optional[float] = None


def _kept(module: nn.Module, input_shape: tuple, output_shape: tuple, book_keeping: BookKeepingOptions) -> str:
    """What bk keeps for this layer's clipped sum, for the run's physical batch (``dp_layers.bk``)."""
    rows = book_keeping.batch * book_keeping.views
    kept, numel = planned_state(module, (rows, *input_shape), (rows, *output_shape), book_keeping.views,
                                book_keeping.keep)
    megabytes = numel * 4 / 2 ** 20  # float32
    if book_keeping.layer_budget_mb is not None and megabytes > book_keeping.layer_budget_mb:
        return f"{KEPT_NOTHING} ({megabytes:.3g} MB over the budget)"
    return f"{kept} ({numel // book_keeping.batch} numbers/example, {megabytes:.3g} MB)"


def describe_layers(model: nn.Module, image_shape: tuple, engine: str,
                    book_keeping: Optional[BookKeepingOptions] = None) -> list:
    """One row per layer with trainable parameters: name, type, input shape, parameters, method, and for bk
    (given ``book_keeping``) what the layer keeps until its clipped sum."""
    shapes = layer_shapes(model, image_shape)
    rows = []
    for name, module in model.named_modules():
        params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if params:
            input_shape, output_shape = shapes[name]
            row = {"layer": name, "type": type(module).__name__, "input": "x".join(map(str, input_shape)),
                   "parameters": params,
                   "method": _method(engine, module, input_shape, book_keeping.views if book_keeping else 1)}
            if engine == "bk" and book_keeping is not None:
                row["kept"] = _kept(module, input_shape, output_shape, book_keeping)
            rows.append(row)
    return rows
