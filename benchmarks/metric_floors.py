"""Noise floors and yardsticks of every release figure, on the demo federation's real data.

    python benchmarks/metric_floors.py [--draws 5] > floors.json

* floors: each fidelity figure for real training images vs held-out images, over ``draws``
  independent draws (mean, SD): what "as good as real" reads, and how much it moves;
* privacy under no leakage: releases of real images of patients no generator saw (disjoint
  draws): the DCR share and its permutation p, the density-ratio attack's AUC;
* degradations: every figure for each known failure (common.evaluation.degradations);
* adversarial releases: F, U, P and FUP of copies, noisy copies, a one-class release and
  noise, beside a release of new patients, all claiming the demo's epsilon (8, 1e-5).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIGS = ["fid", "kid", "precision", "recall", "density", "coverage", "score"]


def main() -> None:
    from common.config import load_run
    from common.data import load_site
    from common.evaluation.degradations import adversarial_releases, degraded_releases
    from common.evaluation.release import Pool, ReleaseScorer

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "simulations" / "demo.yaml"))
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--output-dir", default=None, help="where the domain extractor is cached (default: a temp dir)")
    args = ap.parse_args()
    start = time.time()
    run = load_run(args.config, overrides={"output_dir": args.output_dir or tempfile.mkdtemp()})
    sites = {s.name: load_site(run, s) for s in run.training_sites + run.external_sites}
    full = Pool.from_sites(sites, [s.name for s in run.training_sites], [s.name for s in run.external_sites])
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(full.hold_x), generator=g)
    ref, fresh = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    pool = dataclasses.replace(full, hold_x=full.hold_x[ref], hold_y=full.hold_y[ref])
    scorer = ReleaseScorer(run, pool, torch.device("cpu"))
    n = len(pool.hold_x)

    def summary(rows: list[dict], keys: list[str]) -> dict:
        return {k: {"mean": float(np.mean([r[k] for r in rows])), "sd": float(np.std([r[k] for r in rows], ddof=1))} for k in keys}

    real = [scorer.fidelity(pool.train_x[i], pool.train_y[i]) for i in (torch.randperm(len(pool.train_x), generator=g)[:n] for _ in range(args.draws))]
    idx = torch.randperm(len(pool.train_x), generator=g)[:n]
    degraded = {name: {k: v[k] for k in FIGS} for name, (x, y) in
                degraded_releases(pool.train_x[idx], pool.train_y[idx], seed=1).items() for v in [scorer.fidelity(x, y)]}
    fx, fy = full.hold_x[fresh], full.hold_y[fresh]
    half = len(fx) // 2
    null = []
    for i in range(args.draws):  # no leakage: new patients' images, two disjoint halves per draw
        p = torch.randperm(len(fx), generator=g)[:half]
        r = scorer.release_privacy(fx[p])
        null.append({"dcr_share": r["dcr_share_closer_to_train"], "dcr_p": r["dcr_p_value"], "domias_auc": r["domias"]["auc"],
                     "reid_rate": r["reid_rate"]})
    m = min(1000, len(fx))
    adversarial = {name: {k: s["fup"][k] for k in ("fidelity", "utility", "privacy", "privacy_attack", "privacy_guarantee", "fup")}
                   for name, (x, y) in adversarial_releases((pool.train_x[idx][:m], pool.train_y[idx][:m]), (fx[:m], fy[:m]), 1).items()
                   for s in [scorer.score(x, y, 8.0, 1e-5)]}
    print(json.dumps({
        "extractor": scorer.extractor, "images_per_side": n, "draws": args.draws,
        "real_floor": summary(real, FIGS),
        "no_leakage_privacy": {**summary(null, ["dcr_share", "dcr_p", "domias_auc", "reid_rate"]), "release_images": half},
        "degradations": degraded, "adversarial_releases": adversarial, "wall_time_s": time.time() - start,
    }, indent=1))


if __name__ == "__main__":
    main()
