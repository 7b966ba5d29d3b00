"""The privacy audit's cost and power, side by side in one run; prints JSON.

    .venv/bin/python benchmarks/audit.py [--site hospital_c --canaries 1000 --repeats 2]

For one real demo site (its own images, the demo's rounds, steps and batch) the
audit runs at several budgets ε, plus two broken mechanisms at ε = 2 (noise off;
noise seeded from the public run seed). Power = how close ε_lower gets to the
accounted ε; a sound audit never exceeds it on a correct mechanism.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDSYNTH_DATA_DIR", str(REPO.parent / "shared" / "data"))


def main() -> None:
    import opacus.optimizers.optimizer as dp_optimizer

    import client.trainer as trainer
    from common.config import load_run
    from common.data import load_site
    from common.evaluation.audit import audit_site

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "simulations" / "demo.yaml"))
    parser.add_argument("--site", default="hospital_c")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    run = load_run(args.config)
    site = next(s for s in run.training_sites if s.name == args.site)
    data = load_site(run, site)
    real_noise, secret = dp_optimizer._generate_noise, trainer.secret_generator

    def audit(epsilon: float, broken: str = "") -> dict:
        s = dataclasses.replace(site, privacy=dataclasses.replace(site.privacy, epsilon=epsilon))
        if broken == "noise_off":
            dp_optimizer._generate_noise = lambda std, reference, generator=None, secure_mode=False: real_noise(0.0, reference)
        if broken == "public_seed":
            trainer.secret_generator = lambda device="cpu": torch.Generator(device=device).manual_seed(run.seed)
        try:
            results = [audit_site(run, s, data, args.canaries, seed=i) for i in range(args.repeats)]
        finally:
            dp_optimizer._generate_noise, trainer.secret_generator = real_noise, secret
        lower = [r["epsilon_lower"] for r in results]
        accounted = results[0]["epsilon_accounted"]
        return {
            "epsilon_accounted": accounted,
            "epsilon_lower_mean": statistics.mean(lower),
            "epsilon_lower_max": max(lower),
            "power_ratio": statistics.mean(lower) / accounted,  # lower bound / accounted ε
            "violations": sum(r["violation"] for r in results),
            "seconds_per_audit": statistics.mean(r["seconds"] for r in results),
        }

    start = time.time()
    out = {
        "site": site.name,
        "canaries": args.canaries,
        "repeats": args.repeats,
        "steps": run.training.rounds * run.training.local_steps,
        "correct_mechanism": {str(eps): audit(eps) for eps in (1.0, 2.0, 4.0, 8.0)},
        "broken_at_epsilon_2": {name: audit(2.0, name) for name in ("noise_off", "public_seed")},
    }
    out["wall_seconds"] = time.time() - start
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
