"""Gradient canaries for the white-box audit (Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1)
training run", white-box setting with Dirac canaries).

Canary j is an example whose gradient is ``norm_factor * C`` times the unit vector of one coordinate (a
Dirac canary). Each is inserted with probability 1/2 before training, and each inserted canary joins every
logical batch with the run's sample rate q, like a private example. A sampled canary enters the step as one
more per-sample gradient *before clipping*, through the engine's own path:

- hooks and functorch: one more row of ``grad_sample``, clipped, summed and noised by Opacus's DPOptimizer;
- ghost, mixed-ghost and bk: its norm goes through the engine module's own ``get_clipping_coef`` (the clipping
  factor every example of the step gets) and the clipped gradient is added to the clipped sum that the
  optimizer then noises.

A canary's raw gradient is ``norm_factor`` (10) times the clip bound, so only clipping brings it down to C: an
engine that does not clip adds 10x the signal and is caught. The auditor sees every noised gradient (all
iterates, as the white-box setting assumes). In units of the claimed noise, coordinate j of step t is
z = xi + mu * s, with xi standard normal, mu = 1 / sigma and s = 1 when canary j was in the step (probability q if
inserted); canary j is scored by the log-likelihood ratio of "inserted" against "not inserted" over all steps,
sum_t log(1 - q + q exp(mu z_t - mu^2 / 2)), the most powerful statistic for the claimed mechanism
(Neyman-Pearson). It only needs the claimed sigma, C, q and expected batch: a mechanism that is not the
claimed one is judged against the claim, as it must be.

The canary coordinates live in an inert layer added to the model: a bias-free ``nn.Linear`` applied to a zero
input, whose output (0) is added to the logits. Its weights change nothing the model computes and no real
example has a gradient there (each per-sample gradient is g_i 0^T), so the canary scores carry the mechanism's
noise and the canaries alone: the auditor's strongest position, which is what makes the audit close to the
claimed epsilon.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
from torch import nn

from src.loop import StepHooks
from src.privacy import Training

NORM_FACTOR = 10.0


class CanaryProbe(nn.Module):
    """``model`` plus an inert layer holding the canary coordinates (module doc)."""

    def __init__(self, model: nn.Module, coordinates: int, classes: int = 10):
        super().__init__()
        self.model = model
        self.inputs = math.ceil(coordinates / classes)
        self.probe = nn.Linear(self.inputs, classes, bias=False)

    def forward(self, x):
        logits = self.model(x)
        return logits + self.probe(x.new_zeros(len(x), self.inputs))


class GradientCanaries(StepHooks):
    """Inserts the sampled canaries into each step and records the noised gradient of their coordinates."""

    def __init__(self, included: torch.Tensor, *, sample_rate: float, clip: float, noise: float,
                 expected_batch_size: float, seed: int, norm_factor: float = NORM_FACTOR):
        self.included = included
        self.sample_rate, self.clip, self.norm_factor = sample_rate, clip, norm_factor
        self.noise, self.expected_batch_size = noise, expected_batch_size  # the claimed mechanism's
        self.generator = torch.Generator().manual_seed(seed)
        self.noised: List[torch.Tensor] = []  # per step: the noised gradient at the m canary coordinates
        self.sampled = torch.zeros(len(included), dtype=torch.int64)  # times each canary joined a step

    @property
    def m(self) -> int:
        return len(self.included)

    def _draw(self) -> torch.Tensor:
        """The inserted canaries in this logical batch (Poisson, rate q): their indices."""
        joins = torch.rand(self.m, generator=self.generator) < self.sample_rate
        chosen = torch.nonzero(joins & self.included).flatten()
        self.sampled[chosen] += 1
        return chosen

    def before_clipping(self, training: Training) -> None:
        chosen = self._draw()
        if len(chosen) == 0:
            return
        probe = training.base_model.probe.weight
        raw = torch.zeros(len(chosen), probe.numel(), dtype=probe.dtype, device=probe.device)
        raw[torch.arange(len(chosen)), chosen.to(probe.device)] = self.norm_factor * self.clip
        if training.per_row_gradients:
            self._as_grad_sample_rows(training, probe, raw)
        else:
            self._through_clipping_coef(training, probe, raw)

    @staticmethod
    def _as_grad_sample_rows(training: Training, probe: nn.Parameter, raw: torch.Tensor) -> None:
        """hooks, functorch: more rows of every parameter's ``grad_sample`` (zeros outside the probe), which
        Opacus's optimizer clips with the rest of the batch."""
        for param in training.base_model.parameters():
            if not param.requires_grad:
                continue
            rows = raw.reshape(len(raw), *param.shape) if param is probe else \
                raw.new_zeros(len(raw), *param.shape)
            param.grad_sample = torch.cat([param.grad_sample, rows.to(param.grad_sample.dtype)])

    @staticmethod
    def _through_clipping_coef(training: Training, probe: nn.Parameter, raw: torch.Tensor) -> None:
        """ghost, mixed-ghost, bk: the canaries' per-sample norms through the engine module's clipping-factor
        function, then their clipped gradients added to the probe's clipped sum."""
        module = training.model
        params = [p for p in module.trainable_parameters]
        saved = [getattr(p, "_norm_sample", None) for p in params]
        for p in params:
            p._norm_sample = raw.norm(dim=1) if p is probe else raw.new_zeros(len(raw))
        coef = module.get_clipping_coef()
        for p, norm in zip(params, saved):
            p._norm_sample = norm
        clipped = torch.einsum("b,bd->d", coef.to(raw.dtype), raw).reshape(probe.shape)
        probe.grad = clipped if probe.grad is None else probe.grad + clipped

    def after_step(self, training: Training) -> None:
        probe = training.base_model.probe.weight
        self.noised.append(probe.grad.detach().flatten()[:self.m].cpu().clone())

    def scores(self) -> np.ndarray:
        """Canary j's log-likelihood ratio over all steps (module doc)."""
        z = torch.stack(self.noised).double() * self.expected_batch_size / (self.noise * self.clip)
        mu, q = 1.0 / self.noise, self.sample_rate
        absent = math.log1p(-q) if q < 1 else -math.inf  # q = 1: every inserted canary is in every step
        per_step = torch.logaddexp(torch.full_like(z, absent), math.log(q) + mu * z - mu * mu / 2)
        return per_step.sum(dim=0).numpy()
