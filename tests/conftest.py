"""Shared fixtures. Tests that need ../shared/data fail loudly when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSYNTH_DATA_DIR", REPO.parent / "shared" / "data"))
TINY = REPO / "tests" / "configs" / "tiny.yaml"
DEMO = REPO / "simulations" / "demo.yaml"


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
