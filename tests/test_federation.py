"""The ClientApp and the strategy, driven with real Flower Messages (no engine)."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict


from common.checks import CheckFailed, check_weights
from client.client_app import make_client_app
from common.models.generators import build_generator
from server.ledger import ServerLedger
from server.strategy import LedgerFedAvg

from .conftest import Grid


@pytest.fixture(autouse=True)
def _messages_need_a_task(task_identity):
    yield


def reply(site: str, weights: dict, declined: bool = False, eps: float = 1.0) -> Message:
    metrics = {"weight": 1.0, "epsilon": eps, "epsilon-budget": 8.0, "delta": 1e-5, "declined": float(declined)}
    content = {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": site, "reason": "budget spent" if declined else ""})}
    if not declined:
        content["arrays"] = ArrayRecord(weights)
    return Message(content=RecordDict(content), dst_node_id=0, message_type=MessageType.TRAIN)


def test_fedavg_weighs_sites_equally_skips_declined_sites_and_checkpoints(tmp_path):
    ledger = ServerLedger(tmp_path / "ledger.json")
    strategy = LedgerFedAvg(tmp_path, ledger, min_train_nodes=1, min_available_nodes=1)
    strategy.current = {"w": torch.zeros(3), "b": torch.ones(2)}
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.full((3,), 4.0), "b": torch.full((2,), 3.0)}
    c = {"w": torch.full((3,), 100.0), "b": torch.full((2,), 100.0)}
    arrays, metrics = strategy.aggregate_train(
        1, [reply("a", a), reply("b", b), reply("c", c, declined=True, eps=8.0)]
    )
    avg = arrays.to_torch_state_dict()
    # Example counts are private, so sites weigh the same: (0 + 4) / 2.
    assert torch.allclose(avg["w"], torch.full((3,), 2.0))
    assert torch.allclose(avg["b"], torch.full((2,), 2.0))
    assert metrics["sites-averaged"] == 2
    summary = ledger.summary()
    assert summary["c"]["declined_rounds"] == [1] and summary["c"]["history"][0]["reason"] == "budget spent"
    assert summary["a"]["rounds_trained"] == 1 and summary["a"]["epsilon"] == 1.0
    saved = torch.load(tmp_path / "checkpoints" / "round_0001.pt")
    assert saved["round"] == 1 and torch.equal(saved["weights"]["w"], avg["w"])


def test_malformed_updates_are_rejected_and_logged_never_averaged(tmp_path):
    ledger = ServerLedger(tmp_path / "ledger.json")
    strategy = LedgerFedAvg(tmp_path, ledger, min_train_nodes=1, min_available_nodes=1)
    strategy.current = {"w": torch.zeros(3), "b": torch.ones(2)}
    good = {"w": torch.full((3,), 2.0), "b": torch.ones(2)}
    bad = {
        "keys": {"w": torch.zeros(3), "other": torch.ones(2)},
        "shape": {"w": torch.zeros(4), "b": torch.ones(2)},
        "dtype": {"w": torch.zeros(3, dtype=torch.float64), "b": torch.ones(2)},
        "nan": {"w": torch.tensor([0.0, float("nan"), 0.0]), "b": torch.ones(2)},
    }
    replies = [reply("good", good)] + [reply(name, w) for name, w in bad.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.equal(arrays.to_torch_state_dict()["w"], good["w"])  # only the good one counted
    summary = ledger.summary()
    for name in bad:
        assert summary[name]["rejected_rounds"] == [1] and summary[name]["rounds_trained"] == 0
        assert "update rejected" in summary[name]["history"][0]["reason"]
    assert summary["good"]["rounds_trained"] == 1


def test_all_sites_declining_keeps_the_previous_model(tmp_path):
    strategy = LedgerFedAvg(tmp_path, ServerLedger(tmp_path / "l.json"), min_train_nodes=1, min_available_nodes=1)
    arrays, _ = strategy.aggregate_train(2, [reply("a", {}, declined=True)])
    assert arrays is None and not (tmp_path / "checkpoints").exists()


def test_client_rejects_malformed_global_weights(tiny_run):
    good = build_generator(tiny_run.model).state_dict()
    bad_shape = {**good, next(iter(good)): torch.zeros(1)}
    with pytest.raises(CheckFailed, match="expected"):
        check_weights(bad_shape, good, "test")
    key = next(k for k, v in good.items() if v.is_floating_point())
    with pytest.raises(CheckFailed, match="NaN"):
        check_weights({**good, key: torch.full_like(good[key], float("nan"))}, good, "test")
    with pytest.raises(CheckFailed, match="missing"):
        check_weights({k: v for k, v in good.items() if k != key}, good, "test")


def _train_message(tiny_run, run_dir, server_round: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord(build_generator(tiny_run.model).state_dict()),
        "config": ConfigRecord({"server-round": server_round, "run-dir": str(run_dir)}),
    })
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_clientapp_trains_then_declines_with_a_reason_and_sends_no_pixels(tiny_run, tmp_path):
    app = make_client_app(lambda _ctx: tiny_run)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
    for r in range(1, tiny_run.training.rounds + 1):
        out = app(_train_message(tiny_run, tmp_path, r), ctx)
        assert not out.has_error(), out.error
        assert out.content["metrics"]["declined"] == 0
    # Only model weights and scalars leave: every array is a model parameter.
    assert set(out.content["arrays"].keys()) == set(build_generator(tiny_run.model).state_dict().keys())
    assert out.content["site"]["site"] == "hospital_c"
    eps = out.content["metrics"]["epsilon"]
    assert 0 < eps <= tiny_run.training_sites[1].privacy.epsilon

    out = app(_train_message(tiny_run, tmp_path, 99), ctx)
    assert out.content["metrics"]["declined"] == 1
    assert "past the 2 rounds" in out.content["site"]["reason"]
    assert "arrays" not in out.content
    assert out.content["metrics"]["epsilon"] == pytest.approx(eps)


def test_deployed_node_refuses_non_private_training(tiny_run, tmp_path):
    import dataclasses

    run = dataclasses.replace(tiny_run, training=dataclasses.replace(tiny_run.training, dp=False))
    deployed = make_client_app(lambda _ctx: run)  # simulation=False: a real hospital node
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    out = deployed(_train_message(run, tmp_path, 1), ctx)
    assert out.content["metrics"]["declined"] == 1 and "only with differential privacy" in out.content["site"]["reason"]
    assert "arrays" not in out.content


@pytest.mark.parametrize("site_yaml, reason", [("external_d", "evaluation-only"), ("hospital_b", "not a training site")])
def test_a_node_that_must_not_train_says_so_and_is_only_asked_to_evaluate(tiny_run, tmp_path, site_yaml, reason):
    from .conftest import REPO

    app = make_client_app(lambda _ctx: tiny_run)  # tiny trains hospital_a and hospital_c only
    node = {"site-config": str(REPO / "sites" / f"{site_yaml}.yaml"), "state-dir": str(tmp_path)}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    msg = _train_message(tiny_run, tmp_path, 1)
    out = app(msg, ctx)
    assert out.content["metrics"]["evaluation-only"] == 1 and reason in out.content["site"]["reason"]
    assert "arrays" not in out.content and not (tmp_path / "privacy_ledger.json").exists()

    strategy = LedgerFedAvg(tmp_path, ServerLedger(tmp_path / "l.json"), min_train_nodes=1, min_available_nodes=1)
    strategy.current = build_generator(tiny_run.model).state_dict()
    assert strategy.aggregate_train(1, [out]) == (None, None)
    assert strategy.evaluation_only == {out.metadata.src_node_id: site_yaml} and ServerLedger(tmp_path / "l.json").summary() == {}


def test_sites_evaluate_the_previous_global_model_inside_their_train_call(tmp_path):
    """One message per site per round: evaluate messages only for evaluation-only sites, and after the last round."""
    s = LedgerFedAvg(tmp_path, ServerLedger(tmp_path / "l.json"), evaluate_in_train=True, min_train_nodes=1, min_available_nodes=1)
    s.num_rounds, grid = 3, Grid([11, 12, 13])
    first = list(s.configure_train(1, ArrayRecord({}), ConfigRecord({}), grid))
    second = list(s.configure_train(2, ArrayRecord({}), ConfigRecord({}), grid))
    assert first[0].content["config"]["evaluate-incoming"] == 0  # round 1 brings the initial model
    assert second[0].content["config"]["evaluate-incoming"] == 1
    # Nodes that never answered as training sites are asked by message: all three, before any reply.
    assert len(list(s.configure_evaluate(1, ArrayRecord({}), ConfigRecord({}), grid))) == 3
    s.training_nodes, s.evaluation_only = {11, 12}, {13: "external_d"}
    assert [m.metadata.dst_node_id for m in s.configure_evaluate(2, ArrayRecord({}), ConfigRecord({}), grid)] == [13]
    assert len(list(s.configure_evaluate(3, ArrayRecord({}), ConfigRecord({}), grid))) == 3  # after the last round: everyone

    weights = {"w": torch.ones(2)}
    s.current = weights
    msg = reply("hospital_a", weights)
    msg.content["metrics"]["evaluated"] = 1.0
    s.aggregate_train(2, [msg])
    assert s.history["evaluate"] == [{"round": 1, "site": "hospital_a", "evaluated": 1, "weight": 1}]

    # A paused run evaluated round 2 after its last round: on resume, round 3 does not evaluate it again.
    s.history["evaluate"].append({"round": 2, "site": "hospital_a"})
    assert list(s.configure_train(3, ArrayRecord({}), ConfigRecord({}), grid))[0].content["config"]["evaluate-incoming"] == 0

    separate = LedgerFedAvg(tmp_path, ServerLedger(tmp_path / "m.json"), min_train_nodes=1, min_available_nodes=1)
    separate.num_rounds = 3
    assert list(separate.configure_train(2, ArrayRecord({}), ConfigRecord({}), grid))[0].content["config"]["evaluate-incoming"] == 0
    assert len(list(separate.configure_evaluate(1, ArrayRecord({}), ConfigRecord({}), grid))) == 3


def test_a_site_asked_to_evaluate_the_incoming_model_keeps_the_loss_in_its_own_log(tiny_run, tmp_path):
    import json

    app = make_client_app(lambda _ctx: tiny_run)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    msg = _train_message(tiny_run, tmp_path, 2)
    msg.content["config"]["evaluate-incoming"] = 1
    out = app(msg, ctx)
    assert out.content["metrics"]["evaluated"] == 1 and out.content["metrics"]["declined"] == 0
    assert not any("loss" in k for k in out.content["metrics"].keys())
    log = json.loads((tmp_path / "clients" / "hospital_a" / "local_log.json").read_text())
    assert [e["round"] for e in log if e["kind"] == "evaluate"] == [1] and [e["round"] for e in log if e["kind"] == "train"] == [2]


def test_an_evaluation_that_fails_does_not_cost_the_site_its_training_round(tiny_run, tmp_path, monkeypatch):
    import json

    import client.client_app as client_app

    def broken(*_args, **_kwargs):
        raise ValueError("empty held-out set")

    monkeypatch.setattr(client_app, "heldout_loss", broken)
    app = make_client_app(lambda _ctx: tiny_run)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    msg = _train_message(tiny_run, tmp_path, 2)
    msg.content["config"]["evaluate-incoming"] = 1
    out = app(msg, ctx)
    assert not out.has_error() and out.content["metrics"]["evaluated"] == 0 and out.content["metrics"]["declined"] == 0
    log = json.loads((tmp_path / "clients" / "hospital_a" / "local_log.json").read_text())
    assert [e["kind"] for e in log] == ["evaluate_failed", "train"] and "empty held-out set" in log[0]["reason"]
