"""Issue 12, items 1 and 7, replayed against a real deployment on 127.0.0.1 (the shared
``federation``: SuperLink on loopback, Fleet gateway, four hospital SuperNodes with launchers).

An outsider holds only the public ``ca.crt`` and reaches only the address the hospitals use."""

import http.client
import json
import socket
import ssl
import time

import httpx
import pytest

from common.security.certs import keygen
from simulations import deploy

from ..conftest import REPO

ROGUE_APP = REPO / "tests" / "security" / "rogue-app"


@pytest.fixture(scope="module")
def outsider(federation, tmp_path_factory):
    """A Flower CLI configured like the docs' published address: the gateway, with the public CA."""
    home = tmp_path_factory.mktemp("outsider")
    deploy.write_connection(home, federation.superlink, federation.certs)
    return lambda *args: deploy.run(["flwr", *args], home, timeout=60)


def registered_nodes(federation) -> dict[str, str]:
    listing = json.loads(federation.flwr("supernode", "list", "fedsynth", "--format", "json").stdout)
    return {n["node-id"]: n["status"] for n in listing["nodes"]}


def test_outsider_cannot_list_register_evict_or_run_anything(federation, outsider, tmp_path):
    before = registered_nodes(federation)
    hospital_a = next(n for n, e in json.loads(federation.registry.read_text())["nodes"].items() if e["site"] == "hospital_a")
    _, rogue_pub = keygen("hospital_a", tmp_path)
    attempts = {
        "list": outsider("supernode", "list", "fedsynth"),
        "register": outsider("supernode", "register", str(rogue_pub), "fedsynth"),
        "unregister hospital_a": outsider("supernode", "unregister", hospital_a, "fedsynth"),
        "run own app": outsider("run", str(ROGUE_APP), "fedsynth", "--run-config", f"out='{tmp_path / 'out.json'}'"),
    }
    for what, res in attempts.items():
        assert res.returncode != 0, f"{what} succeeded through the gateway: {res.stdout}"
    # The same CLI set-up, CA and all, works where the SuperLink really is: only the address differed.
    local = tmp_path / "local-flwr"
    deploy.write_connection(local, f"127.0.0.1:{federation.internal_port}", federation.certs)
    assert deploy.run(["flwr", "supernode", "list", "fedsynth"], local, timeout=60).returncode == 0
    assert registered_nodes(federation) == before  # nobody evicted, nobody added
    assert not (tmp_path / "out.json").exists()


def test_gateway_forwards_the_fleet_api_only(federation):
    """Sent raw (http.client does not normalise paths the way httpx or a browser would)."""
    host, port = federation.superlink.split(":")
    tls = ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))
    for path in ("/v1/control/list-nodes", "/v1/runtime/get-nodes", "/health", "/docs", "/openapi.json",
                 "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes", "/v1/fleet//../control",
                 "/v1/fleet/..%2fcontrol/list-nodes", "/v1/fleet/./../control/list-nodes", "/V1/control/list-nodes"):
        for method in ("GET", "POST"):
            conn = http.client.HTTPSConnection(host, int(port), context=tls, timeout=30)
            try:
                conn.request(method, path, body=b"")
                status = conn.getresponse().status
            finally:
                conn.close()
            assert status == 403, (method, path, status)
    with httpx.Client(verify=str(federation.certs / "ca.crt")) as client:
        assert client.post(f"https://{federation.superlink}/v1/fleet/", content=b"").status_code != 403  # the SuperLink answers


def _lan_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.255", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_superlink_listens_on_loopback_only(federation):
    cmd = deploy.superlink_command(federation.certs, federation.internal_port, federation.tmp)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", federation.internal_port), timeout=5):
        pass  # the coordinator's own tools reach it
    if (lan := _lan_address()) is not None:
        with pytest.raises(OSError):
            socket.create_connection((lan, federation.internal_port), timeout=5).close()


def test_hospital_nodes_refuse_an_app_that_is_not_on_their_allowlist(federation, tmp_path):
    """Even the coordinator (on loopback) cannot run code beside the hospitals' images: a node
    starts only apps whose hash its operator allowed, and says so in its log. A process on the
    hospital's own machine that takes tasks from the node's loopback API without the node's
    secret does not get them either."""
    out = tmp_path / "out.json"
    logs_before = {s: len(federation.node_log(s)) for s in federation.sites}
    squatter = deploy.start(["flower-superexec", "--runtime-api-address", f"127.0.0.1:{federation.runtime_ports['hospital_a']}",
                             "--insecure"], tmp_path / "squatter.log", federation.home)
    launch = deploy.start(["flwr", "run", str(ROGUE_APP), "fedsynth", "--run-config", f"out='{out}'", "--stream"],
                          tmp_path / "rogue.log", federation.home)
    try:
        assert launch.wait(timeout=240) == 0, (tmp_path / "rogue.log").read_text()[-2000:]
    finally:
        deploy.stop(launch)
        deploy.stop(squatter)
    result = json.loads(out.read_text())
    assert result["configs"] == []  # no node's configuration came back
    # Each node answered at once with a refusal (so it is free for the next run), not silence.
    assert result["errors"] == ["app refused by the node's allowlist"] * len(federation.sites)
    for site in federation.sites:
        new = federation.node_log(site)[logs_before[site]:]
        assert "REFUSED app" in new and "not on this node's allowlist" in new, site
        assert not (federation.state(site) / "ROGUE_APP_RAN").exists()
    assert "Start `flwr-clientapp`" not in (tmp_path / "squatter.log").read_text(errors="replace")


def test_every_hospital_is_still_registered_and_online_after_the_attacks(federation):
    """The attacks above changed nothing: every hospital is registered and online."""
    deadline = time.time() + 90
    while federation.online() < len(federation.sites) and time.time() < deadline:
        time.sleep(2)
    assert federation.online() == len(federation.sites)
    bound = {e["site"] for e in json.loads(federation.registry.read_text())["nodes"].values()}
    assert bound == set(federation.sites)


def test_gateway_refuses_oversized_requests_drops_proxy_headers_and_reports_a_down_superlink_as_502():
    from starlette.testclient import TestClient

    from server.fleet_gateway import _HOP, fleet_path, make_gateway

    gateway = TestClient(make_gateway("127.0.0.1:9", None, max_body_mb=1))  # nothing listens upstream
    assert gateway.post("/v1/fleet/pull-messages", content=b"x" * (2 * 2**20)).status_code == 413
    # A SuperLink that is down or restarting: 502, which SuperNodes retry (a 500 made them give up).
    assert gateway.post("/v1/fleet/pull-messages", content=b"").status_code == 502
    assert gateway.get("/v1/control/list-nodes").status_code == 403
    assert {"x-forwarded-for", "forwarded", "x-real-ip"} <= _HOP  # a client cannot pose as 127.0.0.1 upstream
    assert fleet_path("/v1/fleet/pull-messages") and not fleet_path("/v1/fleet/./pull-messages")
