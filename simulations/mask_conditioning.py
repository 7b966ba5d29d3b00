"""``fedsynth mask-demo``: the mask-conditioned path of the brain-MRI paper, on real MNI152 slices.

1. Ingest T1 slices with white-matter masks (SimpleITK; docs/ingestion.md).
2. Train a DDPM conditioned on masks (mask concatenated to its input) and, with the
   same budget, an unconditioned DDPM; both through the client's training round, so
   ``training.dp: true`` gives the Opacus DP-SGD version.
3. Generate slices from held-out masks. "Follows the mask" = mean intensity inside
   the mask minus outside it (within the brain), for real, conditioned and
   unconditioned slices.
4. Train a MONAI UNet to segment white matter on real slices, and on real plus
   synthetic slices generated from the training masks; Dice on held-out real slices.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet

from client.trainer import train_round
from common.config import ClassifierConfig, ModelConfig, RunConfig, load_mask_demo, load_site
from common.data import SiteData
from common.data.ingest import ingest_site
from common.models.generators import build_generator
from common.reporting.figures import image_grid
from common.reporting.report import html_table
from common.runtime import pick_device, seed_everything, versions, write_json

from .simulate import console


def mask_contrast(images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean over slices of (mean inside mask) - (mean outside mask but inside the brain)."""
    out = []
    for img, m in zip(images[:, 0], masks[:, 0].bool()):
        brain = img > img.min() + 0.1 * (img.max() - img.min())
        ring = brain & ~m
        if m.any() and ring.any():
            out.append(float(img[m].mean() - img[ring].mean()))
    return float(np.mean(out)) if out else float("nan")


def train_segmenter(cfg: ClassifierConfig, x: torch.Tensor, m: torch.Tensor, seed: int, device) -> UNet:
    seed_everything(seed)
    net = UNet(spatial_dims=2, in_channels=x.shape[1], out_channels=1, channels=tuple(cfg.channels), strides=(2,) * (len(cfg.channels) - 1), num_res_units=1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = DiceLoss(sigmoid=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss_fn(net(x[idx].to(device)), m[idx].float().to(device)).backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def dice(net: UNet, x: torch.Tensor, m: torch.Tensor, device) -> float:
    metric = DiceMetric(include_background=True, reduction="mean")
    metric(y_pred=(torch.sigmoid(net(x.to(device))) > 0.5).float(), y=m.float().to(device))
    return float(metric.aggregate())


def train_generator(run: RunConfig, data: SiteData, state: Path, device) -> dict:
    gen = build_generator(run.model)
    weights = gen.state_dict()
    for r in range(1, run.training.rounds + 1):
        weights = train_round(run, run.sites[0], data, weights, r, state, device).weights
    gen.load_state_dict(weights)
    return gen


def mask_demo(config: str, output_dir: str | None = None, overrides: dict | None = None) -> tuple[Path, dict]:
    start = time.time()
    path = Path(config).resolve()
    cfg = load_mask_demo(path, overrides)
    device = pick_device()
    out = Path(output_dir or cfg.output_dir).expanduser().resolve() / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))

    site = load_site(path.parent / cfg.site)
    res = ingest_site(site, cfg.model.image_size, progress=True)
    if res.masks is None:
        raise ValueError(f"{site.origin}: the mask demo needs scans with masks (source.mask_column)")
    x, m = torch.from_numpy(res.images), torch.from_numpy(res.masks)
    y = torch.zeros(len(x), dtype=torch.long)
    # One subject: hold out every slice whose position mod 10 < 3 (neighbouring slices
    # correlate; with one volume a patient-level split is impossible).
    ho = torch.tensor([i % 10 < round(10 * cfg.holdout_fraction) for i in range(len(x))])
    data = SiteData(site.name, x[~ho], y[~ho], x[ho], y[ho], m[~ho], m[ho])
    privacy_site = dataclasses.replace(site, role="train", privacy={"epsilon": 8.0, "delta": 1e-5})

    def run_for(model: ModelConfig) -> RunConfig:
        return RunConfig(name=cfg.name, sites=[privacy_site], seed=cfg.seed, model=model, training=cfg.training)

    console.print(f"mask demo: {len(data.train_x)} training / {len(data.holdout_x)} held-out slices of {site.name}")
    conditioned = train_generator(run_for(cfg.model), data, out / "state_conditioned", device)
    plain = train_generator(run_for(dataclasses.replace(cfg.model, mask_channels=0)), data, out / "state_unconditioned", device)
    steps = cfg.sampling.ddim_steps
    syn_ho = conditioned.sample(data.holdout_y, cfg.seed, steps, 64, device, masks=data.holdout_masks)
    plain_ho = plain.sample(data.holdout_y, cfg.seed, steps, 64, device)
    syn_tr = conditioned.sample(data.train_y, cfg.seed + 1, steps, 64, device, masks=data.train_masks)

    follow = {
        "real": mask_contrast(data.holdout_x, data.holdout_masks),
        "mask_conditioned": mask_contrast(syn_ho, data.holdout_masks),
        "unconditioned": mask_contrast(plain_ho, data.holdout_masks),
    }
    seg = cfg.segmentation
    real_net = train_segmenter(seg, data.train_x, data.train_masks, cfg.seed, device)
    hybrid_net = train_segmenter(seg, torch.cat([data.train_x, syn_tr]), torch.cat([data.train_masks, data.train_masks]), cfg.seed, device)
    dices = {
        "real_only": dice(real_net, data.holdout_x, data.holdout_masks, device),
        "real_plus_synthetic": dice(hybrid_net, data.holdout_x, data.holdout_masks, device),
    }
    report = {
        "name": cfg.name, "site": site.name, "slices": {"train": len(data.train_x), "holdout": len(data.holdout_x)},
        "mask_contrast": follow, "dice": dices, "dice_gain": dices["real_plus_synthetic"] - dices["real_only"],
        "dp": cfg.training.dp, "wall_time_s": time.time() - start, "versions": versions(),
    }
    write_json(out / "report.json", report)
    k = min(16, len(data.holdout_x))
    grids = [image_grid(data.holdout_masks[:k].float(), "held-out masks"), image_grid(data.holdout_x[:k], "real"),
             image_grid(syn_ho[:k], "mask-conditioned DDPM"), image_grid(plain_ho[:k], "unconditioned DDPM")]
    rows = [{"figure": f"mask contrast: {k}", "value": v} for k, v in follow.items()] + [{"figure": f"Dice: {k}", "value": v} for k, v in dices.items()]
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>fedsynth mask demo</title></head><body style='font-family:sans-serif'>"
        f"<h1>Mask-conditioned DDPM on {site.name}</h1>{html_table(rows, ['figure', 'value'])}"
        + "".join(f"<div><img src='{g}'></div>" for g in grids) + "</body></html>",
        encoding="utf-8",
    )
    console.print(f"mask contrast {follow} | Dice {dices} | {report['wall_time_s']:.0f} s -> {out}")
    return out, report
