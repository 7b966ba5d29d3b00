"""Real deployment on 127.0.0.1: a SuperLink and two SuperNodes as separate processes,
with TLS and SuperNode authentication, running the tiny federation end to end."""

import json
import os
import signal
import socket
import time

import pytest

from common.security.certs import make_certs
from common.security.signing import verify_release
from simulations import deploy

from .conftest import REPO, TINY

SITES = [REPO / "sites" / "hospital_a.yaml", REPO / "sites" / "hospital_c.yaml"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_until_exit(cmd, log, home, timeout: float = 120) -> tuple[int, str]:
    """Run a process that should give up; its children would hold a pipe open, so log to a file."""
    p = deploy.start(cmd, log, home)
    try:
        rc = p.wait(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return rc, log.read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def federation(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    certs, home = tmp / "certs", tmp / "flwr"
    make_certs(certs, ["hospital_a", "hospital_c"], ["localhost", "127.0.0.1"])
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    deploy.write_connection(home, superlink, certs)
    procs = []
    try:
        procs.append(deploy.start(deploy.server_command(certs, "127.0.0.1", port, tmp), tmp / "superlink.log", home))
        listed = lambda: deploy.run(["flwr", "supernode", "list", "fedsynth"], home, timeout=30).returncode == 0  # noqa: E731
        wait_for(listed, 60, "SuperLink did not come up")
        for cmd in deploy.register_commands(certs, SITES):
            assert deploy.run(cmd, home, timeout=60).returncode == 0
        for i, site in enumerate(SITES):
            procs.append(deploy.start(deploy.client_command(site, superlink, certs, free_port()), tmp / f"node{i}.log", home))
        online = lambda: deploy.run(["flwr", "supernode", "list", "fedsynth"], home, timeout=30).stdout.count("online") == 2  # noqa: E731
        wait_for(online, 60, "SuperNodes did not come online")
        yield tmp, certs, home, superlink
    finally:
        for p in procs:  # each started in its own process group: stop it and its children
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, PermissionError):
                pass
            except Exception:
                os.killpg(p.pid, signal.SIGKILL)


def test_federation_runs_over_tls_with_authenticated_nodes(federation):
    tmp, _, home, _ = federation
    run_dir = tmp / "run"
    res = deploy.run(deploy.launch_command(TINY, run_dir), home, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert set(ledger) == {"hospital_a", "hospital_c"}
    assert ledger["hospital_a"]["rounds_trained"] == 2 and 0 < ledger["hospital_a"]["epsilon"] <= 8.0
    assert ledger["hospital_c"]["rounds_trained"] == 2 and 0 < ledger["hospital_c"]["epsilon"] <= 5.0
    assert verify_release(run_dir / "synthetic") == ["synthetic.npz"]


def test_unregistered_node_is_refused(federation, tmp_path):
    _, certs, home, superlink = federation
    make_certs(tmp_path / "rogue", ["hospital_a"], ["localhost"])  # a key pair the coordinator never registered
    cmd = deploy.client_command(SITES[0], superlink, tmp_path / "rogue", free_port())
    cmd[cmd.index("--root-certificates") + 1] = str(certs / "ca.crt")  # it even trusts the right CA
    rc, log = run_until_exit(cmd + ["--max-retries", "1"], tmp_path / "rogue.log", home)
    assert rc != 0 and "Failed to activate SuperNode" in log


def test_node_without_tls_cannot_connect(federation, tmp_path):
    _, _, home, superlink = federation
    with pytest.warns(UserWarning, match="INSECURE"):
        cmd = deploy.client_command(SITES[0], superlink, None, free_port(), insecure=True)
    rc, log = run_until_exit(cmd + ["--max-retries", "1"], tmp_path / "insecure.log", home)
    assert rc != 0 and "Failed to initialize the connection" in log
