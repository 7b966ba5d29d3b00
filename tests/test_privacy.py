"""DP: the whole planned run fits the budget, the ledger persists, and training refuses past it."""

import pytest
import torch

from client.trainer import ledger_for, train_round
from common.data import SiteData
from common.models.generators import build_generator
from common.privacy import BudgetExceeded, LedgerError, PrivacyLedger, calibrate


def test_calibrated_noise_keeps_the_planned_run_within_budget(tmp_path):
    plan = calibrate(epsilon=4.0, delta=1e-5, num_examples=1000, batch_size=50, steps_per_round=20, rounds=5)
    ledger = PrivacyLedger(tmp_path / "l.json", 4.0, 1e-5)
    with ledger.session():
        for r in range(plan.rounds):
            ledger.reserve(r + 1, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    assert 3.9 <= ledger.spent <= 4.0  # tight, not wasteful
    with pytest.raises(BudgetExceeded, match="over this site's budget of 4"):
        ledger.check(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)


def test_more_steps_or_smaller_budget_need_more_noise():
    base = calibrate(8.0, 1e-5, 1000, 50, 20, 5).noise_multiplier
    assert calibrate(8.0, 1e-5, 1000, 50, 20, 10).noise_multiplier > base
    assert calibrate(2.0, 1e-5, 1000, 50, 20, 5).noise_multiplier > base


def test_unsafe_delta_warns_loudly():
    with pytest.warns(UserWarning, match="delta"):
        calibrate(8.0, 0.05, 50, 10, 5, 1)


def test_ledger_survives_a_restart(tmp_path):
    path = tmp_path / "state" / "privacy_ledger.json"
    first = PrivacyLedger(path, 8.0, 1e-5)
    with first.session():
        first.reserve(1, 1.1, 0.05, 40)
        first.commit(1)
    restarted = PrivacyLedger(path, 8.0, 1e-5)
    assert restarted.spent == pytest.approx(first.spent) and restarted.spent > 0
    assert [(r["round"], r["steps"], r["status"]) for r in restarted.rounds] == [(1, 40, "done")]


def test_ledger_refuses_a_different_accountant(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger(path, 8.0, 1e-5, "rdp").save()
    with pytest.raises(LedgerError, match="accountant"):
        PrivacyLedger(path, 8.0, 1e-5, "prv")


def _tiny_site(n: int = 40) -> SiteData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 32, 32, generator=g)
    y = torch.arange(n) % 2
    return SiteData("hospital_a", x, y, x[:8], y[:8])


def test_dp_round_spends_budget_and_refuses_once_it_is_gone(tiny_run, tmp_path):
    site = tiny_run.training_sites[0]
    data = _tiny_site()
    weights = build_generator(tiny_run.model).state_dict()
    spent = []
    for r in range(1, tiny_run.training.rounds + 1):
        result = train_round(tiny_run, site, data, weights, r, tmp_path, torch.device("cpu"))
        weights = result.weights
        spent.append(result.metrics["epsilon"])
    assert 0 < spent[0] < spent[-1] <= site.privacy.epsilon
    assert ledger_for(tiny_run, site, tmp_path).spent == pytest.approx(spent[-1])
    assert spent[-1] >= 0.99 * site.privacy.epsilon  # calibrated to use the budget, not waste it
    # The planned run is over: the site refuses another round and its ledger does not change.
    before = (tmp_path / "privacy_ledger.json").read_text()
    with pytest.raises(BudgetExceeded, match="past the 2 rounds"):
        train_round(tiny_run, site, data, weights, 99, tmp_path, torch.device("cpu"))
    assert (tmp_path / "privacy_ledger.json").read_text() == before
