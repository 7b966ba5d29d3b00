"""Class-conditional DDPM built from MONAI parts.

* Network: :class:`monai.networks.nets.DiffusionModelUNet` with a class embedding.
* Training: ε-prediction with the "simple" loss of Ho et al. (2020), Eq. 14:
  ``L = E_{t, x0, ε} || ε - ε_θ(√ᾱ_t x0 + √(1-ᾱ_t) ε, t) ||²`` using
  :class:`monai.networks.schedulers.DDPMScheduler` for the forward process (Eq. 4).
* Mask conditioning (optional): the mask is concatenated to the noisy image's
  channels at every step, as in the conditional brain-MRI DDPM of the reference paper.
* Sampling: deterministic DDIM (Song et al. 2021, Eq. 12 with η = 0) via
  :class:`monai.networks.schedulers.DDIMScheduler`, with few steps.

Images live in [0, 1] outside this module and in [-1, 1] inside it.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from ..config import ModelConfig
from .finetune import add_adapters


def build_unet(cfg: ModelConfig) -> DiffusionModelUNet:
    # No attention: it is slow on CPU at 32x32 and its per-sample gradients are costly under DP.
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.in_channels + cfg.mask_channels,
        out_channels=cfg.in_channels,
        channels=tuple(cfg.channels),
        attention_levels=(False,) * len(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        # One extra "null" class for classifier-free guidance.
        num_class_embeds=cfg.num_classes + (1 if cfg.label_dropout > 0 else 0),
    )
    if cfg.adapter_rank:
        add_adapters(unet, cfg.adapter_rank)
    return unet


def train_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule="linear_beta")


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def noise_prediction_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    x01: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ho et al. Eq. 14. ``reduction='none'`` gives one loss per image (for attacks);
    ``cond`` (masks) is concatenated to the noisy input's channels."""
    x0 = to_model_range(x01)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (len(x0),), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    xt = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
    if cond is not None:
        xt = torch.cat([xt, cond.float()], dim=1)
    pred = model(xt, timesteps=timesteps, class_labels=labels)
    per_image = ((pred - noise) ** 2).flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cfg: ModelConfig,
    labels: torch.Tensor,
    steps: int,
    seed: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cond: torch.Tensor | None = None,
    sampler: str = "ddim",
) -> torch.Tensor:
    """Generate one image per entry of ``labels`` (and of ``cond`` masks, if given); returns
    (N, C, S, S) in [0, 1]. ``sampler='ddim'``: ``steps`` deterministic DDIM steps;
    ``'ddpm'``: the full ancestral chain of Ho et al. (Algorithm 2, all training timesteps)."""
    model = model.to(device).eval()
    if sampler == "ddpm":
        scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule="linear_beta", clip_sample=True)
        scheduler.set_timesteps(cfg.num_train_timesteps)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule="linear_beta", clip_sample=True)
        scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    out = []
    batches = range(0, len(labels), batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        y = labels[start : start + batch_size].to(device)
        x = torch.randn((len(y), cfg.in_channels, cfg.image_size, cfg.image_size), generator=gen).to(device)
        c = None if cond is None else cond[start : start + batch_size].float().to(device)
        for t in scheduler.timesteps:
            inp = x if c is None else torch.cat([x, c], dim=1)
            tt = torch.full((len(y),), int(t), device=device, dtype=torch.long)
            eps = model(inp, timesteps=tt, class_labels=y)
            if cfg.guidance_scale > 0 and cfg.label_dropout > 0:  # Ho & Salimans 2022, Eq. 6
                eps_null = model(inp, timesteps=tt, class_labels=torch.full_like(y, cfg.num_classes))
                eps = (1 + cfg.guidance_scale) * eps - cfg.guidance_scale * eps_null
            if sampler == "ddpm":  # a CPU generator cannot draw CUDA noise
                x, _ = scheduler.step(eps, int(t), x, generator=gen if x.device.type == "cpu" else None)
            else:
                x, _ = scheduler.step(eps, int(t), x)
        out.append(to_unit_range(x).cpu())
    return torch.cat(out) if out else torch.empty(0, cfg.in_channels, cfg.image_size, cfg.image_size)
