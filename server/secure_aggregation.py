"""Federated rounds under Flower's SecAgg+ (Bell et al. 2020): the server sees only the sum.

Why the legacy API: in flwr 1.41 SecAgg+ exists only as ``SecAggPlusWorkflow``,
a step of the legacy ``DefaultWorkflow`` that drives a legacy ``Strategy`` with
``FitRes`` objects in a ``LegacyContext``; the Message-API strategies
(``flwr.serverapp.strategy``) have no secure aggregation. Re-implementing the
protocol, or forking Flower, would mean owning cryptography we should not own.
So this module runs the rounds through that workflow unchanged and keeps
fedsynth's own round logic in one place: :class:`SecureFedAvg` is a thin
legacy face that forwards every reply to the same :class:`LedgerFedAvg` used in
plain rounds (ledger, declines, evaluation-only sites, checkpoints, EMA). On the
client, :mod:`client.secure_aggregation` translates the legacy records.

What changes for the server: it never holds one site's weights, so it cannot
reject one malformed update. Each client checks its own update before masking
(finite, inside the clipping range); the server checks the aggregate and
drops a round whose aggregate is malformed. The ledger's figures (ε, δ, budget)
still arrive per site, in the clear: the server ledger needs them.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from client.secure_aggregation import ARRAY_KEYS, CLIPPING_RANGE, MAX_WEIGHT
from common.checks import CheckFailed, check_weights
from common.config import RunConfig

from .strategy import LedgerFedAvg, count_sites

_SITE_KEYS = ("site", "reason", "privacy-unit")


def _split(metrics: dict) -> tuple[str, str, dict]:
    """Legacy metrics carry the site name, reason and privacy unit next to the numbers."""
    return str(metrics["site"]), str(metrics.get("reason", "")), {k: v for k, v in metrics.items() if k not in _SITE_KEYS}


class SecureFedAvg(FedAvg):
    """Legacy FedAvg whose bookkeeping is :class:`LedgerFedAvg`'s, for ``SecAggPlusWorkflow``."""

    def __init__(self, rounds: LedgerFedAvg, initial: ArrayRecord, run: RunConfig):
        self.rounds = rounds
        self.keys = list(initial.keys())
        self.latest = initial
        sa = run.federation.secure_aggregation
        self.extra = {"run-dir": str(rounds.run_dir), ARRAY_KEYS: "\n".join(self.keys),
                      CLIPPING_RANGE: sa.clipping_range, MAX_WEIGHT: sa.max_weight}
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=rounds.min_train_nodes,
            min_evaluate_clients=rounds.min_evaluate_nodes,
            min_available_clients=rounds.min_available_nodes,
            initial_parameters=ndarrays_to_parameters(initial.to_numpy_ndarrays()),
            on_fit_config_fn=self._config,
            on_evaluate_config_fn=self._config,
        )

    def _config(self, server_round: int) -> dict:
        return {"server-round": server_round + self.rounds.round_offset, **self.extra}

    def _state_dict(self, parameters) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, map(torch.from_numpy, parameters_to_ndarrays(parameters)), strict=True))

    def configure_fit(self, server_round, parameters, client_manager):
        self.rounds.current = self._state_dict(parameters)
        return [(p, ins) for p, ins in super().configure_fit(server_round, parameters, client_manager)
                if p.node_id not in self.rounds.evaluation_only]

    def aggregate_fit(self, server_round, results, failures):
        server_round += self.rounds.round_offset
        for failure in failures:
            log(WARNING, "Round %d: a node dropped out or failed: %s", server_round, failure)
        admitted = []
        for proxy, res in results:
            site, reason, metrics = _split(res.metrics)
            unit = str(res.metrics["privacy-unit"]) if "privacy-unit" in res.metrics else None
            if self.rounds.admit(server_round, proxy.node_id, site, metrics, reason, update=None, privacy_unit=unit):
                admitted.append(metrics)
        arrays = None
        if admitted:  # every result carries the same unmasked aggregate; no single update exists here
            # SecAgg+ dequantizes to float64; cast back to the model's dtypes.
            aggregate = {k: v.to(self.rounds.current[k].dtype) for k, v in self._state_dict(results[0][1].parameters).items()}
            try:
                check_weights(aggregate, self.rounds.current, f"secure aggregate of round {server_round}")
                arrays = ArrayRecord(aggregate)
            except CheckFailed as exc:
                log(WARNING, "Round %d dropped: %s", server_round, exc)
        self.rounds.finish_round(server_round, arrays)
        if arrays is None:
            return None, {}
        self.latest = arrays
        return ndarrays_to_parameters(arrays.to_numpy_ndarrays()), count_sites(admitted)

    def aggregate_evaluate(self, server_round, results, failures):
        for _, res in results:
            site, _, metrics = _split(res.metrics)
            self.rounds.record_evaluation(server_round + self.rounds.round_offset, site, metrics)
        return super().aggregate_evaluate(server_round, results, failures)


def run_secure_rounds(grid: Grid, context: Context, rounds: LedgerFedAvg, initial: ArrayRecord, num_rounds: int, run: RunConfig) -> ArrayRecord:
    """``num_rounds`` rounds of FedAvg where each round's sum is computed under SecAgg+."""
    sa, timeout = run.federation.secure_aggregation, run.federation.timeout_s
    strategy = SecureFedAvg(rounds, initial, run)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled hospital is every other's neighbour: a few sites, not thousands
            reconstruction_threshold=sa.reconstruction_threshold,
            max_weight=sa.max_weight,
            clipping_range=sa.clipping_range,
            quantization_range=sa.quantization_range,
            timeout=timeout,
        )
    )
    workflow(grid, legacy)
    return strategy.latest
