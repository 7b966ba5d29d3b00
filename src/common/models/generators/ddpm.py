"""Class-conditional DDPM (MONAI DiffusionModelUNet) behind the generator interface."""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion import build_unet, noise_prediction_loss, sample, to_model_range, train_scheduler
from .base import Generator


class NoiseMultiplicityLoss(nn.Module):
    """Per-image DDPM loss averaged over K (t, noise) draws: DPDM's noise multiplicity.

    Opacus clips per *module input row*, so the K draws must live inside one row: the
    forward takes a single packed tensor per image [x | label | t_1..t_K | noise_1..K]
    (functorch's per-sample vmap allows one input and no random draws inside).
    """

    def __init__(self, unet: nn.Module, scheduler, cfg, k: int):
        super().__init__()
        self.unet, self.k, self.cfg = unet, k, cfg
        self.alphas_cumprod = scheduler.alphas_cumprod.clone()  # a plain tensor: functorch forbids buffers
        # Opacus computes per-sample gradients of a whole module with functorch only if
        # the module owns a parameter itself; this one never affects the loss.
        self.anchor = nn.Parameter(torch.zeros(()))

    def pack(self, x01: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, k = len(x01), self.k
        t = torch.randint(0, len(self.alphas_cumprod), (b, k), device=x01.device).float()
        noise = torch.randn((b, k, *x01.shape[1:]), device=x01.device)
        return torch.cat([to_model_range(x01).flatten(1), y[:, None].float(), t, noise.flatten(1)], 1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        b, k = packed.shape[0], self.k
        shape = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        n = shape[0] * shape[1] * shape[2]
        x0 = packed[:, :n].reshape(b, 1, *shape)
        y = packed[:, n].long()
        t = packed[:, n + 1 : n + 1 + k].long()
        noise = packed[:, n + 1 + k :].reshape(b, k, *shape)
        a = self.alphas_cumprod.to(packed)[t].reshape(b, k, 1, 1, 1)
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).reshape(b * k, *shape)  # Ho et al. Eq. 4
        pred = self.unet(xt, timesteps=t.reshape(-1), class_labels=y.repeat_interleave(k))
        return ((pred.reshape(b, k, *shape) - noise) ** 2).mean(dim=(1, 2, 3, 4)) + 0.0 * self.anchor


class DDPM(Generator):
    name = "ddpm"
    private = "unet"
    supports_masks = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.modules = {"unet": build_unet(cfg)}
        self.scheduler = train_scheduler(cfg)

    def private_module(self, noise_multiplicity: int = 1) -> nn.Module:
        if noise_multiplicity == 1:
            return self.modules["unet"]
        if self.cfg.mask_channels:
            raise ValueError("training.noise_multiplicity > 1 is not implemented with mask conditioning")
        return NoiseMultiplicityLoss(self.modules["unet"], self.scheduler, self.cfg, noise_multiplicity)

    def train_step(self, private, optimizers, x, y, masks=None):
        if self.cfg.label_dropout > 0:  # classifier-free guidance: sometimes train unconditionally
            drop = torch.rand(len(y), device=y.device) < self.cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, self.cfg.num_classes), y)
        inner = getattr(private, "_module", private)
        if isinstance(inner, NoiseMultiplicityLoss):
            loss = private(inner.pack(x, y)).mean()
        else:
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
