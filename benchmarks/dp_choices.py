"""The effect of each DP training choice on DP-DDPM quality, measured in one run; prints JSON.

    .venv/bin/python benchmarks/dp_choices.py [--rounds 4 --steps 25 --images 500]

One real site (demo hospital_b), the same ε budget and number of logical DP-SGD steps
for every variant; Opacus calibrates each variant's noise. Variants:
  baseline      expected batch 64, 1 noise draw, last weights
  ema           the baseline run's weights EMA-averaged over rounds (post-processing, free)
  large_batch   expected batch 256 through virtual steps (physical 64): ~4x compute
  multiplicity  K=4 (t, noise) draws per example inside one per-example gradient: ~4x compute
Quality: FID (random-convnet features, docs/metrics.md) of DDIM samples vs the site's
held-out images; time: wall seconds of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDSYNTH_DATA_DIR", str(REPO.parent / "shared" / "data"))


def main() -> None:
    import warnings

    from client.trainer import train_round
    from common.config import load_run
    from common.data import load_site
    from common.metrics.fidelity import RandomConvNetFeatures, extract, fid_kid
    from common.models.generators import build_generator
    from server.strategy import ema_update

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--ema-decay", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load_run(REPO / "simulations" / "demo.yaml")
    site = base.training_sites[1]
    data = load_site(base, site)
    net = RandomConvNetFeatures()
    real = extract(net, data.holdout_x[: args.images])
    labels = data.holdout_y[: args.images]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def train(**training) -> tuple[list[dict], float, dict]:
        run = dataclasses.replace(base, training=dataclasses.replace(base.training, rounds=args.rounds, local_steps=args.steps,
                                                                     threads_per_client=args.threads, **training))
        weights, history, eps = build_generator(run.model).state_dict(), [], {}
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as state:
            for r in range(1, args.rounds + 1):
                res = train_round(run, site, data, weights, r, Path(state), device)
                weights = res.weights
                history.append(weights)
                eps = {"epsilon": res.metrics["epsilon"], "noise_multiplier": res.local["noise_multiplier"]}
        return history, time.perf_counter() - t, eps

    def fid(weights: dict) -> float:
        gen = build_generator(base.model)
        gen.load_state_dict(weights)
        imgs = gen.sample(labels, seed=1, steps=base.synthesis.ddim_steps, batch_size=250, device=device, progress=False)
        return fid_kid(real, extract(net, imgs))["fid"]

    out = {"benchmark": "dp_choices", "site": site.name, "epsilon_budget": site.privacy.epsilon, "rounds": args.rounds,
           "logical_steps": args.rounds * args.steps, "images": args.images, "variants": {}}
    hist, sec, eps = train()
    out["variants"]["baseline"] = {"fid": fid(hist[-1]), "train_seconds": sec, **eps}
    ema = None
    for w in hist:
        ema = ema_update(ema, w, args.ema_decay)
    out["variants"]["ema"] = {"fid": fid(ema), "train_seconds": sec, "decay": args.ema_decay, **eps}
    hist, sec, eps = train(batch_size=256, max_physical_batch_size=64)
    out["variants"]["large_batch"] = {"fid": fid(hist[-1]), "train_seconds": sec, "expected_batch": 256, **eps}
    hist, sec, eps = train(noise_multiplicity=4)
    out["variants"]["multiplicity"] = {"fid": fid(hist[-1]), "train_seconds": sec, "k": 4, **eps}
    b = out["variants"]["baseline"]
    for v in out["variants"].values():
        v["fid_over_baseline"] = v["fid"] / b["fid"]
        v["time_over_baseline"] = v["train_seconds"] / b["train_seconds"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
