"""The run's side of ``--norm bn-dp`` (the mechanism is ``dp_layers.dp_bn``): which features it reads, which
random stream draws its noise, and that it happens once.

- The features: the private training set's only (``data.train``, after the validation and public hold-outs are
  removed), from the feature cache (``src.feature_cache``: computed once per machine, also when training itself
  computes features on the fly for augmentation or robust training). Never the validation or test sets.
- The noise: the run's DP noise stream (its first draws, before DP-SGD's), or Opacus's CSPRNG with
  ``--secure-rng``. A resumed run does not estimate again: its checkpoint holds the released statistics, and a
  second estimate would be a second release.
- Several processes: rank 0 estimates and broadcasts the released (noisy) statistics, so all ranks normalize
  alike and the noise is drawn once.
- What is printed is computed from the released statistics only (how many channels sit at the variance floor).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dp_layers import dp_bn
from src.distributed import Ranks, broadcast
from src.feature_cache import split_features

BATCH = 1024  # feature rows per step of the sums (CIFAR-10: 16 MB)


def uses_private_statistics(config) -> bool:
    return config.model.norm == "bn-dp"


def release_statistics(model: torch.nn.Module, data, config, dataset: str, device: torch.device, *, n: int,
                       generator: Optional[torch.Generator], ranks: Ranks,
                       features: Optional[torch.Tensor] = None) -> Optional[dp_bn.ReleasedStatistics]:
    """Estimate (on rank 0), broadcast and set ``model``'s bn-dp statistics; the released statistics.
    ``features``: the private training set's, when training already holds them (cached features)."""
    statistics = None
    if ranks.is_main:
        if features is None:
            # the ScatterNet itself, also inside a wrapper (the white-box audit's canary probe)
            scatternet = next(m for m in model.modules() if hasattr(m, "scattering"))
            features = split_features(scatternet, data.train, "train", dataset, Path(config.data.data_root),
                                      device)
        statistics = dp_bn.estimate((features[start:start + BATCH].to(device)
                                     for start in range(0, len(features), BATCH)),
                                    n=n, clip=config.model.norm_clip, noise_multiplier=config.model.norm_noise,
                                    generator=generator)
        del features
    statistics = broadcast(statistics)
    dp_bn.release(model, statistics)
    return statistics


def release_line(config, n: int, statistics: dp_bn.ReleasedStatistics) -> str:
    return (f"bn-dp: released the feature statistics of the {n} private training examples once (clip "
            f"{config.model.norm_clip:g}, noise {config.model.norm_noise:g}): {statistics.describe()}")


def restore_statistics(model: torch.nn.Module, saved_model_state: dict) -> None:
    """A resumed run's released statistics, from its checkpoint's weights (before the engine's first forward)."""
    for name, layer in model.named_modules():
        if isinstance(layer, dp_bn.PrivateStandardize):
            prefix = f"{name}." if name else ""
            layer.set_statistics(saved_model_state[prefix + "dp_mean"], saved_model_state[prefix + "dp_var"])
