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

A sum hides an update only among others. Declined and evaluation-only nodes send
zero-weight vectors (so the masks stay whole), and when a single node sends real
weight the unmasked "sum" is that node's update. :class:`GuardedSecAggPlusWorkflow`
therefore counts the real contributors after the masked vectors arrive and,
below ``federation.secure_aggregation.min_contributors``, ends the round before
any node is asked for the key shares that would remove the masks.
"""

from __future__ import annotations

from logging import WARNING
from typing import cast

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import FitRes, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from client.secure_aggregation import ARRAY_KEYS, CLIPPING_RANGE, MAX_WEIGHT
from common.checks import CheckFailed, check_weights
from common.config import RunConfig

from .strategy import LedgerFedAvg, count_sites

_SITE_KEYS = ("site", "reason", "privacy-unit")


def _split(metrics: dict) -> tuple[str, str, dict]:
    """Legacy metrics carry the site name, reason and privacy unit next to the numbers."""
    return str(metrics["site"]), str(metrics.get("reason", "")), {k: v for k, v in metrics.items() if k not in _SITE_KEYS}


def contributes(res: FitRes) -> bool:
    """A reply whose masked vector carries a real update: non-zero weight, neither declined nor evaluation-only.

    The weight (``num_examples``) and these metrics travel in the clear beside the masked vector."""
    return res.num_examples > 0 and not res.metrics.get("declined") and not res.metrics.get("evaluation-only")


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
                if p.node_id not in self.rounds.evaluation_only and self.rounds.registered(p.node_id)]

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

    def abort_fit(self, server_round: int, results: list, failures: list, why: str) -> None:
        """Book a round that :class:`GuardedSecAggPlusWorkflow` ended before unmasking.

        Declined and evaluation-only replies are booked as in any round. A site that trained
        has spent ε at home (its own ledger counted it before the first step); the server
        records the figures it reports, adds nothing, and marks the round rejected so that
        the site is not credited with a round that never reached the model.
        """
        server_round += self.rounds.round_offset
        log(WARNING, "Secure round %d aborted before unmasking: %s", server_round, why)
        for failure in failures:
            log(WARNING, "Round %d: a node dropped out or failed: %s", server_round, failure)
        for proxy, res in results:
            site, reason, metrics = _split(res.metrics)
            unit = str(res.metrics["privacy-unit"]) if "privacy-unit" in res.metrics else None
            if contributes(res):  # its masked update is discarded unopened
                if (site := self.rounds.bound_site(proxy.node_id, site)) is None:
                    continue  # booked only under the site its key is registered for
                self.rounds.ledger.record(site, server_round, metrics, f"secure round aborted: {why}", rejected=True, privacy_unit=unit)
            else:
                self.rounds.admit(server_round, proxy.node_id, site, metrics, reason, update=None, privacy_unit=unit)
        self.rounds.history.setdefault("aborted", []).append({"round": server_round, "reason": why})
        self.rounds.finish_round(server_round, None)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return [(p, ins) for p, ins in super().configure_evaluate(server_round, parameters, client_manager)
                if self.rounds.registered(p.node_id)]

    def aggregate_evaluate(self, server_round, results, failures):
        kept = []
        for proxy, res in results:
            claimed, _, metrics = _split(res.metrics)
            if (site := self.rounds.bound_site(proxy.node_id, claimed)):  # the registered site, never the claimed one
                self.rounds.record_evaluation(server_round + self.rounds.round_offset, site, metrics)
                kept.append((proxy, res))
        return super().aggregate_evaluate(server_round, kept, failures)


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+, unchanged, except that it will not unmask a sum of fewer than
    ``min_contributors`` real updates.

    The check sits between the masked-vector stage and the unmask stage: by then every
    reply's weight and ``declined``/``evaluation-only`` flags are in (in the clear), but
    the server holds only the masked sum, which still carries every node's private mask
    and is noise without the nodes' key shares. Aborting there means the shares are never
    requested, so the server never holds the lone update; a check in ``aggregate_fit``
    would run after unmasking, too late.
    The strategy (:meth:`SecureFedAvg.abort_fit`) books the aborted round.
    """

    def __init__(self, *args, min_contributors: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_contributors = min_contributors

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        proceed = super().setup_stage(grid, context, state)
        # Too few nodes asked to train: stop before any of them trains (and spends ε).
        if len(state.nid_to_fitins) < self.min_contributors:
            return self._abort(context, state, f"only {len(state.nid_to_fitins)} training node(s) sampled")
        return proceed

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        proceed = super().collect_masked_vectors_stage(grid, context, state)
        real = sum(contributes(res) for _, res in state.legacy_results)
        if real < self.min_contributors:
            return self._abort(context, state, f"{real} of {len(state.legacy_results)} replies carry a real update")
        return proceed

    def _abort(self, context: LegacyContext, state: WorkflowState, why: str) -> bool:
        why += f", fewer than federation.secure_aggregation.min_contributors={self.min_contributors}; nothing unmasked"
        state.aggregate_ndarrays = []  # drop the masked sum: it is never unmasked
        current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        cast(SecureFedAvg, context.strategy).abort_fit(current_round, state.legacy_results, state.failures, why)
        return False  # Flower's workflow halts this round here; the next round starts from setup


def run_secure_rounds(grid: Grid, context: Context, rounds: LedgerFedAvg, initial: ArrayRecord, num_rounds: int, run: RunConfig) -> ArrayRecord:
    """``num_rounds`` rounds of FedAvg where each round's sum is computed under SecAgg+."""
    sa, timeout = run.federation.secure_aggregation, run.federation.timeout_s
    strategy = SecureFedAvg(rounds, initial, run)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=GuardedSecAggPlusWorkflow(
            num_shares=1.0,  # every sampled hospital is every other's neighbour: a few sites, not thousands
            reconstruction_threshold=sa.reconstruction_threshold,
            max_weight=sa.max_weight,
            clipping_range=sa.clipping_range,
            quantization_range=sa.quantization_range,
            timeout=timeout,
            min_contributors=sa.min_contributors,
        )
    )
    workflow(grid, legacy)
    return strategy.latest
