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


REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDSYNTH_DATA_DIR", str(REPO.parent / "shared" / "data"))


def main() -> None:
    from contextlib import nullcontext

    from common.config import load_run
    from common.data import load_site
    from common.evaluation.audit import audit_site, broken_mechanism

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

    def audit(epsilon: float, broken: str = "") -> dict:
        s = dataclasses.replace(site, privacy=dataclasses.replace(site.privacy, epsilon=epsilon))
        with broken_mechanism(broken, run.seed) if broken else nullcontext():
            results = [audit_site(run, s, data, args.canaries, seed=i) for i in range(args.repeats)]
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
