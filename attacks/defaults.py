"""Attack names and default step sizes; torch-free so the flag parser can use them."""
from __future__ import annotations

ATTACKS = ("pgd", "fgsm-rs")
# robust evaluation: PGD (--eval-pgd-*), AutoAttack's standard version, or its white-box pair (attacks.autoattack)
EVAL_ATTACKS = ("pgd", "autoattack", "apgd")
ENSEMBLES = ("autoattack", "apgd")  # the evaluation attacks with their own budgets and restarts
PGD_NORMS = ("linf", "l2")


def default_alpha(method: str, eps: float, steps: int) -> float:
    """Step size when none is given: 2.5 eps / steps for PGD (Madry et al. 2018), so the steps can cross
    the ball and back; 1.25 eps for FGSM-RS (Wong, Rice and Kolter 2020)."""
    return 1.25 * eps if method == "fgsm-rs" else 2.5 * eps / max(steps, 1)
