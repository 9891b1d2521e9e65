"""BatchNorm statistics estimated once from the private training set with the Gaussian mechanism (``--norm bn-dp``).

Normalizing a ScatterNet's features per channel helps its head (Tramèr & Boneh, "Differentially Private Learning
Needs Better Features (or Much More Data)", ICLR 2021). Without a public set that looks like the private one, the
statistics can be estimated from the private set itself and paid for out of the same epsilon. Tramèr & Boneh's
code clips each example to the median per-example norm of the private data, a statistic of that data that is
itself released unprotected; here the bound is a setting fixed in advance (``--norm-clip``), never a quantile.

The mechanism, run once before training on the private training set only (never the validation or test sets):

- each example contributes two vectors over the C channels: its per-channel spatial means ``m_i`` and its
  per-channel spatial means of squares ``s_i``; each is clipped to L2 norm ``clip``;
- both sums get Gaussian noise of standard deviation ``noise_multiplier * clip`` per coordinate. Adding or
  removing one example moves each sum by at most ``clip`` in L2 (the add/remove adjacency of Opacus's DP-SGD
  accounting), so these are two Gaussian mechanisms at noise multiplier ``noise_multiplier`` and sampling rate 1:
  the accountant gets one more history entry ``(noise_multiplier, 1.0, 2)`` (``src.accounting``);
- the sums are divided by the planned number of private examples ``n`` (public: the Poisson schedule of DP-SGD
  is fixed by it too), so what follows is post-processing of the two noisy sums:
  ``mean = M / n``, ``var = max(S / n - mean ** 2, floor)``.

The floor, ``noise_multiplier * clip / n``, is the standard deviation of the noise on one coordinate of ``S / n``,
a public number. A channel whose true variance is below the noise cannot be told from zero: its noisy variance
comes out near zero or negative, and dividing by its square root would multiply that channel by a large random
factor. The floor stops that, at a price: such a channel is divided by ``sqrt(floor)`` instead of its true
spread, so it is left under- or over-scaled, by how much depends on the noise and not on the data. On CIFAR-10's
243 scattering channels many of the high-order channels are in this regime (their variances are small next to
the first-order ones); the run reports how many channels sit at the floor, a post-processing of the noisy
statistics.

``PrivateStandardize`` holds the released statistics as frozen buffers: in the backward pass they are constants,
so every engine sees an ordinary per-channel affine map of each example's features and per-sample gradients stay
exact, and each example's output depends on itself and the released statistics only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

# One history entry of Opacus's accountants, for the two sums: (noise multiplier, sampling rate, releases)
RELEASES = 2
SAMPLING_RATE = 1.0


def accountant_entry(noise_multiplier: float) -> tuple:
    """What the two noisy sums cost, in the form of an Opacus accountant's history."""
    return (float(noise_multiplier), SAMPLING_RATE, RELEASES)


class PrivateStandardize(nn.Module):
    """(x - mean) / sqrt(var + eps) per channel, with the statistics released by ``estimate`` (frozen buffers,
    saved with the weights in model.pt). It refuses to run before they are set."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("dp_mean", torch.zeros(num_features))
        self.register_buffer("dp_var", torch.ones(num_features))
        self.register_buffer("estimated", torch.tensor(False))
        self._ready = False  # mirrors ``estimated`` without a device sync on every forward

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.estimated)

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.dp_mean.copy_(mean)
        self.dp_var.copy_(var)
        self.estimated.fill_(True)
        self._ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            raise RuntimeError("--norm bn-dp: the statistics were never estimated (dp_layers.dp_bn.estimate)")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.dp_mean.view(shape)) * torch.rsqrt(self.dp_var.view(shape) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def private_standardizers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, PrivateStandardize)]


@dataclass(frozen=True)
class ReleasedStatistics:
    """What the mechanism releases (noisy, so anything computed from it is covered by its epsilon)."""

    mean: torch.Tensor
    var: torch.Tensor
    floor: float
    floored_channels: int  # channels whose noisy variance was below the floor

    def describe(self) -> str:
        return (f"{len(self.var)} channels, {self.floored_channels} of them with their variance at the floor "
                f"{self.floor:.3g}")


def clipped_moments(features: torch.Tensor, clip: float) -> tuple:
    """Per example (rows of ``features``, shaped (B, C, ...)): the per-channel spatial means and means of squares,
    each vector clipped to L2 norm ``clip``. Returns their sums over the batch (two C-vectors, float64)."""
    flat = features.detach().double().flatten(2)  # (B, C, H*W)
    sums = []
    for moment in (flat.mean(dim=2), flat.pow(2).mean(dim=2)):  # (B, C) each
        norms = moment.norm(dim=1, keepdim=True)
        scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
        sums.append((moment * scale).sum(dim=0))
    return tuple(sums)


def noisy_sums(feature_batches: Iterable[torch.Tensor], *, clip: float, noise_multiplier: float,
               generator: Optional[torch.Generator]) -> tuple:
    """The two clipped sums over every batch, each with N(0, (noise_multiplier * clip)^2) added per coordinate.
    Only these leave the function: the unnoised sums stay local."""
    total_mean = total_square = None
    for batch in feature_batches:
        means, squares = clipped_moments(batch, clip)
        total_mean = means if total_mean is None else total_mean + means
        total_square = squares if total_square is None else total_square + squares
    if total_mean is None:
        raise ValueError("--norm bn-dp: the private training set is empty")
    std = noise_multiplier * clip
    device = total_mean.device if generator is None else generator.device
    noise = [torch.normal(0.0, std, size=total_mean.shape, generator=generator, dtype=torch.float64, device=device)
             for _ in range(RELEASES)]
    return total_mean + noise[0].to(total_mean.device), total_square + noise[1].to(total_mean.device)


def statistics_from_sums(noisy_mean_sum: torch.Tensor, noisy_square_sum: torch.Tensor, *, n: int, clip: float,
                         noise_multiplier: float) -> ReleasedStatistics:
    """Post-processing of the two noisy sums with the public ``n`` (module doc: the floor)."""
    floor = noise_multiplier * clip / n
    mean = noisy_mean_sum / n
    raw_var = noisy_square_sum / n - mean ** 2
    var = raw_var.clamp_min(floor)
    return ReleasedStatistics(mean=mean.float(), var=var.float(), floor=float(floor),
                              floored_channels=int((raw_var < floor).sum()))


def estimate(feature_batches: Iterable[torch.Tensor], *, n: int, clip: float, noise_multiplier: float,
             generator: Optional[torch.Generator]) -> ReleasedStatistics:
    """The mechanism of the module doc over the private training set's features, in batches."""
    if clip <= 0 or noise_multiplier <= 0:
        raise ValueError(f"--norm bn-dp needs a positive clipping bound and noise, got {clip} and {noise_multiplier}")
    noisy_mean_sum, noisy_square_sum = noisy_sums(feature_batches, clip=clip, noise_multiplier=noise_multiplier,
                                                  generator=generator)
    return statistics_from_sums(noisy_mean_sum, noisy_square_sum, n=n, clip=clip, noise_multiplier=noise_multiplier)


def release(model: nn.Module, statistics: ReleasedStatistics) -> None:
    """Give every ``PrivateStandardize`` of ``model`` the released statistics (a ScatterNet has one)."""
    layers = private_standardizers(model)
    if len(layers) != 1:
        raise ValueError(f"--norm bn-dp expects one normalization of the features, found {len(layers)}")
    layers[0].set_statistics(statistics.mean.to(layers[0].dp_mean.device), statistics.var.to(layers[0].dp_var.device))


def copy_statistics(source: nn.Module, target: nn.Module) -> None:
    """The same released statistics in another copy of the model (the weight average), at no further cost."""
    for mine, theirs in zip(private_standardizers(source), private_standardizers(target)):
        theirs.set_statistics(mine.dp_mean, mine.dp_var)
