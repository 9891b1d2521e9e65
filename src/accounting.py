"""Privacy accounting: the Poisson schedule, epsilon under every accountant, noise calibration, and the
plan a run commits to before touching data.

Sampling follows Opacus's own convention so that what ``--dry-run`` promises is what training spends:
``PrivacyEngine.make_private`` turns a loader of ``ceil(n / B)`` batches into Poisson sampling with
rate ``q = 1 / ceil(n / B)``, and its ``DPDataLoader`` yields ``int(1 / q)`` batches per epoch.
"""
from __future__ import annotations

import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant, register_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from src.config import RIGOROUS_ACCOUNTANTS, Config
from src.errors import UserError

# Opacus's RDP orders stop at 63; short high-epsilon runs (small subsets, few steps) have their optimum
# above that. More orders only tighten the bound (any order > 1 gives a valid one), and leave it unchanged
# whenever the optimum lies below 63, as in the published reference values the tests check.
RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS) + [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]


@functools.lru_cache(maxsize=4096)
def rdp_of_one_step(noise: float, sample_rate: float, orders: tuple) -> np.ndarray:
    """Opacus's RDP of one step of the sampled Gaussian mechanism at ``orders`` (read-only; computed once)."""
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=list(orders))
    rdp.setflags(write=False)
    return rdp


class OneStepMemoRDPAccountant(RDPAccountant):
    """Opacus's RDP accountant, computing each (noise, sample rate)'s one-step RDP once per process.

    Why: RDP composes additively (Mironov, "Renyi Differential Privacy", 2017, Proposition 1), so T steps of one
    mechanism spend T times one step's RDP, and Opacus's ``compute_rdp`` computes exactly that: one step's RDP
    at every order, times T. Only the one-step vector is costly: at fractional orders it sums a series that
    converges slowly at large sampling rates and small noise (about 0.5 s a call at q = 0.25, noise 1.6). Opacus
    computes it anew at every call, and a run asks many times at the same noise: after each epoch, for the
    budget guard's bisection over steps, for the summary, for the dry-run's shares. Here each is computed once,
    and every epsilon is bit-for-bit Opacus's (the same vector times the same T, summed in the same order;
    ``tests/test_accounting.py`` checks equality). Registered as Opacus's ``rdp`` accountant (below), so its
    PrivacyEngine and noise calibration use it too.
    """

    def get_privacy_spent(self, *, delta: float, alphas=None):
        if not self.history:
            return 0, 0
        alphas = self.DEFAULT_ALPHAS if alphas is None else alphas
        orders = tuple(alphas)
        rdp = sum([rdp_of_one_step(noise, sample_rate, orders) * steps
                   for noise, sample_rate, steps in self.history])
        epsilon, best_alpha = rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
        return float(epsilon), float(best_alpha)


register_accountant("rdp", OneStepMemoRDPAccountant, force=True)

GDP_NOTE = ("epsilon_gdp_approximation is GDP's central-limit approximation, which can understate epsilon; "
            "only the rdp and prv values are guarantees")


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
def quiet_accounting():
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
    """Epsilon of an Opacus accountant fed ``history`` [(noise, sample_rate, steps), ...]; may raise.
    No step taken spends nothing: 0 (Opacus's GDP accountant cannot read an empty history)."""
    if not history:
        return 0.0
    with quiet_accounting():
        acc = create_accountant(mechanism=accountant)
        acc.history = list(history)
        return float(acc.get_epsilon(delta=delta, **_accountant_options(accountant)))


# How Opacus's accountants fail on hopeless settings: GDP's solver, PRV's domain overflowing (or asking
# for exabytes at tiny noise), RDP's arithmetic.
ACCOUNTING_ERRORS = (ValueError, ArithmeticError, RuntimeError, MemoryError)


def bounded_epsilon(accountant: str, history: list, delta: float) -> Optional[float]:
    """Epsilon, or None where the accountant cannot bound it."""
    try:
        value = epsilon_from_history(accountant, history, delta)
    except ACCOUNTING_ERRORS:
        return None
    return value if math.isfinite(value) else None


def history_until(history: list, steps: int) -> list:
    """The first ``steps`` steps of an Opacus history [(noise, sample_rate, steps), ...]: what was spent when the
    released outputs (a finished epoch's model and metrics) were made."""
    kept, left = [], steps
    for noise, sample_rate, count in history:
        if left <= 0:
            break
        kept.append((noise, sample_rate, min(count, left)))
        left -= count
    return kept


def steps_in(history: list) -> int:
    return sum(count for _, _, count in history)


def epsilon_by_accountant(history: list, delta: float) -> dict:
    """Epsilon under every rigorous accountant (rdp, prv); None where one cannot bound it."""
    return {name: bounded_epsilon(name, history, delta) for name in RIGOROUS_ACCOUNTANTS}


def gdp_approximation(history: list, delta: float) -> Optional[float]:
    """GDP's central-limit value (Dong, Roth and Su 2019): reported, labelled, never a guarantee (GDP_NOTE).

    Opacus's GDP accountant reads only its history's last entry, so a history of several (``--norm bn-dp``'s
    release before DP-SGD) is composed here: mu-GDP mechanisms compose as the root of the sum of their squared
    mu (Dong, Roth and Su, Corollary 3.3). An entry at sampling rate 1 is exactly the Gaussian mechanism,
    sqrt(steps) / sigma; a subsampled one takes Opacus's central-limit mu."""
    if len(history) <= 1:
        return bounded_epsilon("gdp", history, delta)
    from opacus.accountants.analysis import gdp

    try:
        mu = math.sqrt(sum((math.sqrt(steps) / noise) ** 2 if rate == 1 else
                           gdp.compute_mu_poisson(steps=steps, noise_multiplier=noise, sample_rate=rate) ** 2
                           for noise, rate, steps in history))
        value = float(gdp.eps_from_mu(mu=mu, delta=delta))
    except ACCOUNTING_ERRORS:
        return None
    return value if math.isfinite(value) else None


def require_rigorous(accountant: str) -> None:
    """Calibration and the budget guard promise epsilon <= E: only an upper bound can keep that promise."""
    if accountant not in RIGOROUS_ACCOUNTANTS:
        raise ValueError(f"{accountant} is not a rigorous accountant; calibrate and guard with "
                         f"{' or '.join(RIGOROUS_ACCOUNTANTS)}")


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                    prelude: Sequence = ()) -> float:
    """The smallest noise (to Opacus's bisection tolerance) whose epsilon after ``steps`` is <= target; with a
    ``prelude`` (releases before training, such as --norm bn-dp's statistics) that epsilon is of both together,
    so DP-SGD gets what the prelude leaves."""
    require_rigorous(accountant)
    if prelude:
        return _calibrate_after(list(prelude), target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                steps=steps, accountant=accountant)
    try:
        with quiet_accounting():
            noise = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant=accountant,
                                         **_accountant_options(accountant))
    except ACCOUNTING_ERRORS as error:
        raise UserError(f"--target-epsilon {target_epsilon} cannot be met with delta {delta}, sample rate "
                        f"{sample_rate:.4g} and {steps} steps ({error}); raise the target, train fewer epochs "
                        "or use a smaller batch") from None
    return float(noise)


MAX_NOISE = 1e6  # Opacus's own limit on a calibrated noise multiplier (accountants.utils.MAX_SIGMA)
EPSILON_TOLERANCE = 0.01  # Opacus's get_noise_multiplier: the calibrated epsilon is within this below the target


def _calibrate_after(prelude: list, *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str) -> float:
    """Opacus's bisection (get_noise_multiplier), on the composition of ``prelude`` and DP-SGD: Opacus's own takes
    a history of one entry only."""
    alone = bounded_epsilon(accountant, prelude, delta)
    if alone is None or alone >= target_epsilon:
        raise UserError(f"--target-epsilon {target_epsilon:g}: the release before training alone spends "
                        f"{'an unbounded epsilon' if alone is None else f'{alone:.3g}'} ({accountant}); raise the "
                        "target or --norm-noise")

    def epsilon(noise: float) -> float:
        value = bounded_epsilon(accountant, prelude + [(noise, sample_rate, steps)], delta)
        return math.inf if value is None else value

    low, high, high_epsilon = 0.0, 10.0, math.inf
    while high_epsilon > target_epsilon:
        high *= 2
        if high > MAX_NOISE:
            raise UserError(f"--target-epsilon {target_epsilon:g} cannot be met with delta {delta}, sample rate "
                            f"{sample_rate:.4g} and {steps} steps after the release before training")
        high_epsilon = epsilon(high)
    while target_epsilon - high_epsilon > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        value = epsilon(middle)
        if value < target_epsilon:
            high, high_epsilon = middle, value
        else:
            low = middle
    return high


def steps_within_budget(max_epsilon: float, *, noise: float, sample_rate: float, steps: int, accountant: str,
                        delta: float, spent: Sequence = ()) -> int:
    """The largest T <= ``steps`` such that the steps already ``spent`` (an accountant history) followed
    by T more steps at ``noise`` and ``sample_rate`` keep epsilon <= ``max_epsilon``.

    Every future step has the same noise and sample rate, and epsilon only grows with T, so "before
    each step, check that taking it keeps epsilon <= E" is exactly "stop after T more steps": the run
    compares its step counter with T instead of asking the accountant every step (PRV takes ~0.1 s).
    A resumed run passes what its accountant has recorded, so the guard rests on what was spent, not on
    what the plan assumed.
    """
    require_rigorous(accountant)
    spent = [tuple(entry) for entry in spent]

    def within(t: int) -> bool:
        history = spent + ([(noise, sample_rate, t)] if t else [])
        if not history:
            return True  # no step spends nothing
        value = bounded_epsilon(accountant, history, delta)
        return value is not None and value <= max_epsilon

    if within(steps):
        return steps
    if not within(0):
        return 0
    low, high = 0, steps  # within(low), not within(high)
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            low = middle
        else:
            high = middle
    return low


def budget_step_limit(plan: "PrivacyPlan", history: list, steps_taken: int) -> Optional[int]:
    """--max-epsilon: the step count the run must stop before, from what the accountant has recorded
    (a resumed run's history) plus the plan's remaining steps, never from the plan alone."""
    if plan.max_epsilon is None:
        return None
    return steps_taken + steps_within_budget(plan.max_epsilon, noise=plan.noise_multiplier,
                                             sample_rate=plan.sample_rate, steps=plan.steps - steps_taken,
                                             accountant=plan.accountant, delta=plan.delta, spent=history)


def epsilon_after_next_step(plan: "PrivacyPlan", history: list) -> float:
    """Epsilon if one more planned step were taken after ``history`` (inf where it cannot be bounded)."""
    value = bounded_epsilon(plan.accountant, list(history) + [(plan.noise_multiplier, plan.sample_rate, 1)],
                            plan.delta)
    return math.inf if value is None else value


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
    epsilon_by_accountant: dict  # the rigorous accountants' bounds
    epsilon_gdp_approximation: Optional[float]  # labelled approximation, never a guarantee
    budget_steps: Optional[int] = None  # --max-epsilon: the most steps whose epsilon stays within it
    max_epsilon: Optional[float] = None
    # Releases before training, as accountant history entries (--norm bn-dp: (noise, 1.0, 2)); the training
    # accountant starts from them, so every epsilon of the run composes them with DP-SGD's steps.
    prelude: tuple = ()
    prelude_epsilon: Optional[float] = None  # what the prelude alone spends (its share, for --dry-run)

    @property
    def prelude_steps(self) -> int:
        """The prelude's entries in the accountant's step count (not DP-SGD steps)."""
        return steps_in(list(self.prelude))

    def to_dict(self) -> dict:
        return asdict(self)


def prelude_of(config: Config) -> tuple:
    """What a run releases from the private set before training, as accountant history entries."""
    if config.privacy.private and config.model.norm == "bn-dp":
        from dp_layers.dp_bn import accountant_entry

        return (accountant_entry(config.model.norm_noise),)
    return ()


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
    noise, calibrated, epsilon, gdp = None, False, None, None
    by_accountant = {name: None for name in RIGOROUS_ACCOUNTANTS}
    prelude = prelude_of(config)
    prelude_epsilon = bounded_epsilon(p.accountant, list(prelude), p.delta) if prelude else None
    if p.private:
        noise = p.noise
        if p.target_epsilon is not None:
            noise = calibrate_noise(target_epsilon=p.target_epsilon, delta=p.delta,
                                    sample_rate=schedule.sample_rate, steps=steps, accountant=p.accountant,
                                    prelude=prelude)
            calibrated = True
        history = list(prelude) + [(noise, schedule.sample_rate, steps)]
        by_accountant = epsilon_by_accountant(history, p.delta)
        gdp = gdp_approximation(history, p.delta)
        epsilon = by_accountant[p.accountant]
        if epsilon is None:
            raise UserError(f"the {p.accountant} accountant cannot bound epsilon for noise {noise:g}, sample rate "
                            f"{schedule.sample_rate:.4g} and {steps} steps; use more noise or another --accountant")
    budget_steps = None
    if p.private and p.max_epsilon is not None:
        budget_steps = steps_within_budget(p.max_epsilon, noise=noise, sample_rate=schedule.sample_rate,
                                           steps=steps, accountant=p.accountant, delta=p.delta, spent=prelude)
        if budget_steps == 0:
            raise UserError(f"--max-epsilon {p.max_epsilon:g} does not allow a single step at noise {noise:g} and "
                            f"sample rate {schedule.sample_rate:.4g} ({p.accountant}); raise it or add noise")
    return PrivacyPlan(private=p.private, n_train=n_train, batch_size=t.batch_size,
                       sample_rate=schedule.sample_rate, steps_per_epoch=schedule.steps_per_epoch,
                       epochs=t.epochs, steps=steps, expected_batch_size=schedule.expected_batch_size,
                       noise_multiplier=noise, noise_calibrated=calibrated, delta=p.delta,
                       accountant=p.accountant, epsilon=epsilon, epsilon_by_accountant=by_accountant,
                       epsilon_gdp_approximation=gdp,
                       budget_steps=budget_steps, max_epsilon=p.max_epsilon if p.private else None,
                       prelude=prelude, prelude_epsilon=prelude_epsilon)


