"""How a simulated federation's cost grows with the number of hospitals; prints JSON.

    .venv/bin/python benchmarks/scaling.py                 # N = 3, 10, 30, 100
    .venv/bin/python benchmarks/scaling.py --sites 3 10    # a quicker look

Each point is one federation of ``simulations/many_sites.yaml`` (a small model, few local steps,
power-law sizes, label skew, 10 % dropouts) with N generated sites, in its own process, through
Flower's simulation engine. Two series, measured in one run:

* ``fixed_sampled``: 3 sites sampled per round whatever N is;
* ``fixed_fraction``: 10 % of the sites sampled per round (at least 1).

Per point: wall time per round (the train phase, from the strategy's timestamps; the mean leaves
out round 1, which also starts Ray's actors), the start-up before round 1,
peak memory (summed RSS of the driver's whole process tree, Ray's workers included, sampled
every 0.5 s; shared pages count once per process, so it is an upper bound) and every site's ε
from its own ledger (:func:`common.evaluation.ledgers.audit_ledgers`). A least-squares fit of
seconds per round on (sampled sites, total sites) shows which one the cost follows.
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
CONFIG = REPO / "simulations" / "many_sites.yaml"
os.environ.setdefault("FEDSYNTH_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def overrides(n: int, fraction: float, minimum: int, rounds: int) -> dict:
    from common.config import read_yaml

    sites = read_yaml(CONFIG)["sites"]
    generated = next(s for s in sites if isinstance(s, dict))
    generated["generate"]["n"] = n
    return {"sites": sites, "training": {"rounds": rounds},
            "federation": {"fraction_train": fraction, "min_train_nodes": minimum}}


def one(n: int, fraction: float, minimum: int, rounds: int, out: Path) -> dict:
    """In the child process: one federation, federation phase only (no release scoring)."""
    import logging

    from common.config import load_run
    from common.evaluation.ledgers import audit_ledgers
    from simulations.simulate import run_federation
    from simulations.terminal import output_to_log

    start = time.time()
    run = load_run(CONFIG, overrides=overrides(n, fraction, minimum, rounds))
    with output_to_log(out / "run.log"):
        logging.getLogger("flwr").propagate = False
        run_federation(run, out)
    wall = time.time() - start
    history = json.loads((out / "history.json").read_text())
    timing = history.get("timing", [])
    audit = audit_ledgers(run, out)
    spent = {s: r["epsilon"] for s, r in audit["sites"].items() if r["rounds"]}
    return {
        "sites": n,
        "sampled_per_round": [s["nodes"] for s in history["sampled"]],
        "failed_per_round": [s.get("failed", 0) for s in history["sampled"]],
        "seconds_per_round": [t["seconds"] for t in timing],
        # Round 1 also starts Ray's actors (about 10 s on 2 cores): the steady cost is the rest.
        "first_round_seconds": timing[0]["seconds"] if timing else None,
        "mean_seconds_per_round": sum(t["seconds"] for t in timing[1:]) / max(1, len(timing) - 1),
        "startup_seconds": timing[0]["start"] - start if timing else None,  # config, Ray, actors
        "wall_seconds": wall,
        "sites_trained": len(spent),
        "epsilon_spent": {"min": min(spent.values(), default=0.0), "max": max(spent.values(), default=0.0)},
        "epsilon_by_site": {s: round(e, 4) for s, e in spent.items()},
        "ledgers_hold": audit["ok"],
        "ledger_problems": {s: r["problems"] for s, r in audit["sites"].items() if r["problems"]},
    }


def measure(n: int, fraction: float, minimum: int, rounds: int) -> dict:
    """Run :func:`one` in a child process and sample its process tree's memory."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="fedsynth-scaling-") as tmp:
        cmd = [sys.executable, __file__, "_one", str(n), str(fraction), str(minimum), str(rounds), tmp]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.5)
        out, err = child.communicate()
        if child.returncode:
            raise RuntimeError(f"N={n}: the federation failed:\n{err[-3000:]}")
        res = json.loads(out.strip().splitlines()[-1])
    return {**res, "peak_rss_mb": peak / 2**20}


def fit(points: list[dict]) -> dict:
    """Seconds per round (after the first) ~ a + b x sampled + c x total sites (least squares)."""
    import numpy as np

    if len(points) < 3:
        return {}
    sampled = [sum(p["sampled_per_round"]) / len(p["sampled_per_round"]) for p in points]
    X = np.column_stack([np.ones(len(points)), sampled, [p["sites"] for p in points]])
    y = np.array([p["mean_seconds_per_round"] for p in points])
    (a, b, c), *_ = np.linalg.lstsq(X, y, rcond=None)
    return {"seconds_fixed": a, "seconds_per_sampled_site": b, "seconds_per_site_in_federation": c}


def main() -> None:
    if sys.argv[1:2] == ["_one"]:
        n, fraction, minimum, rounds, out = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
        print(json.dumps(one(n, fraction, minimum, rounds, out)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30, 100])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--sampled", type=int, default=3)
    args = ap.parse_args()
    from rich.progress import Progress

    series = {"fixed_sampled": [], "fixed_fraction": []}
    plan = [(name, n) for n in args.sites for name in series]
    with Progress(transient=True) as bar:
        task = bar.add_task("federations", total=len(plan))
        for name, n in plan:
            bar.update(task, description=f"{name}: {n} sites")
            if name == "fixed_sampled":  # a fraction too small to matter: the minimum decides
                point = measure(n, 1e-6, min(args.sampled, n), args.rounds)
            else:
                point = measure(n, args.fraction, 1, args.rounds)
            series[name].append(point)
            bar.advance(task)
    all_points = series["fixed_sampled"] + series["fixed_fraction"]
    out = {
        "benchmark": "scaling",
        "config": str(CONFIG.relative_to(REPO)),
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "series": series,
        "fit_seconds_per_round": fit(all_points),
        "ratio_seconds_per_round_100_vs_3_fixed_sampled": _ratio(series["fixed_sampled"]),
        "ratio_seconds_per_round_100_vs_3_fixed_fraction": _ratio(series["fixed_fraction"]),
        "all_ledgers_hold": all(p["ledgers_hold"] for p in all_points),
    }
    print(json.dumps(out, indent=2))


def _ratio(points: list[dict]) -> float | None:
    if len(points) < 2:
        return None
    return points[-1]["mean_seconds_per_round"] / points[0]["mean_seconds_per_round"]


if __name__ == "__main__":
    main()
