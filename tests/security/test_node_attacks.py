"""Issue 12, items 1 (site binding), 5, 6 and 7, replayed on the server strategy and the ClientApp
in process (the same code a deployed node and the ServerApp run; the process-level replays are in
test_federation_attacks.py)."""

import dataclasses
import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client.client_app as client_app
from common.appconfig import registry_from_context, run_from_context, ship_run
from common.config import ConfigError, load_run
from common.models.generators import build_generator
from server.ledger import ServerLedger
from server.strategy import LedgerFedAvg
from simulations import deploy
from simulations.cli import main as cli

from ..conftest import REPO, TINY, Grid

METRICS = {"epsilon": 1.0, "epsilon-budget": 8.0, "delta": 1e-5, "declined": 0, "weight": 1}


# ------------------------------------------------------------------ item 1: the server uses the binding
def test_a_node_claiming_another_sites_name_writes_nothing_in_that_sites_name(tmp_path):
    ledger = ServerLedger(tmp_path / "privacy_ledger.json")
    strategy = LedgerFedAvg(tmp_path, ledger, registry={11: "hospital_a", 22: "hospital_b"})
    assert not strategy.admit(1, 22, "hospital_a", METRICS, "", None)  # hospital_b's key, hospital_a's name
    assert not strategy.admit(1, 33, "hospital_a", METRICS, "", None)  # a key nobody registered
    assert "hospital_a" not in ledger.summary() and strategy.history["train"] == []
    assert strategy.admit(1, 11, "hospital_a", METRICS, "", None)
    assert set(ledger.summary()) == {"hospital_a"}


def test_work_goes_only_to_registered_nodes(tmp_path, task_identity):
    strategy = LedgerFedAvg(tmp_path, ServerLedger(tmp_path / "l.json"), registry={11: "hospital_a", 22: "hospital_b"},
                            min_available_nodes=1, min_train_nodes=1)
    arrays = ArrayRecord({"w": torch.zeros(2)})
    for configure in (strategy.configure_train, strategy.configure_evaluate):
        msgs = configure(1, arrays, ConfigRecord({}), Grid([11, 22, 33]))
        assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 22]


def test_a_deployed_server_app_refuses_to_start_without_a_node_registry(tmp_path):
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"node-registry": ""})
    with pytest.raises(ConfigError, match="node-registry is not set"):
        registry_from_context(ctx)
    (tmp_path / "reg.json").write_text(json.dumps({"nodes": {"11": {"site": "hospital_a"}}}))
    ctx.run_config["node-registry"] = str(tmp_path / "reg.json")
    assert registry_from_context(ctx) == {11: "hospital_a"}


# ------------------------------------------------------------------ items 5 and 6: what a node sends
def _message(kind: str, run_dir) -> Message:
    content = RecordDict({"arrays": ArrayRecord(build_generator(load_run(TINY).model).state_dict()),
                          "config": ConfigRecord({"server-round": 1, "run-dir": str(run_dir)})})
    return Message(content, dst_node_id=1, message_type=kind)


def _deployed_node(site_yaml, state_dir=None) -> Context:
    node = {"site-config": str(site_yaml)} | ({"state-dir": str(state_dir)} if state_dir else {})
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_an_error_reaches_the_coordinator_as_a_code_and_the_details_stay_at_the_site(tiny_run, tmp_path, monkeypatch, task_identity):
    secret = "/data/scans/Smith_John_DOB19700101_MRN12345.dcm"

    def failing_loader(run, site):
        raise FileNotFoundError(f"{secret}: cannot be read")

    monkeypatch.setattr(client_app, "load_site_data", failing_loader)
    app = client_app.make_client_app(lambda _ctx: tiny_run)
    site_yaml = tiny_run.training_sites[0].origin
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = app(_message(kind, tmp_path / "run"), _deployed_node(site_yaml, tmp_path / "state"))
        assert reply.has_error()
        reason = reply.error.reason
        assert reason.startswith("site error: data_missing (incident ") and "Smith" not in reason and "/" not in reason
        incident = reason.split("incident ")[1].split(";")[0]
        local = (tmp_path / "state" / "site_errors.log").read_text()
        assert incident in local and secret in local  # the operator can find what happened


def test_a_deployed_node_without_a_local_state_folder_refuses_to_train(tiny_run, tmp_path, task_identity):
    app = client_app.make_client_app(lambda _ctx: tiny_run)
    reply = app(_message(MessageType.TRAIN, tmp_path / "run"), _deployed_node(tiny_run.training_sites[0].origin))
    assert reply.has_error() and "ledger_error" in reply.error.reason
    assert not list((tmp_path / "run").rglob("privacy_ledger*"))  # no budget was opened under the coordinator's run folder


def test_fedsynth_client_refuses_to_start_without_a_state_folder(tmp_path, capsys):
    site = tmp_path / "hospital_z.yaml"
    site.write_text("name: hospital_z\nprivacy: {epsilon: 8, delta: 1.0e-5}\n")  # no state_dir
    assert cli(["client", "--site", str(site), "--superlink", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "no state folder for this node" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ item 7: the run travels as content
def test_hospitals_get_the_run_as_hashed_content_not_a_path(tiny_run, tmp_path):
    shipped = ship_run(tiny_run)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"config": "/nowhere/at/all.yaml", **shipped})
    assert run_from_context(ctx).to_dict() == tiny_run.to_dict()
    cmd = deploy.launch_command(tiny_run, tmp_path / "run", tmp_path / "node_registry.json")
    assert str(TINY) not in " ".join(cmd) and f"config-sha256='{shipped['config-sha256']}'" in cmd[cmd.index("--run-config") + 1]


def test_a_run_config_altered_in_transit_is_refused(tiny_run):
    shipped = ship_run(dataclasses.replace(tiny_run, seed=1))
    shipped["config-sha256"] = ship_run(tiny_run)["config-sha256"]  # content swapped, hash kept
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=shipped)
    with pytest.raises(ConfigError, match="does not match config-sha256"):
        run_from_context(ctx)


def test_a_missing_dataset_stops_a_simulation_in_seconds_with_one_line_naming_the_site(tmp_path, shared_data):
    from simulations.simulate import simulate_run

    site = tmp_path / "hospital_gone.yaml"
    site.write_text("name: hospital_gone\nprivacy: {epsilon: 8, delta: 1.0e-5}\n"
                    f"source: {{kind: medmnist, path: {tmp_path / 'missing.npz'}}}\n")
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "tests" / "configs" / "tiny.yaml").read_text().replace("../../sites/", str(REPO / "sites") + "/")
                      .replace(f"{REPO / 'sites'}/hospital_c.yaml", str(site)))
    run = load_run(config)
    assert "hospital_gone" in {s.name for s in run.sites}
    start = time.time()
    with pytest.raises(ConfigError, match="hospital_gone.yaml: source: source.path: .*missing.npz does not exist") as err:
        simulate_run(run, tmp_path / "runs" / "r")
    assert time.time() - start < 30 and "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing started, nothing to clean up
