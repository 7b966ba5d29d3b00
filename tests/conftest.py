"""Shared fixtures. Tests that need ../shared/data fail loudly when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSYNTH_DATA_DIR", REPO.parent / "shared" / "data"))
TINY = REPO / "tests" / "configs" / "tiny.yaml"
DEMO = REPO / "simulations" / "demo.yaml"


class Grid:
    """Just enough of a Flower grid for a strategy to address its nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


@pytest.fixture(scope="session")
def shared_data() -> Path:
    npz = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"
    if not npz.is_file():
        pytest.fail(f"real data missing: {npz} (set FEDSYNTH_DATA_DIR or put ../shared/data beside the repo)")
    os.environ["FEDSYNTH_DATA_DIR"] = str(SHARED_DATA)
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(shared_data):
    from common.config import load_run

    return load_run(TINY)


@pytest.fixture(scope="session")
def demo_run(shared_data):
    from common.config import load_run

    return load_run(DEMO)


@pytest.fixture(scope="session")
def tiny_finished_run(shared_data, tmp_path_factory, signing_key) -> Path:
    """One real Flower simulation of tests/configs/tiny.yaml, scored and released, shared by the
    end-to-end checks (tests/test_simulation_e2e.py) and the browser tests (tests/web/)."""
    from simulations.simulate import simulate

    return simulate(str(TINY), output_dir=str(tmp_path_factory.mktemp("runs")))


@pytest.fixture
def task_identity():
    """Messages built outside a running Flower process need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory):
    """Tests sign releases with a key of their own, never the checkout's certs/release_signing.pem."""
    path = tmp_path_factory.mktemp("signing") / "release_signing.pem"
    os.environ["FEDSYNTH_SIGNING_KEY"] = str(path)
    return path


DEPLOY_SITES = [REPO / "sites" / f"{s}.yaml" for s in ("hospital_a", "hospital_b", "hospital_c", "external_d")]
FAULT_APP = REPO / "tests" / "fault-app"  # fedsynth with one node's update replaced by NaN


@pytest.fixture(scope="session")
def federation(shared_data, tmp_path_factory):
    """One real deployment on 127.0.0.1 for every process-level test (tests/test_deployment.py,
    tests/security/): the demo's four hospitals as SuperNodes behind the gateway and SuperLink.
    Its nodes allow fedsynth and the fault app, nothing else."""
    from simulations import deploy

    fed = deploy.LocalFederation(tmp_path_factory.mktemp("deploy"), DEPLOY_SITES, apps=[REPO, FAULT_APP])
    try:
        yield fed.up()
    finally:
        fed.down()
