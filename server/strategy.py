"""FedAvg that honours declining sites, keeps the privacy ledger and checkpoints."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

from common.checks import CheckFailed, check_weights
from common.runtime import write_json

from .ledger import ServerLedger


def ema_update(ema: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """EMA of weights (Polyak averaging); integer buffers follow the latest weights."""
    if ema is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: (decay * ema[k] + (1 - decay) * v) if v.is_floating_point() else v.clone() for k, v in new.items()}


# Sites send no example counts (private), so FedAvg weighs every site the same: each sends weight 1.
WEIGHT_KEY = "weight"


def count_sites(metrics: list) -> dict[str, float]:
    """The round's only aggregate metric: how many sites were averaged (per-site ε is in the ledger)."""
    return {"sites-averaged": float(len(metrics))}


def site_count(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    return MetricRecord(count_sites(replies))


class LedgerFedAvg(FedAvg):
    """FedAvg (McMahan et al. 2017) over ArrayRecords, plus:

    * replies with ``declined = 1`` (a site at its ε budget) are logged and left
      out of the average instead of failing the round;
    * every reply's ε is written to the server ledger;
    * the aggregate is checkpointed to ``run_dir/checkpoints`` every round;
    * a node that answers ``evaluation-only`` (an external hospital) is asked
      only to evaluate from then on;
    * in a deployment (``registry`` given) a node's site is the one its public key was
      registered for: work goes only to registered nodes, and a reply that names another
      site, or comes from a node nobody registered, is refused and logged.
    """

    def __init__(self, run_dir: Path, ledger: ServerLedger, ema_decay: float = 0.0, round_offset: int = 0,
                 registry: dict[int, str] | None = None, sampling_seed: int = 0, evaluate_in_train: bool = False, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", site_count)
        kwargs.setdefault("evaluate_metrics_aggr_fn", site_count)
        kwargs.setdefault("weighted_by_key", WEIGHT_KEY)
        super().__init__(**kwargs)
        self.ema_decay = ema_decay
        self.ema: dict[str, torch.Tensor] | None = None
        self.current: dict[str, torch.Tensor] = {}
        self.run_dir = run_dir
        self.ledger = ledger
        # Rounds already done before a restart: Flower counts from 1 again, we continue.
        self.round_offset = round_offset
        self.history: dict = {"train": [], "evaluate": []}
        if (run_dir / "history.json").exists():
            self.history = {**self.history, **json.loads((run_dir / "history.json").read_text())}
        self.evaluation_only: dict[int, str] = {}  # node id -> site
        self.training_nodes: set[int] = set()  # nodes that answered a train message as a training site
        self.registry = registry  # node id -> site, from the coordinator's registration (None: a simulation)
        self.sampling_seed = sampling_seed
        self.round_started: dict[int, float] = {}
        self.evaluate_in_train = evaluate_in_train
        self.num_rounds = 0  # of this start(), known once it is called

    def start(self, *args, num_rounds: int = 3, **kwargs):
        self.num_rounds = num_rounds
        return super().start(*args, num_rounds=num_rounds, **kwargs)

    def folds_evaluation(self) -> bool:
        """Whether a sampled site evaluates the incoming global model inside its train call."""
        return self.evaluate_in_train and self.fraction_evaluate > 0

    def registered(self, node_id: int) -> bool:
        return self.registry is None or node_id in self.registry

    def bound_site(self, node_id: int, claimed: str) -> str | None:
        """The site a reply counts for: the registered one; None (refused, logged) if it claims another."""
        if self.registry is None:
            return claimed  # a simulation: the node is this process's own partition
        bound = self.registry.get(node_id)
        if bound is None:
            log(WARNING, "Refused a reply from node %d: no site is registered for its key", node_id)
        elif bound != claimed:
            log(WARNING, "Refused a reply from node %d: its key is registered for %s but it claims to be %s", node_id, bound, claimed)
            return None
        return bound

    def sample(self, grid, server_round: int, fraction: float, minimum: int, train: bool,
               among: Callable[[int], bool] = lambda _node: True) -> tuple[list[int], int]:
        """This round's nodes: max(fraction x eligible, minimum) of the eligible ones, drawn from a
        generator seeded by (sampling seed, round, train/evaluate), so a run's draws are repeatable
        (Flower's own draw uses the process-global ``random``). Evaluation-only nodes are never
        drawn to train, and in a deployment only registered nodes are drawn. Returns (the drawn
        nodes, how many nodes were connected)."""
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_available_nodes:
                break
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d)", len(nodes), self.min_available_nodes)
            time.sleep(1)
        eligible = [n for n in nodes if self.registered(n) and not (train and n in self.evaluation_only) and among(n)]
        size = min(len(eligible), max(int(len(eligible) * fraction), minimum))
        rng = random.Random(f"{self.sampling_seed}:{server_round}:{'train' if train else 'evaluate'}")
        chosen = sorted(rng.sample(eligible, size))
        log(INFO, "Round %d: %d of %d nodes sampled to %s", server_round, len(chosen), len(nodes), "train" if train else "evaluate")
        return chosen, len(nodes)

    def configure_train(self, server_round, arrays, config, grid):
        self.current = arrays.to_torch_state_dict()  # what every update must match
        server_round += self.round_offset
        self.round_started[server_round] = time.time()
        nodes, connected = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes, train=True)
        config["server-round"] = server_round
        # The incoming weights are round (server_round - 1)'s global model (round 1's: the initial
        # one); not again when a paused run evaluated it after its last round.
        done = any(e.get("round") == server_round - 1 for e in self.history["evaluate"])
        config["evaluate-incoming"] = int(self.folds_evaluation() and server_round > 1 and not done)
        self.history.setdefault("sampled", []).append({"round": server_round, "nodes": len(nodes), "of": connected})
        return self._construct_messages(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}), nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round, arrays, config, grid):
        if self.fraction_evaluate == 0.0:
            return []
        last = server_round == self.num_rounds
        server_round += self.round_offset
        if self.folds_evaluation() and not last:
            # Training sites evaluate this model when the next round's train call brings it. Asked
            # now: the nodes that never answered a train message as a training site (evaluation-only
            # sites, and sites not drawn to train yet), fraction_evaluate of them.
            nodes, _ = self.sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, train=False,
                                   among=lambda n: n not in self.training_nodes)
            if not nodes:
                return []
        else:
            nodes, _ = self.sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, train=False)
        config["server-round"] = server_round
        return self._construct_messages(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}), nodes, MessageType.EVALUATE)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted, failed = [], 0
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                accepted.append(msg)  # FedAvg logs and drops it
                failed += 1
                continue
            content = msg.content
            try:  # a reply without the expected records is refused, never a crash of the ServerApp
                site, reason = str(content["site"]["site"]), str(content["site"]["reason"])
                unit = str(content["site"]["privacy-unit"]) if "privacy-unit" in content["site"] else None
                metrics = dict(content["metrics"])
            except (KeyError, TypeError) as exc:
                log(WARNING, "Refused a malformed reply from node %d (%s missing)", msg.metadata.src_node_id, exc)
                continue
            if not self.registered(msg.metadata.src_node_id):
                self.bound_site(msg.metadata.src_node_id, site)  # logs the refusal
                continue
            update = content["arrays"].to_torch_state_dict() if "arrays" in content else {}
            if self.admit(server_round, msg.metadata.src_node_id, site, metrics, reason, update, unit):
                accepted.append(msg)
        for entry in self.history.get("sampled", [])[-1:]:
            if entry["round"] == server_round:  # sent, answered, and failed or dropped out
                entry.update(replies=len(replies), failed=failed)
        arrays, metrics = super().aggregate_train(server_round, accepted)
        self.finish_round(server_round, arrays)
        return arrays, metrics

    def admit(self, server_round: int, node_id: int, site: str, metrics: dict, reason: str, update: dict | None,
              privacy_unit: str | None = None) -> bool:
        """Ledger and history for one site's reply; True when its update may be averaged in.

        ``update`` is None under secure aggregation: the server never sees it.
        """
        if (site := self.bound_site(node_id, site)) is None:
            return False
        if metrics.get("evaluated"):  # it evaluated the model it received: the previous round's
            self.record_evaluation(server_round - 1, site, {"evaluated": 1, "weight": 1})
        if metrics.get("evaluation-only"):
            log(INFO, "Site %s takes part in evaluation only", site)
            self.evaluation_only[node_id] = site
            return False
        self.training_nodes.add(node_id)
        if not metrics.get("declined") and update is not None:
            try:  # a malformed update is never averaged in
                check_weights(update, self.current, f"update from {site}")
            except (CheckFailed, KeyError) as exc:
                log(WARNING, "Rejected round %d update: %s", server_round, exc)
                self.ledger.record(site, server_round, metrics, f"update rejected: {exc}", rejected=True)
                return False
        self.ledger.record(site, server_round, metrics, reason, privacy_unit=privacy_unit)
        if metrics.get("declined"):
            log(WARNING, "Site %s declined round %d: %s", site, server_round, reason)
            return False
        self.history["train"].append({"round": server_round, "site": site, **metrics})
        log(INFO, "Site %s: epsilon %.3f", site, metrics.get("epsilon", float("nan")))
        return True

    def finish_round(self, server_round: int, arrays: ArrayRecord | None) -> None:
        if server_round in self.round_started:  # wall time of the round's train phase (scaling benchmark)
            now = time.time()
            self.history.setdefault("timing", []).append(
                {"round": server_round, "start": self.round_started[server_round], "end": now, "seconds": now - self.round_started[server_round]})
        if arrays is not None:
            self.update_ema(arrays)
            self.checkpoint(server_round, arrays)
        self._save_history()

    def record_evaluation(self, server_round: int, site: str, metrics: dict) -> None:
        self.history["evaluate"].append({"round": server_round, "site": site, **metrics})
        self._save_history()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
            elif "site" in msg.content and (site := self.bound_site(msg.metadata.src_node_id, str(msg.content["site"].get("site", "")))):
                self.record_evaluation(server_round, site, dict(msg.content["metrics"]) if "metrics" in msg.content else {})
                kept.append(msg)
        return super().aggregate_evaluate(server_round, kept)

    def update_ema(self, arrays: ArrayRecord) -> None:
        if self.ema_decay:
            self.ema = ema_update(self.ema, arrays.to_torch_state_dict(), self.ema_decay)

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path:
        path = self.run_dir / "checkpoints" / f"round_{server_round:04d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"round": server_round, "weights": arrays.to_torch_state_dict(), "ema": self.ema}, path)
        return path

    def _save_history(self) -> None:
        write_json(self.run_dir / "history.json", self.history)
