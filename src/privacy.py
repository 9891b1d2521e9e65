"""Privacy accounting and the Opacus setup for every engine, with one fixed return shape.

Sampling follows Opacus's own convention so that what ``--dry-run`` promises is what training spends:
``PrivacyEngine.make_private`` turns a loader of ``ceil(n / B)`` batches into Poisson sampling with
rate ``q = 1 / ceil(n / B)``, and its ``DPDataLoader`` yields ``int(1 / q)`` batches per epoch.
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from dp_layers.bk import BookKeepingGradSampleModule, BookKeepingLoss
from dp_layers.norm_rules import OPACUS_NORM_SAMPLERS
from src.config import ACCOUNTANTS, Config
from src.data import collate_batch
from src.errors import UserError

# Opacus's RDP orders stop at 63; short high-epsilon runs (small subsets, few steps) have their optimum
# above that. More orders only tighten the bound (any order > 1 gives a valid one), and leave it unchanged
# whenever the optimum lies below 63, as in the published reference values the tests check.
RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS) + [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]

GDP_NOTE = ("gdp is a central-limit approximation that can understate epsilon; "
            "rdp and prv are rigorous upper bounds and are reported alongside")


@dataclass(frozen=True)
class PoissonSchedule:
    sample_rate: float
    steps_per_epoch: int
    expected_batch_size: int  # the denominator of the averaged gradient (Opacus's expected_batch_size)


def poisson_schedule(n: int, batch_size: int) -> PoissonSchedule:
    """The sampling Opacus performs for ``n`` examples and logical batch ``batch_size`` (see module doc)."""
    sample_rate = 1 / math.ceil(n / batch_size)
    return PoissonSchedule(sample_rate=sample_rate, steps_per_epoch=int(1 / sample_rate),
                           expected_batch_size=int(n * sample_rate))


@contextmanager
def _quiet_accounting():
    """Opacus warns on every accountant and engine it creates; we give these notes once, ourselves (GDP's
    approximation in the run's output, the non-secure RNG in README). RDP's remarks that a wider order
    range could tighten a bound, and PRV's float overflows on hopeless settings, are not the user's
    business: a non-finite result is reported as such."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _accountant_options(accountant: str) -> dict:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def epsilon_from_history(accountant: str, history: list, delta: float) -> float:
    """Epsilon of an Opacus accountant fed ``history`` [(noise, sample_rate, steps), ...]; may raise."""
    with _quiet_accounting():
        acc = create_accountant(mechanism=accountant)
        acc.history = list(history)
        return float(acc.get_epsilon(delta=delta, **_accountant_options(accountant)))


def epsilon_by_accountant(history: list, delta: float) -> dict:
    """Epsilon under every accountant; None where an accountant cannot bound it (for example GDP's solver
    failing at large epsilon, or PRV's domain overflowing)."""
    result = {}
    for name in ACCOUNTANTS:
        try:
            value = epsilon_from_history(name, history, delta)
            result[name] = value if math.isfinite(value) else None
        except (ValueError, ArithmeticError, RuntimeError):
            result[name] = None
    return result


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise (to Opacus's bisection tolerance) whose epsilon after ``steps`` is <= target."""
    try:
        with _quiet_accounting():
            noise = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant=accountant,
                                         **_accountant_options(accountant))
    except (ValueError, ArithmeticError, RuntimeError) as error:
        if accountant == "gdp":
            raise UserError(f"the gdp accountant cannot calibrate --target-epsilon {target_epsilon} ({error}); "
                            "its solver fails at large epsilon: use --accountant rdp or prv") from None
        raise UserError(f"--target-epsilon {target_epsilon} cannot be met with delta {delta}, sample rate "
                        f"{sample_rate:.4g} and {steps} steps ({error}); raise the target, train fewer epochs "
                        "or use a smaller batch") from None
    return float(noise)


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run will spend, computed before any data is touched; ``--dry-run`` prints it."""

    private: bool
    n_train: int
    batch_size: int
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    steps: int
    expected_batch_size: int
    noise_multiplier: Optional[float]
    noise_calibrated: bool
    delta: float
    accountant: str
    epsilon: Optional[float]
    epsilon_by_accountant: dict

    def to_dict(self) -> dict:
        return asdict(self)


def plan_privacy(config: Config, n_train: int) -> PrivacyPlan:
    """Schedule, noise (calibrated if asked) and epsilon under every accountant, for ``n_train`` examples."""
    t, p = config.train, config.privacy
    if n_train < 1:
        raise UserError("the private training set is empty")
    if t.batch_size > n_train:
        raise UserError(f"--batch-size {t.batch_size} is larger than the {n_train} private training examples")
    if p.delta >= 1 / n_train:
        raise UserError(f"--delta {p.delta:g} must be below 1/n = {1 / n_train:.3g} for n = {n_train}: "
                        "a larger delta allows releasing an example outright")
    schedule = poisson_schedule(n_train, t.batch_size)
    steps = schedule.steps_per_epoch * t.epochs
    noise, calibrated, epsilon, by_accountant = None, False, None, {name: None for name in ACCOUNTANTS}
    if p.private:
        noise = p.noise
        if p.target_epsilon is not None:
            noise = calibrate_noise(target_epsilon=p.target_epsilon, delta=p.delta,
                                    sample_rate=schedule.sample_rate, steps=steps, accountant=p.accountant)
            calibrated = True
        history = [(noise, schedule.sample_rate, steps)]
        by_accountant = epsilon_by_accountant(history, p.delta)
        epsilon = by_accountant[p.accountant]
        if epsilon is None:
            raise UserError(f"the {p.accountant} accountant cannot bound epsilon for noise {noise:g}, sample rate "
                            f"{schedule.sample_rate:.4g} and {steps} steps; use more noise or another --accountant")
    return PrivacyPlan(private=p.private, n_train=n_train, batch_size=t.batch_size,
                       sample_rate=schedule.sample_rate, steps_per_epoch=schedule.steps_per_epoch,
                       epochs=t.epochs, steps=steps, expected_batch_size=schedule.expected_batch_size,
                       noise_multiplier=noise, noise_calibrated=calibrated, delta=p.delta,
                       accountant=p.accountant, epsilon=epsilon, epsilon_by_accountant=by_accountant)


class NonPrivateOptimizer:
    """Plain optimizer that honours BatchMemoryManager's skip signals like Opacus's DPOptimizer.

    Physical batches of one logical batch accumulate into ``.grad``; the step happens after the last.
    That lets one training loop, with BatchMemoryManager, serve the private and non-private engines.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.original_optimizer = optimizer
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

    def __init__(self, expected_batch_size: int):
        self.expected_batch_size = expected_batch_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="sum") / self.expected_batch_size


@dataclass
class Training:
    """Everything the training loop needs, the same shape for every engine."""

    model: nn.Module  # what to call: Opacus's GradSampleModule wrapper for private engines
    optimizer: object  # DPOptimizer, or NonPrivateOptimizer; both take BatchMemoryManager's skip signals
    train_loader: DataLoader  # Poisson-sampled logical batches (Opacus's sampler for every engine)
    criterion: Callable  # (logits, labels) -> loss whose .backward() produces the (clipped) gradient
    privacy_engine: Optional[PrivacyEngine]

    @property
    def base_model(self) -> nn.Module:
        """The plain model without Opacus wrappers (what model.pt stores)."""
        return getattr(self.model, "_module", self.model)

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
           sampling_generator: torch.Generator, noise_generator: Optional[torch.Generator]) -> Training:
    """Wrap model, optimizer and data for the configured engine.

    Every engine draws its batches with Opacus's Poisson sampler from ``sampling_generator``, so runs of
    the same seed see the same batches whatever the engine: private and non-private differ only by
    clipping and noise.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UserError(f"the model is not compatible with DP-SGD: {errors[0]}")
    optimizer = make_optimizer(model, config.train)
    loader = DataLoader(train_set, batch_size=config.train.batch_size, generator=sampling_generator,
                        collate_fn=collate_batch)
    engine_name = config.privacy.engine
    if not plan.private:
        poisson_loader = DPDataLoader.from_data_loader(loader)
        _check_schedule(poisson_loader, plan)
        return Training(model=model, optimizer=NonPrivateOptimizer(optimizer), train_loader=poisson_loader,
                        criterion=SumOverExpectedBatch(plan.expected_batch_size), privacy_engine=None)
    with _quiet_accounting():
        engine = PrivacyEngine(accountant=config.privacy.accountant)
        if engine_name == "bk":
            training = _attach_book_keeping(engine, model, optimizer, loader, config, plan, noise_generator)
        else:
            training = _attach_opacus(engine, model, optimizer, loader, config, plan, noise_generator)
    _check_schedule(training.train_loader, plan)
    if training.optimizer.expected_batch_size != plan.expected_batch_size:
        raise RuntimeError(f"Opacus averages over {training.optimizer.expected_batch_size} examples, the plan "
                           f"over {plan.expected_batch_size}")
    return training


def _attach_opacus(engine, model, optimizer, loader, config, plan, noise_generator) -> Training:
    """hooks, functorch, ghost and mixed-ghost: ``PrivacyEngine.make_private`` with Opacus's modes."""
    engine_name = config.privacy.engine
    mode = "ghost" if engine_name == "mixed-ghost" else engine_name
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=config.privacy.clip, poisson_sampling=True,
        grad_sample_mode=mode, noise_generator=noise_generator)
    if mode == "ghost":
        private_model, dp_optimizer, criterion, poisson_loader = wrapped
        if engine_name == "ghost":
            # Stock Opacus: only its own norm rules, not the ones dp_layers registered in this process.
            private_model.NORM_SAMPLERS = dict(OPACUS_NORM_SAMPLERS)
    else:
        (private_model, dp_optimizer, poisson_loader), criterion = wrapped, nn.CrossEntropyLoss()
    return Training(model=private_model, optimizer=dp_optimizer, train_loader=poisson_loader,
                    criterion=criterion, privacy_engine=engine)


def _attach_book_keeping(engine, model, optimizer, loader, config, plan, noise_generator) -> Training:
    """bk: the same Opacus parts that ``make_private`` assembles for ghost clipping (Poisson loader,
    fast-gradient-clipping optimizer, accountant hook), around the book-keeping module."""
    poisson_loader = DPDataLoader.from_data_loader(loader)
    sample_rate = 1 / len(loader)
    module = BookKeepingGradSampleModule(model, loss_reduction="mean", max_grad_norm=config.privacy.clip)
    module.forbid_grad_accumulation()
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=config.privacy.clip,
        expected_batch_size=int(len(loader.dataset) * sample_rate), loss_reduction="mean",
        generator=noise_generator)
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return Training(model=module, optimizer=dp_optimizer, train_loader=poisson_loader,
                    criterion=BookKeepingLoss(module, nn.CrossEntropyLoss()), privacy_engine=engine)


def _check_schedule(poisson_loader, plan: PrivacyPlan) -> None:
    """The accountant must be told exactly the sampling that happens; fail loudly if Opacus changes it."""
    if len(poisson_loader) != plan.steps_per_epoch or poisson_loader.sample_rate != plan.sample_rate:
        raise RuntimeError(f"Opacus samples {len(poisson_loader)} batches at rate {poisson_loader.sample_rate}, "
                           f"the plan says {plan.steps_per_epoch} at {plan.sample_rate}")
