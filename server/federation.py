"""The coordinator's job: federated DP-DDPM training, then synthesis."""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid

from common.config import RunConfig
from common.models.generators import build_generator
from common.runtime import versions, write_json

from .ledger import ServerLedger
from .public_prior import public_prior
from .secure_aggregation import run_secure_rounds
from .strategy import LedgerFedAvg
from .synthesis import STAGING, synthesize


def latest_checkpoint(run_dir: Path) -> dict | None:
    found = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    return torch.load(found[-1], map_location="cpu") if found else None


def federate(grid: Grid, run: RunConfig, run_dir: Path, context: Context, registry: dict[int, str] | None = None) -> dict | None:
    """Run ``training.rounds`` rounds of FedAvg, save the global model, sample the release.

    A run folder with checkpoints is resumed from its last round, not started over.
    Returns None when paused by ``federation.stop_after_round``. With
    ``federation.secure_aggregation.enabled`` each round's sum is computed under SecAgg+.
    ``registry`` (a deployment) binds node ids to sites: see :class:`LedgerFedAvg`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", run.to_dict())
    write_json(run_dir / "versions.json", versions())
    initial, done, ema = build_generator(run.model, seed=run.seed).state_dict(), 0, None
    prior_card = None
    ckpt = latest_checkpoint(run_dir)
    if run.public_prior is not None:
        card_path = run_dir / "public_prior.json"
        if ckpt is None:
            log(INFO, "Public prior: pretraining on %s (no site data), or reading it from the cache", run.public_prior.data.name)
            initial, prior_card = public_prior(run)
            write_json(card_path, prior_card)
        elif card_path.exists():
            prior_card = json.loads(card_path.read_text())  # resuming: round 0 is long past
    if ckpt is not None:
        initial, done, ema = ckpt["weights"], ckpt["round"], ckpt.get("ema")
        log(INFO, "Resuming %s after round %d from its checkpoint", run_dir, done)
    last = min(run.training.rounds, run.federation.stop_after_round or run.training.rounds)

    n_sites = len(run.training_sites)
    ledger = ServerLedger(run_dir / "privacy_ledger.json")
    strategy = LedgerFedAvg(
        run_dir,
        ledger,
        round_offset=done,
        registry=registry,
        ema_decay=run.federation.ema_decay,
        sampling_seed=run.seed,
        evaluate_in_train=run.federation.evaluate_in_train,
        fraction_train=run.federation.fraction_train,
        fraction_evaluate=run.federation.fraction_evaluate,
        min_train_nodes=run.federation.min_train_nodes,
        min_evaluate_nodes=run.federation.min_evaluate_nodes or run.federation.min_train_nodes,
        min_available_nodes=min(n_sites, run.federation.min_train_nodes),
    )
    strategy.ema = ema
    arrays = ArrayRecord(initial)
    if last > done and run.federation.secure_aggregation.enabled:
        arrays = run_secure_rounds(grid, context, strategy, arrays, last - done, run)
    elif last > done:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=last - done,
            timeout=run.federation.timeout_s,
            train_config=ConfigRecord({"run-dir": str(run_dir)}),
            evaluate_config=ConfigRecord({"run-dir": str(run_dir)}),
        )
        arrays = result.arrays if len(result.arrays) else arrays
    if latest_checkpoint(run_dir) is None:
        declined = {s: p["declined_rounds"] for s, p in ledger.summary().items()}
        raise RuntimeError(f"no round produced a model (sites declined: {declined}); nothing to release")
    if (anomalies := ledger.anomalies()):
        raise RuntimeError(f"release withheld: the privacy ledger does not add up ({anomalies}); see {ledger.path}")
    if last < run.training.rounds:
        log(INFO, "Paused after round %d of %d; run again on %s to resume", last, run.training.rounds, run_dir)
        return None
    weights = strategy.ema if strategy.ema is not None else arrays.to_torch_state_dict()
    torch.save(weights, run_dir / "global_model.pt")  # the released model: the EMA when enabled

    privacy = ledger.summary()
    log(INFO, "Sampling %d synthetic images", run.synthesis.num_images)
    synthesize(
        run,
        weights,
        run_dir / STAGING,  # signed and released only once the memorisation gate passes (server.export)
        provenance={
            "rounds": run.training.rounds,
            # The round-0 model: pretrained without DP on declared public data (None: random init).
            "public_prior": prior_card,
            "trainable": list(run.training.trainable),
            "sites": {s: {"epsilon": p["epsilon"], "delta": p["delta"], "privacy_unit": p["privacy_unit"],
                          "accountant": run.training.accountant, "rounds_trained": p["rounds_trained"]} for s, p in privacy.items()},
        },
    )
    return {"privacy": privacy, "history": strategy.history}
