"""The CI smoke federation of many sites, on a real two-node Ray cluster (docs/scaling.md).

A head and a worker are started as two separate ``ray start`` processes on 127.0.0.1 (one CPU
each), and ``fedsynth simulate --ray-address`` runs tests/configs/many_tiny.yaml on them: 10
generated hospitals, 3 sampled per round, 20 % dropouts. One federation checks the sampling,
the dropouts, every site's ledger and that the work ran on both nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO

MANY_TINY = REPO / "tests" / "configs" / "many_tiny.yaml"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(address: str) -> int:
    code = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture(scope="module")
def ray_cluster(shared_data):
    """Two Ray nodes, each its own `ray start --block` process group, stopped by killing exactly
    those groups (never `ray stop`, which would stop every Ray process of the user)."""
    # Short: Ray's Unix sockets live under it (a path limit of about 107 characters).
    temp = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats", "--block"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    logs = Path(temp) / "cluster.log"
    procs = []
    try:
        with open(logs, "ab") as log:
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
                                           f"--temp-dir={temp}", *common], stdout=log, stderr=log, env=env, start_new_session=True))
            deadline = time.time() + 180
            while alive_nodes(address) < 1:
                assert time.time() < deadline and procs[0].poll() is None, f"the Ray head did not start; see {logs}"
                time.sleep(2)
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", f"--address={address}", *common],
                                          stdout=log, stderr=log, env=env, start_new_session=True))
            while alive_nodes(address) < 2:
                assert time.time() < deadline and procs[1].poll() is None, f"the Ray worker did not join; see {logs}"
                time.sleep(2)
        yield address
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_run(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-runs")
    done = subprocess.run([str(BIN / "fedsynth"), "simulate", str(MANY_TINY), "--output-dir", str(out), "--ray-address", ray_cluster],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1800, env={**os.environ, "LANG": "C"})
    run_dir = next(out.glob("many-tiny-*"), None)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\nrun.log: {run_dir and (run_dir / 'run.log')}"
    return run_dir


def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(cluster_run):
    placements = {e["ray_node"] for p in (cluster_run / "clients").glob("*/local_log.json")
                  for e in json.loads(p.read_text()) if e.get("kind") == "train" and "ray_node" in e}
    assert len(placements) == 2, f"the sites' rounds ran on {len(placements)} Ray node(s)"
    assert json.loads((cluster_run / "run_status.json").read_text())["state"] == "finished"
    assert (cluster_run / "synthetic" / "synthetic.npz").exists()


def test_each_round_samples_three_of_ten_sites_and_dropouts_spend_nothing(cluster_run):
    from client.client_app import simulated_fault
    from common.evaluation.ledgers import audit_ledgers
    from simulations.simulate import load_run_dir

    run = load_run_dir(cluster_run)
    history = json.loads((cluster_run / "history.json").read_text())
    assert [s["nodes"] for s in history["sampled"]] == [3, 3, 3] and all(s["of"] == 10 for s in history["sampled"])
    audit = audit_ledgers(run, cluster_run)
    assert audit["ok"], {s: r["problems"] for s, r in audit["sites"].items() if r["problems"]}
    dropped = {(s, r) for s, row in audit["sites"].items() for r in row["dropped"]}
    trained = {(s, r) for s, row in audit["sites"].items() for r in row["rounds"]}
    assert dropped, "a 20 % dropout rate over 9 draws dropped no site: check the seed"
    for entry in history["sampled"]:  # every sampled site either dropped out (an error reply) or trained
        r = entry["round"]
        assert entry["failed"] == sum(1 for _, d in dropped if d == r)
        assert entry["nodes"] == entry["failed"] + sum(1 for _, t in trained if t == r)
    sites = {s.name: s for s in run.training_sites}
    assert all(simulated_fault(run, sites[s], r) == "dropout" for s, r in dropped)  # the seeded draw, replayed
    # What the coordinator recorded is what the sites' own ledgers say, for every site that trained.
    for name, row in audit["sites"].items():
        assert row["epsilon"] <= row["budget"] and (row["server_epsilon"] or 0.0) == pytest.approx(row["epsilon"])
