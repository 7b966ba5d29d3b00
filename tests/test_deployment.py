"""Real deployment on 127.0.0.1: the demo federation's four hospitals as SuperNode processes
(three train, the external one only evaluates) behind a SuperLink with TLS and SuperNode
authentication, and the faults a deployment meets. Processes are stopped by pid group."""

import json

import pytest
import torch

from common.security.certs import keygen
from common.security.signing import VerificationError, verify_release
from simulations import deploy
from simulations.deploy import free_port, stop, wait_for

from .conftest import DEPLOY_SITES as SITES
from .conftest import FAULT_APP, REPO

TRAINING = {"hospital_a": 8.0, "hospital_b": 8.0, "hospital_c": 5.0}  # ε budgets in the site YAMLs
CONFIG = REPO / "tests" / "configs" / "deploy.yaml"  # 2 rounds, at least 2 sites per round


def assert_staged_unsigned(run_dir):
    """The ServerApp stages the release; only the memorisation gate (fedsynth export) signs it."""
    assert (run_dir / "staging" / "synthetic.npz").exists() and not (run_dir / "synthetic").exists()
    with pytest.raises(VerificationError, match="manifest.sig: missing"):
        verify_release(run_dir / "staging", None)


@pytest.fixture
def fresh_budgets(federation):
    """Each test is its own study. A real site keeps one ledger for all runs, so a second
    run at the same budget would be declined; here every test starts from an unspent one: the
    operator's deliberate reset removes the ledger, its key and the log that shows earlier rounds
    (removing only the ledger is refused as tampering: tests/test_privacy_guarantee.py)."""
    for name in ("privacy_ledger.json", "privacy_ledger.key", "local_log.json"):
        for path in (federation.tmp / "state").glob(f"*/{name}"):
            path.unlink()
    return federation


def read(run_dir, name):
    return json.loads((run_dir / name).read_text())


def trained_by_round(run_dir) -> dict[int, list[str]]:
    rounds: dict[int, list[str]] = {}
    for entry in read(run_dir, "history.json")["train"]:
        rounds.setdefault(entry["round"], []).append(entry["site"])
    return {r: sorted(s) for r, s in rounds.items()}


def test_node_killed_mid_round_is_dropped_then_rejoins(fresh_budgets):
    federation = fresh_budgets
    run_dir = federation.tmp / "run"
    launch = federation.launch(CONFIG, run_dir)
    try:
        wait_for(lambda: "Receiving: train message" in federation.node_log("hospital_b"), 300, "hospital_b got no work")
        federation.kill("hospital_b")  # SIGKILL mid-round: no goodbye to the SuperLink
        wait_for(lambda: (run_dir / "checkpoints" / "round_0001.pt").exists(), 400, "round 1 never completed")
        federation.start_node("hospital_b")  # same key, same ledger: the hospital comes back
        assert launch.wait(timeout=600) == 0, (federation.tmp / "launch.log").read_text()[-3000:]
    finally:
        stop(launch)
    assert trained_by_round(run_dir) == {1: ["hospital_a", "hospital_c"], 2: ["hospital_a", "hospital_b", "hospital_c"]}
    ledger = read(run_dir, "privacy_ledger.json")
    assert set(ledger) == set(TRAINING)  # the external hospital never trains
    for site, budget in TRAINING.items():
        assert 0 < ledger[site]["epsilon"] <= budget
    assert "external_d" in {e["site"] for e in read(run_dir, "history.json")["evaluate"]}
    assert_staged_unsigned(run_dir)


def test_malformed_update_from_a_node_is_rejected_never_averaged(fresh_budgets):
    federation = fresh_budgets
    run_dir = federation.tmp / "malformed"
    launch = federation.launch(CONFIG, run_dir, log="malformed.log", profile="one-round", app=FAULT_APP, **{"corrupt-site": "hospital_c"})
    try:
        assert launch.wait(timeout=600) == 0, (federation.tmp / "malformed.log").read_text()[-3000:]
    finally:
        stop(launch)
    ledger = read(run_dir, "privacy_ledger.json")
    assert ledger["hospital_c"]["rejected_rounds"] == [1] and "NaN" in ledger["hospital_c"]["history"][0]["reason"]
    assert trained_by_round(run_dir) == {1: ["hospital_a", "hospital_b"]}
    weights = torch.load(run_dir / "global_model.pt")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_restarted_superlink_resumes_from_the_last_checkpoint(fresh_budgets):
    federation = fresh_budgets
    run_dir = federation.tmp / "resume"
    first = federation.launch(CONFIG, run_dir, log="resume-1.log")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "round_0001.pt").exists(), 400, "round 1 never completed")
        federation.kill_superlink()  # and the ServerApp it runs
    finally:
        stop(first)
    federation.start_superlink()  # same database and certificates; the SuperNodes reconnect
    federation.wait_online(len(SITES), timeout=180)
    second = federation.launch(CONFIG, run_dir, log="resume-2.log")
    try:
        assert second.wait(timeout=600) == 0, (federation.tmp / "resume-2.log").read_text()[-3000:]
    finally:
        stop(second)
    assert "Resuming" in (federation.tmp / "resume-2.log").read_text()
    # Round 1 is not trained again; round 2 runs once, by everyone.
    assert trained_by_round(run_dir) == {1: sorted(TRAINING), 2: sorted(TRAINING)}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_0001.pt", "round_0002.pt"]


def test_secure_aggregation_across_processes(fresh_budgets):
    federation = fresh_budgets
    run_dir = federation.tmp / "secure"
    launch = federation.launch(CONFIG, run_dir, log="secure.log", profile="secure")
    try:
        assert launch.wait(timeout=600) == 0, (federation.tmp / "secure.log").read_text()[-3000:]
    finally:
        stop(launch)
    log = (federation.tmp / "secure.log").read_text()
    assert "Secure aggregation completed" in log and "Secure aggregation halted" not in log
    assert trained_by_round(run_dir) == {1: sorted(TRAINING)}  # the external node adds a zero-weight share
    assert_staged_unsigned(run_dir)


def test_unregistered_node_is_refused(federation, tmp_path):
    keygen("hospital_a", tmp_path)  # a key pair the coordinator never registered
    node, _ = deploy.node_commands(SITES[0], federation.superlink, federation.certs / "ca.crt", tmp_path, free_port())
    rc, log = run_until_exit(federation, node + ["--max-retries", "1"], tmp_path / "rogue.log")
    assert rc != 0 and "Failed to activate SuperNode" in log


def test_node_without_tls_cannot_connect(federation, tmp_path):
    with pytest.warns(UserWarning, match="INSECURE"):
        node, _ = deploy.node_commands(SITES[0], federation.superlink, None, tmp_path, free_port(), insecure=True)
    rc, log = run_until_exit(federation, node + ["--max-retries", "1"], tmp_path / "insecure.log")
    assert rc != 0 and "Failed to initialize the connection" in log


def run_until_exit(federation, cmd, log, timeout: float = 120) -> tuple[int, str]:
    """Run a node that should give up; it logs to a file (its children would hold a pipe open)."""
    p = deploy.start(cmd, log, federation.home)
    try:
        rc = p.wait(timeout=timeout)
    finally:
        stop(p)
    return rc, log.read_text(errors="replace")
