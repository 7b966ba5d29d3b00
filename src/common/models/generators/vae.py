"""Conditional VAE (Kingma & Welling 2014) from MONAI's VarAutoEncoder.

The encoder sees the image with the label as one-hot channels; the decoder sees
``z + embedding(label)``. Loss per image: binary cross-entropy reconstruction
(summed over pixels) + ``kl_weight`` x KL(q(z|x) || N(0, I)), i.e. the negative ELBO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn

from .base import Generator, one_hot_maps, sample_latent


class ConditionalVAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vae = VarAutoEncoder(
            spatial_dims=2,
            in_shape=(cfg.in_channels + cfg.num_classes, cfg.image_size, cfg.image_size),
            out_channels=cfg.in_channels,
            latent_size=cfg.latent_size,
            channels=tuple(cfg.channels),
            strides=(2,) * len(cfg.channels),
            norm="INSTANCE",
        )
        self.label_embedding = nn.Embedding(cfg.num_classes, cfg.latent_size)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_forward(z + self.label_embedding(y), use_sigmoid=True)

    def forward(self, x, y, eps):
        mu, logvar = self.vae.encode_forward(torch.cat([x, one_hot_maps(y, self.cfg.num_classes, x.shape[-1])], 1))
        z = mu + eps * torch.exp(0.5 * logvar)
        recon = self.decode(z, y)
        rec = F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return rec + self.cfg.kl_weight * kl  # negative ELBO per image


class VAE(Generator):
    name = "vae"
    private = "vae"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.modules = {"vae": ConditionalVAE(cfg)}

    def train_step(self, private, optimizers, x, y, masks=None):
        loss = private(x, y, torch.randn(len(x), self.cfg.latent_size, device=x.device)).mean() / x[0].numel()
        optimizers["vae"].zero_grad()
        loss.backward()
        optimizers["vae"].step()
        return {"train_loss": loss.item()}

    def sample(self, labels, seed, steps, batch_size, device, progress=True, masks=None):
        model = self.modules["vae"].to(device).eval()
        return sample_latent(model.decode, self.cfg.latent_size, labels, seed, batch_size, device, progress)

    @torch.no_grad()
    def membership_scores(self, x, y, seed, device, masks=None):
        model = self.modules["vae"].to(device).eval()
        eps = torch.randn(len(x), self.cfg.latent_size, generator=torch.Generator().manual_seed(seed))
        return torch.cat([-model(x[i : i + 256].to(device), y[i : i + 256].to(device), eps[i : i + 256].to(device)).cpu()
                          for i in range(0, len(x), 256)]) / x[0].numel()
