"""Noise calibration against a budget, with upper-bounding accountants only.

ε is computed by Opacus' accountants over a history of Poisson-subsampled
Gaussian steps ``(noise_multiplier, sample_rate, steps)``. Only accountants
whose ε is an *upper bound* may calibrate or enforce a budget:

* ``rdp``: Rényi DP of the subsampled Gaussian (Mironov 2017; Mironov, Talwar &
  Zhang 2019), converted to (ε, δ) with Balle et al. 2020 (Opacus' conversion);
* ``prv``: privacy random variables (Gopi, Lee & Wutschitz 2021), whose ε
  Opacus reports as the upper end of its error interval.

``gdp`` (Dong, Roth & Su 2019) is a central-limit *approximation*: in the demo
setting its calibrated σ = 0.603 gives PRV ε = 10.2 against a budget of 8. It is
refused here and may only be shown for information (:func:`epsilon_for`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from opacus.accountants import create_accountant
from scipy.optimize import brentq

UPPER_BOUND_ACCOUNTANTS = ("rdp", "prv")
# Calibration searches σ in this range; below it the RDP/PRV numerics break down,
# above it a step carries no signal (and ε is ~0 anyway).
SIGMA_RANGE = (0.3, 500.0)


class AccountantError(ValueError):
    """An accountant that does not upper-bound ε was asked to calibrate or enforce."""


def require_upper_bound(accountant: str) -> None:
    if accountant not in UPPER_BOUND_ACCOUNTANTS:
        raise AccountantError(
            f"accountant {accountant!r} does not upper-bound epsilon; calibrate and enforce with one of "
            f"{', '.join(UPPER_BOUND_ACCOUNTANTS)}"
        )


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of the composed history (0 when nothing was released)."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def noise_for_budget(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp", spent: list | None = None
) -> float:
    """Smallest σ such that ``spent`` plus ``steps`` more steps at ``sample_rate`` stay within ``epsilon``.

    Raises :class:`ValueError` when even σ = 500 does not fit (the budget is used up).
    """
    require_upper_bound(accountant)
    prior = [tuple(h) for h in (spent or [])]

    def excess(log_sigma: float) -> float:
        with warnings.catch_warnings():  # the search visits σ where RDP's best order is its largest: harmless there
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return epsilon_for(prior + [(math.exp(log_sigma), sample_rate, steps)], delta, accountant) - epsilon

    lo, hi = (math.log(s) for s in SIGMA_RANGE)
    if excess(hi) > 0:
        raise ValueError(f"no noise multiplier up to {SIGMA_RANGE[1]:g} keeps epsilon within {epsilon:g}")
    if excess(lo) <= 0:
        return SIGMA_RANGE[0]
    # brentq brackets the root; xtol on log σ ~ 0.1 % of σ. Round σ *up* so ε stays below the target.
    return math.exp(brentq(excess, lo, hi, xtol=1e-3)) * (1 + 2e-3)


@dataclass(frozen=True)
class DPPlan:
    """The mechanism for one round: Poisson rate q over privacy units, σ, steps."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon: float
    delta: float
    accountant: str


def calibrate(
    epsilon: float,
    delta: float,
    num_examples: int,
    batch_size: int,
    steps_per_round: int,
    rounds: int,
    accountant: str = "rdp",
    spent: list | None = None,
) -> DPPlan:
    """Smallest σ whose ε after ``spent`` plus ``rounds × steps_per_round`` Poisson-sampled steps
    (q = batch_size / num_examples, where an example is one privacy unit) stays within ``epsilon``."""
    if num_examples <= 0:
        raise ValueError("num_examples must be positive")
    q = min(1.0, batch_size / num_examples)
    warn_unsafe(epsilon, delta, num_examples)
    sigma = noise_for_budget(epsilon, delta, q, steps_per_round * rounds, accountant, spent)
    return DPPlan(sigma, q, steps_per_round, rounds, epsilon, delta, accountant)


def warn_unsafe(epsilon: float, delta: float, num_examples: int) -> None:
    if delta >= 1.0 / num_examples:
        warnings.warn(
            f"delta={delta:g} is not below 1/N={1.0 / num_examples:g}: the guarantee allows "
            "leaking whole records. Use delta << 1/N.",
            UserWarning,
            stacklevel=3,
        )
    if epsilon > 10:
        warnings.warn(f"epsilon={epsilon:g} is a weak privacy guarantee (> 10).", UserWarning, stacklevel=3)
