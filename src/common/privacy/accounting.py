"""Noise calibration for a whole planned run, and unsafe-setting warnings."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class DPPlan:
    """Fixed for the whole run so that every round uses the same mechanism."""

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
) -> DPPlan:
    """Smallest noise multiplier whose ε after all ``rounds × steps_per_round`` Poisson-sampled
    steps (sampling rate q = batch_size / num_examples) stays within ``epsilon``."""
    if num_examples <= 0:
        raise ValueError("num_examples must be positive")
    q = min(1.0, batch_size / num_examples)
    warn_unsafe(epsilon, delta, num_examples)
    sigma = get_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=delta,
        sample_rate=q,
        steps=steps_per_round * rounds,
        accountant=accountant,
        epsilon_tolerance=0.01,
    )
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
