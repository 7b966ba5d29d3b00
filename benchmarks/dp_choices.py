"""The effect of each DP fine-tuning choice on release quality at a fixed ε, in one run; prints JSON.

    .venv/bin/python benchmarks/dp_choices.py [--variants prior norms_class ...] [--rounds 4 --steps 25]

The demo's three hospitals and budgets (ε = 8, 8, 5), FedAvg over their DP-SGD updates run in
this process (the same ``train_round`` the ClientApp runs), starting from the demo's public
prior. Every variant has the same ε per site and the same number of logical steps; Opacus
calibrates each variant's noise. Quality of 600 DDIM samples against the sites' pooled held-out
images: FID (random-convnet features, docs/metrics.md), MS-SSIM diversity, and the AUC on those
held-out images of a classifier trained on the samples only. Sampling seed fixed; FID moves by
about 0.05 between sampling seeds (measured), so smaller differences are noise.

Variants (``training`` overrides on top of the demo):
  prior          the public prior itself, no site data (reference)
  all            every parameter, batch 256 (physical 128)
  norms_emb      GroupNorm + time/class embeddings
  norms_class    GroupNorm + class embedding (the demo's choice)
  norms_class_b1024  the same, expected batch 1024 (virtual steps): ~4x compute
  adapters       rank-4 low-rank adapters (prior pretrained with them at identity)
  no_dp          norms_class without DP (the ε = inf reference)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDSYNTH_DATA_DIR", str(REPO.parent / "shared" / "data"))

VARIANTS = {
    "prior": None,
    "all": {"trainable": ["all"]},
    "norms_emb": {"trainable": ["norms", "embeddings"]},
    "norms_class": {"trainable": ["norms", "class_embedding"]},
    "norms_class_b1024": {"trainable": ["norms", "class_embedding"], "batch_size": 1024},
    "adapters": {"trainable": ["adapters"], "model": {"adapter_rank": 4}},
    "no_dp": {"trainable": ["norms", "class_embedding"], "dp": False},
}


def main() -> None:
    from client.trainer import train_round
    from common.config import ClassifierConfig, load_run
    from common.data import load_site
    from common.metrics.fidelity import RandomConvNetFeatures, extract, fid_kid, msssim_diversity
    from common.metrics.utility import score_classifier, train_classifier
    from common.models.generators import build_generator
    from server.public_prior import public_prior

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-root", default=str(REPO / "runs"), help="where the public prior cache lives")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    base = load_run(REPO / "simulations" / "demo.yaml")
    training = {k: v for k, v in (("rounds", args.rounds), ("local_steps", args.steps)) if v}
    base = dataclasses.replace(base, training=dataclasses.replace(base.training, threads_per_client=args.threads, **training))
    sites = [load_site(base, s) for s in base.training_sites]
    hold_x, hold_y = torch.cat([d.holdout_x for d in sites]), torch.cat([d.holdout_y for d in sites])
    idx = torch.randperm(len(hold_x), generator=torch.Generator().manual_seed(0))[: args.images]
    net = RandomConvNetFeatures()
    real = extract(net, hold_x[idx])
    labels = torch.arange(args.images) % base.model.num_classes

    def quality(run, weights) -> dict:
        gen = build_generator(run.model)
        gen.load_state_dict(weights)
        imgs = gen.sample(labels, 1, run.synthesis.ddim_steps, 300, device, progress=False)
        clf = train_classifier(ClassifierConfig(epochs=4), imgs, labels, run.model.image_size, run.model.num_classes, 0, device)
        return {"fid": fid_kid(real, extract(net, imgs))["fid"], "msssim": msssim_diversity(imgs, labels, 200, 0),
                "synthetic_auc": score_classifier(clf, hold_x, hold_y, device)["auc"]}

    out = {"benchmark": "dp_choices", "sites": [s.name for s in base.training_sites], "site_sizes": [len(d.train_y) for d in sites],
           "epsilon_budgets": [s.privacy.epsilon for s in base.training_sites], "rounds": base.training.rounds,
           "logical_steps_per_site": base.training.rounds * base.training.local_steps, "images": args.images, "variants": {}}
    for name in args.variants:
        over = dict(VARIANTS[name] or {})
        model = over.pop("model", {})
        run = dataclasses.replace(base, model=dataclasses.replace(base.model, **model),
                                  training=dataclasses.replace(base.training, **over))
        t = time.perf_counter()
        weights, _ = public_prior(run, Path(args.runs_root), progress=False)
        pretrain_s = time.perf_counter() - t
        row = {"pretrain_or_cache_s": pretrain_s}
        if VARIANTS[name] is not None:
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as state:
                for r in range(1, run.training.rounds + 1):
                    res = [train_round(run, s, d, weights, r, Path(state) / s.name, device) for s, d in zip(run.training_sites, sites)]
                    weights = {k: (sum(x.weights[k].double() for x in res) / len(res)).to(res[0].weights[k].dtype) for k in weights}
            row.update(train_s=time.perf_counter() - t, trained_parameters=res[0].local["trained_parameters"],
                       epsilon=[x.metrics.get("epsilon") for x in res], noise_multiplier=[x.local.get("noise_multiplier") for x in res])
        row.update(quality(run, weights))
        out["variants"][name] = row
        print(json.dumps({name: row}), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
