"""What each engine does, layer by layer: the table behind ``vision.py --explain-engine``."""
from __future__ import annotations

import copy

import torch
from torch import nn

from dp_layers.norm_rules import CONV_TYPES, OPACUS_NORM_SAMPLERS, conv_plan
from dp_layers.public_bn import collecting_public_statistics
from src.engines import ENGINES


def layer_input_shapes(model: nn.Module, image_shape: tuple) -> dict:
    """Input shape (without batch) of every module, from one forward pass of a blank image on a copy
    (the copy's public BatchNorm statistics come from that image, so the real model is untouched)."""
    probe = copy.deepcopy(model).eval()
    shapes, handles = {}, []
    for name, module in probe.named_modules():
        def record(_module, inputs, _output, name=name):
            shapes[name] = tuple(inputs[0].shape[1:])
        handles.append(module.register_forward_hook(record))
    with torch.no_grad(), collecting_public_statistics(probe):
        probe(torch.zeros(1, *image_shape))
    for handle in handles:
        handle.remove()
    return shapes


def _method(engine: str, module: nn.Module, input_shape: tuple) -> str:
    if engine == "non-private":
        return "no per-sample gradients"
    if ENGINES[engine].per_sample_gradients:
        return f"per-sample gradient ({ENGINES[engine].per_sample_gradients})"
    if engine == "ghost" and type(module) not in OPACUS_NORM_SAMPLERS:
        return "per-sample gradient, then its norm (stock Opacus ghost has no rule for this layer)"
    if isinstance(module, nn.Linear):
        return "ghost norm ‖g‖·‖a‖"
    if isinstance(module, CONV_TYPES):
        plan = conv_plan(module, input_shape)
        return (f"{plan.method} (T={plan.positions}, d={plan.inputs_per_group}, p={plan.outputs_per_group}; "
                f"ghost {plan.ghost_cost:.3g} vs instantiate {plan.instantiate_cost:.3g} MACs/example)")
    return "per-sample gradient, then its norm (a few parameters per channel)"


def describe_layers(model: nn.Module, image_shape: tuple, engine: str) -> list:
    """One row per layer with trainable parameters: name, type, input shape, parameters, method."""
    shapes = layer_input_shapes(model, image_shape)
    rows = []
    for name, module in model.named_modules():
        params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if params:
            rows.append({"layer": name, "type": type(module).__name__, "input": "x".join(map(str, shapes[name])),
                         "parameters": params, "method": _method(engine, module, shapes[name])})
    return rows
