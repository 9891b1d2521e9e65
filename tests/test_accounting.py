"""src/accounting.py: the budget's step search and noise calibration never overshoot (rigorous accountants
only). Published reference values are checked through --dry-run in test_dry_run.py."""
from __future__ import annotations

import pytest

from src.accounting import (calibrate_noise, epsilon_by_accountant, epsilon_from_history, gdp_approximation,
                            plan_privacy, steps_within_budget)
from src.config import build_config
from src.mnist import DEFAULTS as MNIST_DEFAULTS


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["rdp", "prv"])  # gdp may not guard (test_released_outputs)
@pytest.mark.parametrize("noise,sample_rate,max_epsilon", [(1.0, 0.01, 2.0), (0.8, 0.05, 5.0), (3.0, 0.004, 0.2)])
def test_budget_steps_are_the_last_step_within_the_budget(accountant, noise, sample_rate, max_epsilon):
    """What 'check before each step' decides, asked of the accountant step by step around the answer."""
    steps = 4000
    allowed = steps_within_budget(max_epsilon, noise=noise, sample_rate=sample_rate, steps=steps,
                                  accountant=accountant, delta=1e-5)
    assert 0 < allowed < steps
    assert epsilon_from_history(accountant, [(noise, sample_rate, allowed)], 1e-5) <= max_epsilon
    assert epsilon_from_history(accountant, [(noise, sample_rate, allowed + 1)], 1e-5) > max_epsilon


# GDP is an approximation and may not calibrate (test_released_outputs).
@pytest.mark.slow
@pytest.mark.parametrize("accountant,target", [(a, t) for a in ("rdp", "prv") for t in (0.5, 1.0, 3.0, 8.0)])
def test_calibration_never_overshoots_its_target(accountant, target):
    steps, sample_rate = 2350, 1 / 118
    noise = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=sample_rate, steps=steps,
                            accountant=accountant)
    spent = epsilon_from_history(accountant, [(noise, sample_rate, steps)], 1e-5)
    assert spent <= target
    assert spent > 0.95 * target, "calibration should land close below the target, not far below"


def test_planned_run_at_its_target_spends_at_most_the_target():
    for accountant in ("rdp", "prv"):
        config = build_config({"dataset": "mnist", "target_epsilon": 1.2, "epochs": 20, "accountant": accountant},
                              MNIST_DEFAULTS)
        plan = plan_privacy(config, n_train=60000)
        assert plan.epsilon <= 1.2 and plan.epsilon_by_accountant[accountant] == plan.epsilon


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_a_run_that_took_no_step_has_spent_nothing(accountant):
    """A run that fails before its first step still reports its epsilon (the GDP accountant used to raise on
    the empty history, hiding the run's own error behind an IndexError)."""
    assert epsilon_from_history(accountant, [], 1e-5) == 0.0
    assert gdp_approximation([], 1e-5) == 0.0 and epsilon_by_accountant([], 1e-5) == {"rdp": 0.0, "prv": 0.0}


def test_the_registered_rdp_accountant_is_opacuss_bit_for_bit_and_computes_each_step_once():
    """Opacus's ``rdp`` mechanism is src.accounting's memoizing accountant, and its epsilon equals Opacus's own
    RDPAccountant's exactly (not approximately) on one- and several-entry histories (bn-dp's prelude, a changed
    noise), at Opacus's orders and ours; asking again at a known noise and rate computes no RDP anew."""
    from opacus.accountants import RDPAccountant, create_accountant

    from src.accounting import RDP_ORDERS, OneStepMemoRDPAccountant, rdp_of_one_step

    assert type(create_accountant(mechanism="rdp")) is OneStepMemoRDPAccountant
    histories = [[(1.1, 0.01, 1000)], [(8.0, 1.0, 2), (1.6, 0.25, 8)], [(2.0, 0.004, 7), (0.9, 0.004, 13)],
                 [(20.0, 0.25, 40)]]
    for history in histories:
        for orders in (None, RDP_ORDERS):
            ours, theirs = OneStepMemoRDPAccountant(), RDPAccountant()
            ours.history, theirs.history = list(history), list(history)
            assert ours.get_privacy_spent(delta=1e-5, alphas=orders) == \
                theirs.get_privacy_spent(delta=1e-5, alphas=orders), (history, orders)
    computed = rdp_of_one_step.cache_info().misses
    for steps in (1, 10, 100):
        epsilon_from_history("rdp", [(1.6, 0.25, steps)], 1e-5)
    assert rdp_of_one_step.cache_info().misses == computed, "the one-step RDP of (1.6, 0.25) was cached above"
