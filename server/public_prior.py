"""The coordinator's public prior: the generator pretrained without DP on data declared public.

Public pretraining, then DP fine-tuning, is what makes DP image generators usable
(Ghalebikesabi et al. 2023, "Differentially private diffusion models generate useful
synthetic images"): DP-SGD then only has to move a good model, not build one from
noise. Only ``public_prior.data`` (loaded by :func:`common.data.load_public`) enters
this stage; no site's data does. The result is the round-0 global model, cached by
a hash of the public data, the model and the pretraining settings, and described by
a card (name, description, data hash, image counts, steps, model hash) that the
manifest and the report carry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.config import RunConfig
from common.data import PublicData, load_public
from common.models.finetune import LowRankConv2d, select_trainable
from common.models.generators import build_generator
from common.runtime import pick_device, sha256_state_dict, versions, write_json

from .strategy import ema_update


def prior_key(run: RunConfig, data: PublicData) -> str:
    """What the prior depends on: the public data, the model, the pretraining settings, the seed."""
    assert run.public_prior is not None
    settings = {k: v for k, v in vars(run.public_prior).items() if k not in ("data", "cache_dir", "seed")}
    libs = {k: v for k, v in versions().items() if k in ("torch", "monai", "fedsynth")}  # the weights depend on them too
    blob = json.dumps({"data": data.sha256, "acquisition": vars(run.public_prior.data.acquisition), "model": vars(run.model),
                       "settings": settings, "seed": run.public_prior.seed_for(run.seed), "versions": libs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def pretrain(run: RunConfig, data: PublicData, device: torch.device | str = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """``public_prior.steps`` non-private steps on ``data``; returns the EMA of the weights.

    Starts from the same seeded initialisation as a run without a prior; adapters (if the
    model has them) stay at their identity initialisation, so DP fine-tuning starts at the prior."""
    cfg = run.public_prior
    assert cfg is not None
    seed = cfg.seed_for(run.seed)
    gen = build_generator(run.model, seed=seed)
    for mod in gen.modules.values():
        mod.requires_grad_(True)
        for adapter in (m for m in mod.modules() if isinstance(m, LowRankConv2d)):
            adapter.down.requires_grad_(False)
            adapter.up.requires_grad_(False)
    gen.to(device).train()
    gen.batch_size = cfg.batch_size
    optimizers = gen.optimizers(cfg.lr)
    ema = ema_update(None, gen.state_dict(), 0.0)
    draw = torch.Generator().manual_seed(seed)
    for step in tqdm(range(cfg.steps), desc=f"public prior ({data.name})", unit="step", disable=not progress):
        idx = torch.randint(len(data.x), (cfg.batch_size,), generator=draw)
        gen.train_step(gen.modules[gen.private], optimizers, data.x[idx].to(device), data.y[idx].to(device))
        # Warm-up: early weights fade fast.
        ema = ema_update(ema, gen.state_dict(), min(cfg.ema_decay, (1 + step) / (10 + step)))
    return {k: v.cpu() for k, v in ema.items()}


def gradient_norms(run: RunConfig, weights: dict[str, torch.Tensor], data: PublicData, n: int = 128) -> dict[str, float] | None:
    """Quantiles of per-example gradient norms of the ``training.trainable`` parameters at the prior,
    on *public* images (random t and noise, fixed seed): where to put DP-SGD's clipping norm C
    without looking at any site's data. None for generators without a per-example DDPM loss."""
    if run.model.name != "ddpm" or run.model.mask_channels:
        return None
    from common.models.diffusion import noise_prediction_loss

    gen = build_generator(run.model)
    gen.load_state_dict(weights)
    unet = gen.modules["unet"]
    select_trainable(unet, run.training.trainable)
    params = [p for p in unet.parameters() if p.requires_grad]
    draw = torch.Generator().manual_seed(run.seed)
    norms = []
    for i in torch.randperm(len(data.x), generator=draw)[:n].tolist():
        t = torch.randint(0, run.model.num_train_timesteps, (1,), generator=draw)
        noise = torch.randn((1, *data.x.shape[1:]), generator=draw)
        loss = noise_prediction_loss(unet, gen.scheduler, data.x[i : i + 1], data.y[i : i + 1], t, noise)
        norms.append(torch.sqrt(sum((g**2).sum() for g in torch.autograd.grad(loss, params))).item())
    q = torch.tensor(norms).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"q10": q[0], "median": q[1], "q90": q[2], "images": len(norms)}


def public_prior(run: RunConfig, runs_root: Path | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The prior's weights and card, pretrained once and then read from the cache
    (``public_prior.cache_dir``, relative to ``runs_root``, default the run's ``output_dir``)."""
    assert run.public_prior is not None
    data = load_public(run)
    key = prior_key(run, data)
    cache = Path(run.public_prior.cache_dir).expanduser()
    cache = cache if cache.is_absolute() else (runs_root or Path(run.output_dir).expanduser().resolve()) / cache
    weights_path, card_path = cache / f"{key[:24]}.pt", cache / f"{key[:24]}.json"
    site = run.public_prior.data
    try:
        weights = torch.load(weights_path, map_location="cpu")
        card = json.loads(card_path.read_text())
        if card.get("model_sha256") == sha256_state_dict(weights):
            return weights, _with_norms(run, weights, data, {**card, "name": site.name, "description": site.description})
    except (OSError, ValueError, RuntimeError, EOFError):
        pass  # missing, torn or corrupt: pretrain again (a saved prior is always written whole)
    weights = pretrain(run, data, pick_device(), progress)
    card = {
        "name": site.name,
        "description": site.description,
        "source": {"kind": site.source.kind, "dataset": site.source.dataset, "splits": list(site.source.splits), "root": site.source.root},
        "data_sha256": data.sha256,
        "images": len(data.y),
        "class_counts": torch.bincount(data.y).tolist(),
        "removed_overlap_with_sites": data.removed_overlap,
        "acquisition": vars(site.acquisition),
        "steps": run.public_prior.steps,
        "batch_size": run.public_prior.batch_size,
        "lr": run.public_prior.lr,
        "ema_decay": run.public_prior.ema_decay,
        "seed": run.public_prior.seed_for(run.seed),
        "model_sha256": sha256_state_dict(weights),
        "key": key,
    }
    cache.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_suffix(".tmp")
    torch.save(weights, tmp)
    tmp.replace(weights_path)
    write_json(card_path, card)
    return weights, _with_norms(run, weights, data, card)


def _with_norms(run: RunConfig, weights: dict, data: PublicData, card: dict) -> dict:
    # Depends on training.trainable, not on the cached weights: measured for this run (seconds).
    norms = gradient_norms(run, weights, data)
    return {**card, "public_gradient_norms": None if norms is None else {"trainable": list(run.training.trainable), **norms},
            "max_grad_norm": run.training.max_grad_norm}
