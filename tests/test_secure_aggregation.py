"""Secure aggregation (Flower SecAgg+) as a config switch: same model, the server sees only the sum."""

import numpy as np
import pytest
import torch

from client.secure_aggregation import check_clipping_range
from common.checks import CheckFailed
from common.config import ConfigError, load_run
from server.secure_aggregation import SecureFedAvg
from simulations.simulate import run_federation

from .conftest import TINY


def one_round(tmp_path, name: str, secure: bool):
    run = load_run(TINY, overrides={
        # DP noise comes from a secret source and differs run to run, so the comparison is made
        # without DP: the local updates are then reproducible from the run seed.
        "training": {"rounds": 1, "dp": False},
        "synthesis": {"num_images": 10, "batch_size": 10},
        "federation": {"secure_aggregation": {"enabled": secure}},
    })
    run_federation(run, tmp_path / name)
    return torch.load(tmp_path / name / "checkpoints" / "round_0001.pt")["weights"]


def test_secagg_round_gives_fedavg_of_the_updates_without_the_server_seeing_one(shared_data, tmp_path, monkeypatch):
    seen = []
    aggregate_fit = SecureFedAvg.aggregate_fit

    def spy(self, server_round, results, failures):
        seen.append({tuple(res.parameters.tensors) for _, res in results})  # what the server holds per site
        return aggregate_fit(self, server_round, results, failures)

    monkeypatch.setattr(SecureFedAvg, "aggregate_fit", spy)
    plain = one_round(tmp_path, "plain", secure=False)
    secure = one_round(tmp_path, "secure", secure=True)
    # Each site's result carries only the unmasked sum: one and the same set of arrays.
    assert len(seen) == 1 and len(seen[0]) == 1
    # Same seeds, same local updates: SecAgg+ gives FedAvg's average up to quantization.
    diff = max((plain[k] - secure[k]).abs().max().item() for k in plain)
    assert diff < 1e-4
    assert any((plain[k] != 0).any() for k in plain)


def test_a_node_refuses_to_send_weights_secagg_would_clip_or_garble():
    update = [np.full(3, 2.0, dtype=np.float32)]
    check_clipping_range(update, weight=5000, clipping_range=8.0, max_weight=10_000)  # 2 * 0.5 fits
    with pytest.raises(CheckFailed, match="clipping_range"):
        check_clipping_range([np.full(3, 20.0, dtype=np.float32)], weight=10_000, clipping_range=8.0, max_weight=10_000)
    with pytest.raises(CheckFailed, match="NaN"):
        check_clipping_range([np.array([0.0, np.nan], dtype=np.float32)], weight=1, clipping_range=8.0, max_weight=10_000)


def test_secagg_needs_at_least_two_sites_per_round(shared_data):
    with pytest.raises(ConfigError, match="min_train_nodes >= 2"):
        load_run(TINY, overrides={"federation": {"min_train_nodes": 1, "secure_aggregation": {"enabled": True}}})


def test_secagg_min_contributors_is_at_least_two_and_at_most_the_training_sites(shared_data):
    def load(n: int):
        return load_run(TINY, overrides={"federation": {"secure_aggregation": {"enabled": True, "min_contributors": n}}})

    assert load_run(TINY).federation.secure_aggregation.min_contributors == 2
    with pytest.raises(ConfigError, match=r"federation\.secure_aggregation\.min_contributors: Input should be greater than or equal to 2$"):
        load(1)
    with pytest.raises(ConfigError, match=r"min_contributors=3 exceeds the 2 training sites"):
        load(3)
