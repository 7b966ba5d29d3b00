"""Many simulated hospitals: generated sites, size and label skew, client sampling, dropouts,
and the ledger audit that says every site's budget held (docs/scaling.md)."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from common.config import ConfigError, load_run, run_from_dict
from common.data.partition import sized_label_skewed_partition

from .conftest import Grid
from common.evaluation.ledgers import audit_ledgers
from common.site_generator import power_law_shares

from .conftest import REPO

MANY = REPO / "simulations" / "many_sites.yaml"
LABELS = np.array([0] * 1300 + [1] * 3700)


def generated(n: int, **spec) -> dict:
    return {"sites": ["../sites/external_d.yaml", {"generate": {"n": n, "template": "../sites/hospital_a.yaml", **spec}}]}


def test_a_generated_federation_is_a_list_of_ordinary_sites(shared_data):
    run = load_run(MANY)
    sites = run.training_sites
    assert len(sites) == 100 and sites[0].name == "site_000" and sites[-1].name == "site_099"
    assert [s.name for s in run.external_sites] == ["external_d"]
    # Power-law sizes: share of site k ~ 1/(k+1).
    assert sites[0].share / sites[9].share == pytest.approx(10.0)
    # Each scanner drawn in its configured range; budgets in turn from the list.
    for s in sites:
        assert 0.85 <= s.acquisition.gamma <= 1.2 and 0.0 <= s.acquisition.blur_sigma <= 0.8
    assert len({s.acquisition.gamma for s in sites}) == 100 and len({s.acquisition.seed for s in sites}) == 100
    assert [s.privacy.epsilon for s in sites[:4]] == [8.0, 5.0, 8.0, 5.0]
    # config.json carries the expanded sites: a resumed run sees the same hospitals.
    again = run_from_dict(json.loads(json.dumps(run.to_dict())))
    assert again.sites == run.sites


def test_adding_sites_keeps_the_earlier_sites_scanners(shared_data):
    spec = {"acquisition": {"gamma": [0.8, 1.2]}, "seed": 3}
    ten, twenty = load_run(MANY, overrides=generated(10, **spec)), load_run(MANY, overrides=generated(20, **spec))
    assert [s.acquisition for s in ten.training_sites] == [s.acquisition for s in twenty.training_sites[:10]]


@pytest.mark.parametrize("bad, field", [({"n": 0}, "n"), ({"acquisition": {"gamma": [-1.0, 0.5]}}, "gamma"),
                                        ({"acquisition": {"colour": [0, 1]}}, "acquisition"), ({"template": "../sites/external_d.yaml"}, "template")])
def test_a_bad_generator_is_refused_naming_the_field(shared_data, bad, field):
    spec = {"n": 5, "template": "../sites/hospital_a.yaml", **bad}
    with pytest.raises(ConfigError, match=field):
        load_run(MANY, overrides={"sites": [{"generate": spec}]})


def test_sized_partition_follows_the_shares_with_skewed_labels():
    shares = power_law_shares(50, 1.0)
    parts = sized_label_skewed_partition(LABELS, shares, alpha=0.3, seed=1, min_images=16)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist()))  # disjoint
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 16 and sizes.sum() > 0.98 * len(LABELS)  # floor, then the rest of the pool by share
    assert sizes[0] > 5 * sizes[-1]
    expected = 16 + np.floor(np.array(shares) * (len(LABELS) - 50 * 16))
    assert np.allclose(sizes, expected)
    # Strong skew at small alpha: many sites are (nearly) one class; at large alpha the mix is near the pool's.
    skewed = [LABELS[p].mean() for p in parts]
    mild = [LABELS[p].mean() for p in sized_label_skewed_partition(LABELS, shares, alpha=100.0, seed=1, min_images=16)]
    assert np.std(skewed) > 3 * np.std(mild)
    again = sized_label_skewed_partition(LABELS, shares, alpha=0.3, seed=1, min_images=16)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_the_sized_partition_keeps_every_class_floor_where_the_pool_allows():
    labels = np.repeat([0, 1, 2], 3000)
    for seed in range(20):
        parts = sized_label_skewed_partition(labels, [1.0] * 10, alpha=0.1, seed=seed, min_per_class=200)
        assert all(np.bincount(labels[p], minlength=3).min() >= 200 for p in parts)
        assert [len(p) for p in parts] == [900] * 10


def test_a_pool_too_small_for_the_floor_is_refused():
    with pytest.raises(ValueError, match="min_images"):
        sized_label_skewed_partition(LABELS, [1.0] * 100, alpha=1.0, seed=0, min_images=60)


def grid_of(n: int) -> Grid:
    return Grid(range(100, 100 + n))


def strategy(tmp_path, **kw):
    from server.ledger import ServerLedger
    from server.strategy import LedgerFedAvg

    return LedgerFedAvg(tmp_path, ServerLedger(tmp_path / "ledger.json"), sampling_seed=5, min_available_nodes=1, **kw)


def test_each_round_samples_the_configured_share_reproducibly(tmp_path, task_identity):
    from flwr.app import ArrayRecord, ConfigRecord

    s = strategy(tmp_path, fraction_train=0.05, min_train_nodes=3)
    grid = grid_of(100)
    draws = [s.sample(grid, r, 0.05, 3, train=True)[0] for r in range(1, 6)]
    assert all(len(d) == 5 and len(set(d)) == 5 for d in draws)  # max(0.05 x 100, 3)
    assert len({tuple(d) for d in draws}) == 5  # a new draw each round
    assert draws == [strategy(tmp_path).sample(grid, r, 0.05, 3, train=True)[0] for r in range(1, 6)]  # repeatable
    assert len(s.sample(grid_of(20), 1, 0.05, 3, train=True)[0]) == 3  # the minimum decides
    s.evaluation_only = {n: "external" for n in grid.node_ids[:98]}
    assert sorted(s.sample(grid, 1, 0.05, 3, train=True)[0]) == grid.node_ids[98:]  # only nodes that train are drawn
    s = strategy(tmp_path, fraction_train=0.05, min_train_nodes=3)
    msgs = list(s.configure_train(1, ArrayRecord({}), ConfigRecord({}), grid_of(40)))
    assert len(msgs) == 3 and s.history["sampled"][-1] == {"round": 1, "nodes": 3, "of": 40}


def test_simulated_dropouts_are_seeded_and_near_their_rate(tiny_run):
    from client.client_app import simulated_fault

    run = dataclasses.replace(tiny_run, federation=dataclasses.replace(tiny_run.federation, dropout_rate=0.2, straggler_rate=0.1))
    sites = [dataclasses.replace(tiny_run.training_sites[0], name=f"s{i}") for i in range(200)]
    faults = Counter(simulated_fault(run, s, r) for s in sites for r in range(1, 11))
    assert 0.17 < faults["dropout"] / 2000 < 0.23 and 0.06 < faults["straggler"] / 2000 < 0.10
    assert [simulated_fault(run, s, 3) for s in sites] == [simulated_fault(run, s, 3) for s in sites]


def test_a_deployed_node_ignores_the_simulated_faults(tiny_run, tmp_path, task_identity):
    from flwr.app import Context, RecordDict

    from client.client_app import make_client_app

    from .test_federation import _train_message

    run = dataclasses.replace(tiny_run, federation=dataclasses.replace(tiny_run.federation, dropout_rate=0.99))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    assert not make_client_app(lambda _ctx: run)(_train_message(run, tmp_path, 1), ctx).has_error()
    out = make_client_app(lambda _ctx: run, simulation=True)(_train_message(run, tmp_path, 2), ctx)
    assert out.has_error() and "simulated dropout" in out.error.reason
    log = json.loads((tmp_path / "clients" / "hospital_a" / "local_log.json").read_text())
    assert [e["kind"] for e in log] == ["train", "simulated_dropout"]  # round 2: nothing read, nothing spent


def test_the_ledger_audit_catches_a_coordinator_overstating_or_a_spend_in_a_dropped_round(tiny_run, tmp_path, task_identity):
    from flwr.app import Context, RecordDict

    from client.client_app import make_client_app

    from .test_federation import _train_message

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    make_client_app(lambda _ctx: tiny_run)(_train_message(tiny_run, tmp_path, 1), ctx)
    site = tiny_run.training_sites[0].name
    spent = audit_ledgers(tiny_run, tmp_path)["sites"][site]["epsilon"]
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({site: {"epsilon": spent}}))
    assert audit_ledgers(tiny_run, tmp_path)["ok"]
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({site: {"epsilon": spent + 0.5}}))
    assert "more than the site's ledger" in audit_ledgers(tiny_run, tmp_path)["sites"][site]["problems"][0]
    (tmp_path / "privacy_ledger.json").unlink()
    log = tmp_path / "clients" / site / "local_log.json"
    log.write_text(json.dumps([*json.loads(log.read_text()), {"round": 1, "kind": "simulated_dropout"}]))
    assert "dropped out of: [1]" in audit_ledgers(tiny_run, tmp_path)["sites"][site]["problems"][0]


def test_the_terminal_lists_the_active_sites_of_a_large_federation(shared_data, tmp_path):
    from simulations.progress import MAX_ROWS, FederationProgress

    run = load_run(MANY)
    view = FederationProgress(run, tmp_path)
    view.progress = {"sites": {"site_042": {"rounds_trained": 1, "train_loss_by_round": [(2, 0.9)]},
                               "site_007": {"rounds_trained": 1, "train_loss_by_round": [(1, 0.8)]}}}
    shown, hidden = view.rows()
    assert len(shown) == MAX_ROWS and shown[:2] == ["site_042", "site_007"] and len(hidden) == 100 - MAX_ROWS


def test_the_report_never_says_a_site_spent_less_than_its_own_ledger(tiny_run, tmp_path, task_identity):
    """A reply lost after the site committed its round (a timeout, a straggler) leaves the coordinator's
    ledger short: the report takes the site's own ledger, or its budget where the site's ledger is elsewhere."""
    from flwr.app import Context, RecordDict

    from client.client_app import make_client_app
    from simulations.evaluate import known_spend, worst_site_budget

    from .test_federation import _train_message

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    make_client_app(lambda _ctx: tiny_run)(_train_message(tiny_run, tmp_path, 1), ctx)
    a, c = tiny_run.training_sites
    spent = audit_ledgers(tiny_run, tmp_path)["sites"][a.name]["epsilon"]
    assert spent > 0
    lost = known_spend(tiny_run, tmp_path, {}, a, simulated=True)  # the coordinator never heard from it
    assert lost["epsilon"] == pytest.approx(spent) and not lost.get("epsilon_upper_bound_only")
    assert known_spend(tiny_run, tmp_path, {}, c, simulated=True)["epsilon"] == 0.0  # no ledger in its folder: never trained
    elsewhere = known_spend(tiny_run, tmp_path, {}, c, simulated=False)  # a deployment: no reply, its ledger is at the site
    assert elsewhere["epsilon"] == c.privacy.epsilon and elsewhere["epsilon_upper_bound_only"]
    assert worst_site_budget([lost, elsewhere]) == (max(spent, c.privacy.epsilon), c.privacy.delta)
    no_dp = dataclasses.replace(tiny_run, training=dataclasses.replace(tiny_run.training, dp=False))
    assert worst_site_budget([known_spend(no_dp, tmp_path, {}, a, simulated=True)]) == (None, None)
