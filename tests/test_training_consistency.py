"""Runs of the same seed differ only where they should: clipping and noise, never data order or init.

Also: every private engine computes the same clipped, noised update (same seed -> same weights), and
with noise 0 and a clip no gradient reaches, DP-SGD is exactly the non-private update.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from src.config import build_config
from src.datasets import get_dataset
from src.accounting import plan_privacy
from src.privacy import attach
from src.loop import EpochSpec, train_epoch
from src.train import PreparedRun, derive_seeds

SPEC = get_dataset("mnist")


def make(tiny_root, **flags):
    base = {"dataset": "mnist", "data_root": str(tiny_root), "train_subset": 192, "batch_size": 48,
            "physical_batch_size": 16, "epochs": 1, "lr": 0.5, "momentum": 0.5, "clip": 1.0, "noise": 1.0,
            "wandb": "disabled", "download": False, "seed": 7}
    base.update(flags)
    config = build_config(base, SPEC.defaults)
    data = SPEC.load(config.data, with_public=False)
    return config, data


def train_one_epoch(tiny_root, noise_override=None, **flags):
    """Initial weights, per-batch labels seen, and final weights after one epoch."""
    config, data = make(tiny_root, **flags)
    plan = plan_privacy(config, len(data.train))
    if noise_override is not None:
        plan = dataclasses.replace(plan, noise_multiplier=noise_override)
    seeds = derive_seeds(config.train.seed)
    torch.manual_seed(seeds.model)
    model = SPEC.build_model(config.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    noise_generator = torch.Generator().manual_seed(seeds.noise) if plan.private else None
    training = attach(model, data.train, config, plan, sampling_generator=torch.Generator().manual_seed(seeds.sampling),
                      noise_generator=noise_generator)
    seen = [labels.tolist() for _, labels in training.train_loader]
    # The loader above consumed sampler draws; rebuild so training sees the same first epoch.
    torch.manual_seed(seeds.model)
    model = SPEC.build_model(config.model)
    noise_generator = torch.Generator().manual_seed(seeds.noise) if plan.private else None
    training = attach(model, data.train, config, plan, sampling_generator=torch.Generator().manual_seed(seeds.sampling),
                      noise_generator=noise_generator)
    run = PreparedRun(config=config, device=torch.device("cpu"), data=data, plan=plan, seeds=seeds,
                      training=training, generators={}, adversarial=None, refresh_public=None)
    stats = train_epoch(run, EpochSpec(epoch=1))
    assert stats.steps == plan.steps_per_epoch
    final = {k: v.detach().clone() for k, v in training.base_model.state_dict().items()}
    return initial, seen, final


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tiny_root):
    return train_one_epoch(tiny_root, engine="hooks")


@pytest.mark.parametrize("engine", ["functorch", "ghost", "non-private"])
def test_same_seed_same_initial_weights_and_batches(tiny_root, reference, engine):
    flags = {"engine": engine}
    if engine == "non-private":
        flags["noise"] = None
    initial, seen, _ = train_one_epoch(tiny_root, **flags)
    assert max_difference(initial, reference[0]) == 0.0
    assert seen == reference[1]


@pytest.mark.parametrize("engine", ["functorch", "ghost"])
def test_every_engine_computes_the_same_private_update(tiny_root, reference, engine):
    """Same per-sample clipping, same noise draws: the engines may differ only by float rounding."""
    _, _, final = train_one_epoch(tiny_root, engine=engine)
    assert max_difference(final, reference[2]) < 1e-4


def test_noise_and_clipping_are_the_only_differences_from_non_private(tiny_root, reference):
    _, _, non_private = train_one_epoch(tiny_root, engine="non-private", noise=None)
    # Noise 0 and a clip no per-sample gradient reaches: DP-SGD reduces to the same averaged update.
    _, _, unclipped = train_one_epoch(tiny_root, noise_override=0.0, engine="hooks", clip=1e6)
    assert max_difference(unclipped, non_private) < 1e-5
    # Clipping alone changes the update; noise changes it further.
    _, _, clipped = train_one_epoch(tiny_root, noise_override=0.0, engine="hooks", clip=0.01)
    assert max_difference(clipped, non_private) > 1e-3
    assert max_difference(reference[2], clipped) > 1e-3
