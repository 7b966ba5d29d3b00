"""What the federation costs over the same DP-SGD steps run centrally, measured in one run; prints JSON.

    .venv/bin/python benchmarks/federation.py [--rounds 3 --steps 10]

The demo's three hospitals (its model, trained set, batch and budgets; no public prior, so both
sides start from the same seeded weights, and no per-round evaluation messages: training only):

* ``federation``: Flower's simulation engine, one Ray actor with every core
  (``num_cpus_per_client`` = cores, ``threads_per_client`` = cores), the ServerApp's FedAvg,
  ledger and checkpoints; the train phase's time per round comes from the strategy's timestamps;
* ``central``: the same ``train_round`` calls (the ClientApp's own DP round: ledger, σ
  calibration, Opacus, secret noise) one site after another in one process with as many
  threads, with the weights averaged in memory; the sites' images loaded once, outside the timing.

Each side runs in its own process. The ratio compares the rounds after the first (the first also
starts Ray's actor, reported apart) and all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDSYNTH_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def config(rounds: int, steps: int):
    from common.config import load_run

    cores = os.cpu_count() or 1
    return load_run(REPO / "simulations" / "demo.yaml", overrides={
        "public_prior": None,
        "training": {"rounds": rounds, "local_steps": steps, "threads_per_client": cores},
        "federation": {"num_cpus_per_client": cores, "fraction_evaluate": 0.0, "min_train_nodes": 3},
        "synthesis": {"num_images": 10, "batch_size": 10},
    })


def federation(rounds: int, steps: int, out: Path) -> dict:
    from simulations.simulate import run_federation
    from simulations.terminal import output_to_log

    run = config(rounds, steps)
    start = time.time()
    with output_to_log(out / "run.log"):
        run_federation(run, out)
    timing = json.loads((out / "history.json").read_text())["timing"]
    return {"seconds_per_round": [t["seconds"] for t in timing], "startup_seconds": timing[0]["start"] - start,
            "wall_seconds": time.time() - start}


def central(rounds: int, steps: int, out: Path) -> dict:
    import torch

    from client.trainer import train_round
    from common.data import load_site
    from common.models.generators import build_generator
    from common.runtime import pick_device

    run = config(rounds, steps)
    device = pick_device()
    sites = [(s, load_site(run, s)) for s in run.training_sites]
    weights = build_generator(run.model, seed=run.seed).state_dict()
    per_round = []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        results = [train_round(run, s, d, weights, r, out / s.name, device) for s, d in sites]
        weights = {k: torch.stack([res.weights[k].float() for res in results]).mean(0).to(v.dtype) for k, v in weights.items()}
        per_round.append(time.perf_counter() - t)
    return {"seconds_per_round": per_round}


def main() -> None:
    if sys.argv[1:2] in (["_federation"], ["_central"]):
        fn = federation if sys.argv[1] == "_federation" else central
        print(json.dumps(fn(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    res = {}
    for side in ("central", "federation"):
        with tempfile.TemporaryDirectory(prefix="fedsynth-fedbench-") as tmp:
            done = subprocess.run([sys.executable, __file__, f"_{side}", str(args.rounds), str(args.steps), tmp],
                                  capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
            res[side] = json.loads(done.stdout.strip().splitlines()[-1])
    c, f = res["central"]["seconds_per_round"], res["federation"]["seconds_per_round"]
    print(json.dumps({
        "benchmark": "federation_overhead",
        "config": "simulations/demo.yaml (3 sites, no public prior, no evaluate messages)",
        "rounds": args.rounds, "local_steps": args.steps, "cores": os.cpu_count(),
        **res,
        "ratio_after_first_round": sum(f[1:]) / sum(c[1:]) if len(c) > 1 else None,
        "ratio_all_rounds": sum(f) / sum(c),
        "target": 1.1,
    }, indent=2))


if __name__ == "__main__":
    main()
