"""Attack: SecAgg+ reveals one hospital when it is the only one that trained (issue 12, item 4).

Declined and evaluation-only nodes still send masked vectors, of weight zero, so the
masks stay whole. If all but one training site declines, the unmasked "sum" is that
site's update. The defence ends such a round after the masked vectors arrive and
before any node is asked for the key shares that would remove the masks.
"""

import copy
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from flwr.supercore.task_identity import TaskIdentity

from client.trainer import ledger_for
from common.config import load_run
from server.ledger import ServerLedger
from server.secure_aggregation import GuardedSecAggPlusWorkflow, SecureFedAvg
from server.strategy import LedgerFedAvg
from simulations.simulate import run_federation

from ..conftest import TINY

SHAPE = (2, 3)
WEIGHT = 10  # what a node that trained sends; a declined node sends 0


# ------------------------------------------------------------------ the protocol alone
class Nodes:
    """A grid that hands each message to its node's own copy of Flower's client-side SecAgg+ mod.

    ``updates`` maps node id -> (weight, update): the real cryptography, no training.
    Every stage the server asks for is recorded."""

    def __init__(self, updates: dict[int, tuple[int, np.ndarray]]):
        self.updates = updates
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in updates}
        self.stages: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in map(copy.deepcopy, messages):  # over the wire each node gets its own copy
            self.stages.append(str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]))
            replies.append(secaggplus_mod(msg, self.contexts[msg.metadata.dst_node_id], self._train))
        return replies

    def _train(self, msg: Message, ctxt: Context) -> Message:
        weight, update = self.updates[ctxt.node_id]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), weight, {"declined": int(weight == 0)})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


class Coordinator:
    """The strategy side: what reaches ``aggregate_fit``, and which rounds were aborted."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes
        self.aggregates: list[np.ndarray] = []
        self.aborted: list[str] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.aggregates.append(parameters_to_ndarrays(results[0][1].parameters)[0])
        return None, {}

    def abort_fit(self, server_round, results, failures, why):
        self.aborted.append(why)


def secure_round(workflow, updates: dict[int, tuple[int, np.ndarray]]) -> tuple[Nodes, Coordinator]:
    nodes, coordinator = Nodes(updates), Coordinator(list(updates))
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=coordinator)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(SHAPE)]), keep_input=True)
    with pytest.MonkeyPatch.context() as mp:  # who "this process" is, as Flower's ServerApp runner would set it
        for key, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
            mp.setattr(TaskIdentity, key, value)
        workflow(nodes, context)
    return nodes, coordinator


def workflow(guarded: bool):
    kwargs = {"num_shares": 1.0, "reconstruction_threshold": 0.5, "max_weight": float(WEIGHT)}
    return GuardedSecAggPlusWorkflow(**kwargs, min_contributors=2) if guarded else SecAggPlusWorkflow(**kwargs)


LONE = np.linspace(-1.0, 1.0, 6).reshape(SHAPE)  # hospital 1's update; hospitals 2 and 3 declined
ONE_TRAINED = {1: (WEIGHT, LONE), 2: (0, np.zeros(SHAPE)), 3: (0, np.zeros(SHAPE))}


def test_the_attack_unguarded_secagg_hands_the_server_the_lone_update():
    _, coordinator = secure_round(workflow(guarded=False), ONE_TRAINED)
    [aggregate] = coordinator.aggregates
    assert np.allclose(aggregate, LONE, atol=1e-5)  # the "sum" is hospital 1's own update


def test_a_round_with_one_real_contributor_stops_before_any_key_share_is_asked_for():
    nodes, coordinator = secure_round(workflow(guarded=True), ONE_TRAINED)
    # The masked vectors came in; nobody was asked for the shares that remove the masks.
    assert Stage.COLLECT_MASKED_VECTORS in nodes.stages and Stage.UNMASK not in nodes.stages
    assert coordinator.aggregates == []
    [why] = coordinator.aborted
    assert "1 of 3 replies carry a real update" in why and "min_contributors=2" in why


def test_two_real_contributors_are_averaged_as_before():
    other = np.full(SHAPE, 0.5)
    nodes, coordinator = secure_round(workflow(guarded=True), {**ONE_TRAINED, 2: (WEIGHT, other)})
    assert Stage.UNMASK in nodes.stages and coordinator.aborted == []
    [aggregate] = coordinator.aggregates
    assert np.allclose(aggregate, (LONE + other) / 2, atol=1e-5)


def test_a_round_that_samples_fewer_nodes_than_the_minimum_stops_before_anyone_trains():
    guarded = GuardedSecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, max_weight=float(WEIGHT), min_contributors=3)
    nodes, coordinator = secure_round(guarded, {1: (WEIGHT, LONE), 2: (WEIGHT, LONE)})
    assert nodes.stages == [Stage.SETUP, Stage.SETUP]  # no node got the model to train on
    assert coordinator.aggregates == [] and "only 2 training node(s) sampled" in coordinator.aborted[0]


# ------------------------------------------------------------------ the books of an aborted round
def test_an_aborted_round_is_booked_without_crediting_or_charging_anyone(tiny_run, tmp_path):
    ledger = ServerLedger(tmp_path / "privacy_ledger.json")
    rounds = LedgerFedAvg(tmp_path, ledger, min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    strategy = SecureFedAvg(rounds, ArrayRecord({"w": torch.zeros(SHAPE)}), tiny_run)
    figures = {"epsilon-budget": 8.0, "delta": 1e-5}

    def reply(node: int, site: str, weight: int, **metrics):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(SHAPE)]), weight,
                     {"site": site, "reason": metrics.pop("reason", ""), **metrics})
        return SimpleNamespace(node_id=node), res

    strategy.abort_fit(1, [
        reply(1, "hospital_a", WEIGHT, epsilon=3.0, declined=0, **figures),
        reply(2, "hospital_c", 0, epsilon=8.0, declined=1, reason="budget spent", **figures),
        reply(3, "external_d", 0, **{"evaluation-only": 1}),
    ], [], "1 of 3 replies carry a real update")
    books = ledger.summary()
    # hospital_a's ε is the one it reported (its own ledger counted it); the round is not credited to it.
    assert books["hospital_a"]["epsilon"] == 3.0 and books["hospital_a"]["rounds_trained"] == 0
    assert books["hospital_a"]["rejected_rounds"] == [1] and books["hospital_c"]["declined_rounds"] == [1]
    assert "external_d" not in books and rounds.evaluation_only == {3: "external_d"}  # asked only to evaluate from now on
    assert rounds.history["train"] == [] and rounds.history["aborted"] == [{"round": 1, "reason": "1 of 3 replies carry a real update"}]
    assert not (tmp_path / "checkpoints").exists()


def test_an_aborted_round_is_booked_under_the_registered_site_never_the_claimed_one(tiny_run, tmp_path):
    ledger = ServerLedger(tmp_path / "privacy_ledger.json")
    rounds = LedgerFedAvg(tmp_path, ledger, registry={1: "hospital_a", 2: "hospital_c"},
                          min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    strategy = SecureFedAvg(rounds, ArrayRecord({"w": torch.zeros(SHAPE)}), tiny_run)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(SHAPE)]), WEIGHT,
                 {"site": "hospital_a", "reason": "", "epsilon": 3.0, "declined": 0, "epsilon-budget": 8.0, "delta": 1e-5})
    strategy.abort_fit(1, [(SimpleNamespace(node_id=2), res)], [], "1 of 1 replies carry a real update")  # hospital_c's key
    assert "hospital_a" not in ledger.summary()


# ------------------------------------------------------------------ the whole federation
def spend_whole_budget(ledger) -> None:
    """An earlier study took the site to its ε budget (just over it, within the ledger's tolerance)."""
    target, lo, hi = ledger.epsilon_budget * (1 + 5e-7), 0.3, 500.0  # ε(σ = lo) > target > ε(σ = hi)
    for _ in range(80):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ledger.projected(mid, 1.0, 10) > target else (lo, mid)
    with ledger.session():
        ledger.reserve(0, hi, 1.0, 10)
        ledger.commit(0)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_federation_where_all_but_one_site_declines_never_unmasks_the_round(shared_data, tmp_path, monkeypatch):
    run = load_run(TINY, overrides={
        "training": {"rounds": 1},
        "synthesis": {"num_images": 10, "batch_size": 10},
        "federation": {"secure_aggregation": {"enabled": True}},
    })
    run_dir = tmp_path / "run"
    lone, spent = run.training_sites
    spend_whole_budget(ledger_for(run, spent, run_dir / "clients" / spent.name))  # hospital_c will decline
    budget_c = ledger_for(run, spent, run_dir / "clients" / spent.name).spent

    stages, aggregate_fit_calls = [], []
    send_and_receive = InMemoryGrid.send_and_receive

    def grid_spy(self, messages, *args, **kwargs):
        messages = list(messages)
        stages.extend(str(m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
                      for m in messages if RECORD_KEY_CONFIGS in m.content.config_records)
        return send_and_receive(self, messages, *args, **kwargs)

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", grid_spy)
    monkeypatch.setattr(SecureFedAvg, "aggregate_fit", lambda *a: aggregate_fit_calls.append(a) or (None, {}))
    lines = Lines()
    logging.getLogger("flwr").addHandler(lines)
    try:
        with pytest.raises(RuntimeError, match="no round produced a model"):  # the coordinator's own refusal
            run_federation(run, run_dir)
    finally:
        logging.getLogger("flwr").removeHandler(lines)

    # The round was aborted after the masked vectors and before the unmask stage, and said so.
    assert Stage.COLLECT_MASKED_VECTORS in stages and Stage.UNMASK not in stages
    assert aggregate_fit_calls == []
    assert any("Secure round 1 aborted before unmasking" in line and "min_contributors=2" in line for line in lines.lines)
    # Nothing was averaged, checkpointed or released for it.
    assert not list(run_dir.glob("checkpoints/*.pt")) and not (run_dir / "global_model.pt").exists()
    history = json.loads((run_dir / "history.json").read_text())
    assert history["train"] == [] and [a["round"] for a in history["aborted"]] == [1]
    assert "1 of 2 replies carry a real update" in history["aborted"][0]["reason"]
    # The ledger: hospital_c declined; hospital_a's round is booked as not used, at the ε its own
    # ledger counted (nothing extra); hospital_c's budget did not move.
    server = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert server[spent.name]["declined_rounds"] == [1]
    assert server[lone.name]["rejected_rounds"] == [1] and server[lone.name]["rounds_trained"] == 0
    assert "secure round aborted" in server[lone.name]["history"][0]["reason"]
    assert server[lone.name]["epsilon"] == pytest.approx(ledger_for(run, lone, run_dir / "clients" / lone.name).spent)
    assert ledger_for(run, spent, run_dir / "clients" / spent.name).spent == pytest.approx(budget_c)
    assert not any(server[s]["anomalies"] for s in server)
