"""The empirical privacy audit: its lower bound holds with DP on, and it catches a broken mechanism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from common.data import load_site
from common.evaluation.audit import audit_site, broken_mechanism, epsilon_lower, guess_and_bound

CLAIMED = 2.0  # small enough that a one-run audit with 1,000 canaries can exceed it


@pytest.fixture(scope="module")
def audit_setup(tiny_run):
    """hospital_c's real images (a subset), one round of 60 DP steps, a budget of ε = 2."""
    run = dataclasses.replace(tiny_run, training=dataclasses.replace(tiny_run.training, rounds=1, local_steps=60, batch_size=64))
    site = tiny_run.training_sites[1]
    site = dataclasses.replace(site, privacy=dataclasses.replace(site.privacy, epsilon=CLAIMED))
    data = load_site(run, site)
    data = dataclasses.replace(data, train_x=data.train_x[:300], train_y=data.train_y[:300])
    return run, site, data


def test_bound_matches_the_closed_form_for_perfect_guesses():
    # r correct of r guesses rejects ε-DP once q^r < 0.05 with q = e^ε / (1 + e^ε).
    q = 0.05 ** (1 / 100)
    assert epsilon_lower(1000, 100, 100, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), rel=1e-3)
    assert epsilon_lower(1000, 100, 50, 1e-5, 0.05) == 0.0  # chance accuracy proves nothing


def test_random_scores_give_no_lower_bound():
    gen = torch.Generator().manual_seed(0)
    included = (torch.rand(1000, generator=gen) < 0.5).numpy()
    scores = {"weights": torch.randn(1000, generator=gen).numpy()}
    assert guess_and_bound(scores, included, 1e-5)["epsilon_lower"] < 0.5


def test_with_dp_the_lower_bound_stays_below_the_accounted_epsilon(audit_setup):
    run, site, data = audit_setup
    result = audit_site(run, site, data, canaries=1000, seed=0)
    assert result["epsilon_accounted"] <= CLAIMED
    assert result["epsilon_lower"] <= result["epsilon_accounted"] and result["violation"] is False


def test_noise_switched_off_is_caught(audit_setup):
    run, site, data = audit_setup
    with broken_mechanism("noise_off", run.seed):
        result = audit_site(run, site, data, canaries=1000, seed=0)
    assert result["violation"] is True and result["epsilon_lower"] > CLAIMED


def test_noise_seeded_from_the_public_run_seed_is_caught(audit_setup):
    """The defect of issue 9 item 1: DP randomness that anyone holding the run's seed can replay."""
    run, site, data = audit_setup
    with broken_mechanism("public_seed", run.seed):
        result = audit_site(run, site, data, canaries=1000, seed=0)
    assert result["attack"] == "replay"
    assert result["violation"] is True and result["epsilon_lower"] > CLAIMED
