"""Class-conditional DDPM (MONAI DiffusionModelUNet) behind the generator interface."""

from __future__ import annotations

import torch

from ..diffusion import build_unet, noise_prediction_loss, sample, train_scheduler
from .base import Generator


class DDPM(Generator):
    name = "ddpm"
    private = "unet"
    supports_masks = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.modules = {"unet": build_unet(cfg)}
        self.scheduler = train_scheduler(cfg)

    def train_step(self, private, optimizers, x, y, masks=None):
        loss = noise_prediction_loss(private, self.scheduler, x, y, cond=masks)
        optimizers["unet"].zero_grad()
        loss.backward()
        optimizers["unet"].step()
        return {"train_loss": loss.item()}

    def sample(self, labels, seed, steps, batch_size, device, progress=True, masks=None):
        return sample(self.modules["unet"], self.cfg, labels, steps, seed, batch_size, device, progress, cond=masks)

    @torch.no_grad()
    def membership_scores(self, x, y, seed, device, masks=None, timesteps=(50, 100, 200, 300)):
        unet = self.modules["unet"].to(device).eval()
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(len(x))
        for t in timesteps:
            noise = torch.randn(x.shape, generator=gen)
            for i in range(0, len(x), 256):
                sl = slice(i, i + 256)
                tt = torch.full((len(x[sl]),), t, dtype=torch.long, device=device)
                cond = None if masks is None else masks[sl].to(device)
                total[sl] += noise_prediction_loss(unet, self.scheduler, x[sl].to(device), y[sl].to(device), tt, noise[sl].to(device), "none", cond).cpu()
        return -total / len(timesteps)
