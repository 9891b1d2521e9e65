"""The Opacus setup for every engine, with one fixed return shape (``Training``).

Every engine draws its batches with Opacus's Poisson sampler (the schedule ``src.accounting`` plans),
and the private ones report every step to Opacus's accountant.
"""
from __future__ import annotations

import importlib.util
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DPOptimizerFastGradientClipping, DistributedDPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from dp_layers.augmult import ViewAveragedCrossEntropy, mean_views
from dp_layers.bk import BookKeepingGradSampleModule, BookKeepingLoss, UnsupportedModelError
from dp_layers.norm_rules import OPACUS_NORM_SAMPLERS
from src.accounting import PrivacyPlan, quiet_accounting
from src.config import Config
from src.engines import ENGINES
from src.data import collate_batch
from src.distributed import SINGLE_PROCESS, Ranks, ShardedPoissonLoader, all_reduce_gradients
from src.errors import UserError


class NonPrivateOptimizer:
    """Plain optimizer that honours BatchMemoryManager's skip signals like Opacus's DPOptimizer.

    Physical batches of one logical batch accumulate into ``.grad``; the step happens after the last.
    That lets one training loop, with BatchMemoryManager, serve the private and non-private engines.
    With several processes (``distributed``) the step first sums the gradients over the ranks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, distributed: bool = False):
        self.original_optimizer = optimizer
        self.distributed = distributed
        self._skip_queue: deque = deque()
        self._is_last_step_skipped = False

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    def signal_skip_step(self, do_skip: bool = True) -> None:
        self._skip_queue.append(do_skip)

    def step(self, closure=None):
        if self._skip_queue and self._skip_queue.popleft():
            self._is_last_step_skipped = True
            return None
        self._is_last_step_skipped = False
        if self.distributed:
            all_reduce_gradients(p for group in self.param_groups for p in group["params"])
        return self.original_optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._is_last_step_skipped:
            self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.original_optimizer.load_state_dict(state)


class SumOverExpectedBatch:
    """Non-private loss normalised like Opacus's DP average: the sum over the batch / expected batch size.

    With Poisson sampling the batch size varies; dividing by its expectation (as DPOptimizer does)
    keeps private and non-private runs of the same seed comparable update for update.
    """

    def __init__(self, expected_batch_size: int, views: int = 1):
        self.expected_batch_size, self.views = expected_batch_size, views

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """With augmult (``views`` rows per example) an example's loss is the mean over its views."""
        return F.cross_entropy(logits, labels, reduction="sum") / (self.views * self.expected_batch_size)


@dataclass
class Training:
    """Everything the training loop needs, the same shape for every engine."""

    model: nn.Module  # what to call: Opacus's GradSampleModule wrapper for private engines
    optimizer: object  # DPOptimizer, or NonPrivateOptimizer; both take BatchMemoryManager's skip signals
    train_loader: DataLoader  # Poisson-sampled logical batches (Opacus's sampler for every engine)
    criterion: Callable  # (logits, labels) -> loss whose .backward() produces the (clipped) gradient
    privacy_engine: Optional[PrivacyEngine]
    per_row_gradients: bool = False  # hooks, functorch: Opacus materialises one gradient per row in grad_sample

    @property
    def base_model(self) -> nn.Module:
        """The plain model without Opacus's wrappers (what model.pt stores)."""
        model = getattr(self.model, "_module", self.model)
        return model.module if isinstance(model, DPDDP) else model

    def group_views(self, views: int) -> None:
        """Augmult (``dp_layers.augmult``): after the backward pass, turn the per-row gradients that hooks and
        functorch leave in ``grad_sample`` into per-example ones (the mean over each example's views), so
        Opacus clips each example's gradient once. The ghost-norm engines group inside their rules."""
        if views == 1 or not self.per_row_gradients:
            return
        for param in self.base_model.parameters():
            per_row = getattr(param, "grad_sample", None)
            if per_row is not None:
                param.grad_sample = mean_views(per_row, views)

    def took_step(self) -> bool:
        """Whether the last ``optimizer.step()`` ended a logical batch (BatchMemoryManager skips the others)."""
        return not self.optimizer._is_last_step_skipped

    def history(self) -> list:
        return list(self.privacy_engine.accountant.history) if self.privacy_engine else []


def make_optimizer(model: nn.Module, train_config) -> torch.optim.Optimizer:
    name, lr, momentum = train_config.optimizer, train_config.lr, train_config.momentum
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def attach(model: nn.Module, train_set, config: Config, plan: PrivacyPlan, *,
           sampling_generator: torch.Generator, noise_generator: Optional[torch.Generator],
           ranks: Ranks = SINGLE_PROCESS) -> Training:
    """Wrap model, optimizer and data for the configured engine.

    Every engine draws its batches with Opacus's Poisson sampler from ``sampling_generator``, so runs of
    the same seed see the same batches whatever the engine: private and non-private differ only by
    clipping and noise. The sample rate is the plan's, fixed before the data was looked at (Opacus would
    read it off the loader's length, that is off n). With several processes (``ranks``, ``src.distributed``)
    each rank samples its shard at that global rate, the model is Opacus's DPDDP (rank 0's weights
    broadcast), the optimizer is Opacus's distributed one (noise once, on rank 0; clipped sums all-reduced)
    and each rank averages over its share of the expected batch, so that the sum over ranks is the global mean.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UserError(f"the model is not compatible with DP-SGD: {errors[0]}")
    if ranks.distributed:
        model = DPDDP(model)  # broadcasts rank 0's weights; Opacus reads the wrapper as "distributed"
    optimizer = make_optimizer(model, config.train)
    engine_name = config.privacy.engine
    if not plan.private:
        poisson_loader = _poisson_loader(train_set, plan, sampling_generator, ranks)
        _check_schedule(poisson_loader, plan)
        return Training(model=model, optimizer=NonPrivateOptimizer(optimizer, ranks.distributed),
                        train_loader=poisson_loader,
                        criterion=SumOverExpectedBatch(plan.expected_batch_size, config.train.views),
                        privacy_engine=None)
    secure = config.privacy.secure_rng
    if secure:
        require_secure_rng()
        noise_generator = None  # Opacus refuses a seeded generator in secure mode; it uses its CSPRNG
    with quiet_accounting():
        engine = PrivacyEngine(accountant=config.privacy.accountant, secure_mode=secure)
        # What the run releases before training (--norm bn-dp's statistics) is the accountant's first entry, so
        # every epsilon read from it (each epoch's, the budget guard's, a checkpoint's) composes it.
        engine.accountant.history = list(plan.prelude)
        loader = _poisson_loader(train_set, plan, engine.secure_rng if secure else sampling_generator, ranks)
        if engine_name == "bk":
            training = _attach_book_keeping(engine, model, optimizer, loader, config, plan, noise_generator)
        else:
            training = _attach_opacus(engine, model, optimizer, loader, config, plan, noise_generator)
    # Opacus sets the average's denominator from the loader's data set; the plan's is fixed with the schedule.
    # Each rank's is its share: the all-reduce sums the ranks' averages.
    training.optimizer.expected_batch_size = plan.expected_batch_size / ranks.world_size
    _check_schedule(training.train_loader, plan)
    if not math.isclose(training.optimizer.expected_batch_size * ranks.world_size, plan.expected_batch_size):
        raise RuntimeError(f"Opacus averages over {training.optimizer.expected_batch_size} examples per rank, the "
                           f"plan over {plan.expected_batch_size} in all")
    return training


def _attach_opacus(engine, model, optimizer, loader, config, plan, noise_generator) -> Training:
    """hooks, functorch, ghost and mixed-ghost: ``PrivacyEngine.make_private`` with Opacus's modes."""
    engine_name = config.privacy.engine
    mode = ENGINES[engine_name].opacus_mode
    # Per-example losses (the mean over an example's augmult views): ghost clipping weights each by its
    # example's clipping factor. Hooks and functorch group their per-row gradients instead (group_views).
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        criterion=ViewAveragedCrossEntropy(config.train.views) if mode == "ghost" else nn.CrossEntropyLoss(),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=config.privacy.clip, poisson_sampling=False,
        grad_sample_mode=mode, noise_generator=noise_generator)
    # ``loader`` already samples at the plan's rate from the right generator (the CSPRNG in secure mode, where
    # Opacus would hand back a plain DataLoader for a non-Poisson request): it is the one training uses.
    if mode == "ghost":
        private_model, dp_optimizer, criterion, _ = wrapped
        if engine_name == "ghost":
            # Stock Opacus: only its own norm rules, not the ones dp_layers registered in this process.
            private_model.NORM_SAMPLERS = dict(OPACUS_NORM_SAMPLERS)
    else:
        (private_model, dp_optimizer, _), criterion = wrapped, nn.CrossEntropyLoss()
    return Training(model=private_model, optimizer=dp_optimizer, train_loader=loader,
                    criterion=criterion, privacy_engine=engine, per_row_gradients=mode != "ghost")


def _attach_book_keeping(engine, model, optimizer, loader, config, plan, noise_generator) -> Training:
    """bk: the same Opacus parts that ``make_private`` assembles for ghost clipping (Poisson loader,
    fast-gradient-clipping optimizer, accountant hook), around the book-keeping module."""
    distributed = isinstance(model, DPDDP)  # its weights are broadcast; book-keeping hooks the model inside
    module = BookKeepingGradSampleModule(model.module if distributed else model, loss_reduction="mean",
                                         max_grad_norm=config.privacy.clip, keep=config.privacy.bk_keep,
                                         layer_budget_mb=config.privacy.bk_layer_budget)
    module.forbid_grad_accumulation()
    optimizer_class = DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
    dp_optimizer = optimizer_class(
        optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=config.privacy.clip,
        expected_batch_size=plan.expected_batch_size, loss_reduction="mean",
        generator=engine.secure_rng if engine.secure_mode else noise_generator, secure_mode=engine.secure_mode)
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    return Training(model=module, optimizer=dp_optimizer, train_loader=loader,
                    criterion=BookKeepingLoss(module, ViewAveragedCrossEntropy(config.train.views)),
                    privacy_engine=engine)


def check_engine_supports(training: Training, train_set) -> None:
    """Refuse, before training, a model whose parameters book-keeping cannot clip (shared or tied weights,
    a trainable layer in eval mode): one forward pass on a blank image, no private data. Call it once the
    model can run a forward pass (public BatchNorm statistics computed)."""
    if not isinstance(training.model, BookKeepingGradSampleModule):
        return
    try:
        training.model.probe(torch.zeros(1, *train_set.example_shape))
    except UnsupportedModelError as error:
        raise UserError(f"--engine bk: {error}") from None


def _poisson_loader(train_set, plan: PrivacyPlan, generator, ranks: Ranks = SINGLE_PROCESS) -> DPDataLoader:
    """Opacus's Poisson-sampling loader at the plan's sample rate (with several processes, this rank's shard
    at that rate for the plan's number of steps: ``src.distributed.ShardedPoissonLoader``)."""
    if ranks.distributed:
        return ShardedPoissonLoader(train_set, sample_rate=plan.sample_rate, steps=plan.steps_per_epoch,
                                    generator=generator, collate_fn=collate_batch)
    return DPDataLoader(train_set, sample_rate=plan.sample_rate, collate_fn=collate_batch, generator=generator)


def require_secure_rng() -> None:
    """Opacus's secure mode draws sampling and noise from torchcsprng, an optional extra dependency."""
    if importlib.util.find_spec("torchcsprng") is None:
        raise UserError("--secure-rng needs the torchcsprng package (Opacus's secure mode), which is not "
                        "installed; see docs/reliability.md, 'Secure RNG'")


def _check_schedule(poisson_loader, plan: PrivacyPlan) -> None:
    """The accountant must be told exactly the sampling that happens; fail loudly if Opacus changes it."""
    if len(poisson_loader) != plan.steps_per_epoch or poisson_loader.sample_rate != plan.sample_rate:
        raise RuntimeError(f"Opacus samples {len(poisson_loader)} batches at rate {poisson_loader.sample_rate}, "
                           f"the plan says {plan.steps_per_epoch} at {plan.sample_rate}")
