"""The per-sample gradient engines, one record each: the single list every flag, table, benchmark and audit
reads (torch-free, for the flag parser).

Opacus's own modes (hooks, functorch, ghost) attach through ``PrivacyEngine.make_private``; mixed-ghost is
Opacus's ghost mode with this project's norm rules for every layer (``dp_layers.norm_rules``); bk is the
book-keeping module (``dp_layers.bk``, Bu et al. 2023), attached from the same Opacus parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Engine:
    name: str
    label: str  # for benchmark tables and figures
    summary: str  # one line for --explain-engine
    private: bool = True
    opacus_mode: Optional[str] = None  # make_private's grad_sample_mode; None: attached by this project
    per_sample_gradients: Optional[str] = None  # how every layer's per-sample gradient is formed, if it is


ENGINES = {engine.name: engine for engine in (
    Engine("hooks", "Opacus hooks",
           "Opacus hooks: every layer materialises per-sample gradients; one backward pass.",
           opacus_mode="hooks", per_sample_gradients="Opacus grad sampler"),
    Engine("functorch", "Opacus functorch",
           "Opacus functorch: per-sample gradients by vmap; one backward pass.",
           opacus_mode="functorch", per_sample_gradients="functorch vmap"),
    Engine("ghost", "Opacus ghost (stock)",
           "Opacus ghost clipping as shipped: norm rules for Linear/Embedding only; two backward passes.",
           opacus_mode="ghost"),
    Engine("mixed-ghost", "mixed ghost (ours)",
           "Ghost clipping with a norm rule for every layer (conv: ghost or instantiate, whichever costs less "
           "for its input shape); two backward passes.",
           opacus_mode="ghost"),
    Engine("bk", "book-keeping (ours)",
           "Book-keeping: the same per-layer norms during one input-gradient-only backward pass, then each "
           "layer's clipped gradient sum from what it kept (Bu et al. 2023)."),
    Engine("non-private", "non-private",
           "Plain training: no per-sample gradients, no clipping, no noise.", private=False),
)}
ENGINE_NAMES = tuple(ENGINES)
# bk: what a layer that formed its per-sample gradients (for its norm) keeps until its clipped sum
# (``dp_layers.bk.keeps_per_sample``); the first is the default.
BK_KEEP_POLICIES = ("smaller", "per-sample", "factors")
PRIVATE_ENGINES = tuple(name for name, engine in ENGINES.items() if engine.private)
