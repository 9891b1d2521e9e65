"""Peer engines for ``python -m benchmarks.engines --peers``: other public implementations of efficient exact
per-sample clipping, run on the same model, data and initial weights as our engines, when importable.

- fastDP 2.0 (Bu et al., github.com/awslabs/fast-differential-privacy): book-keeping with its mixed
  ghost/instantiate choice (``clipping_mode="MixOpt"``), as shipped and with ``origin_params`` (the first
  layer's parameters, so that autograd skips that layer's input gradient, as our bk does);
- private_vision (Bu et al., "Scalable and efficient training of large convolutional neural networks with
  differential privacy", github.com/woodyx218/private_vision): mixed ghost clipping, two backward passes.

They are not dependencies: install them (their packages import Hugging Face ``transformers``) or put their
repositories on ``PYTHONPATH``. A peer that is not importable gives a row saying so. Each step is the peer's
own training step (forward, its backward, clipping, noise at multiplier 1, SGD with momentum), standard
clipping at C = 1 (``clipping_fn="Abadi"``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PEERS = {
    "fastdp": "fastDP 2.0 BK-MixOpt",
    "fastdp-origin": "fastDP BK-MixOpt + origin_params",
    "private-vision": "private_vision mixed ghost",
}
SOURCES = {"fastdp": "fastDP", "fastdp-origin": "fastDP", "private-vision": "private_vision"}


def peer_step(peer: str, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              sample_size: int) -> Callable[[], None]:
    """The peer's DP-SGD step on ``model`` for the physical batch ``images``, ``labels`` (one logical batch)."""
    package = SOURCES[peer]
    try:
        engine_class = getattr(__import__(package), "PrivacyEngine")
    except ImportError as error:
        raise RuntimeError(f"{package} is not importable here ({error})") from None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    common = {"batch_size": len(images), "sample_size": sample_size, "epochs": 1, "noise_multiplier": 1.0,
              "max_grad_norm": 1.0}
    if peer == "private-vision":
        engine = engine_class(model, ghost_clipping=True, mixed=True, **common)
        engine.attach(optimizer)

        def step():
            optimizer.zero_grad()
            optimizer.step(loss=F.cross_entropy(model(images), labels, reduction="none"))

        return step
    first_layer = next(name for name, _ in model.named_parameters()).rsplit(".", 1)[0]
    engine = engine_class(model, clipping_fn="Abadi", clipping_mode="MixOpt", clipping_style="all-layer",
                          origin_params=[first_layer] if peer == "fastdp-origin" else None, **common)
    engine.attach(optimizer)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step
