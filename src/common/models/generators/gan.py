"""Conditional GAN baseline: a MONAI Generator/Discriminator pair (a small conditional
DCGAN-style model). It stands in for StyleGAN2 / MedGAN in the papers; it is neither.

Under DP the discriminator is the private module (DP-GAN; Xie et al. 2018): only it
sees real images, trained with DP-SGD; the generator learns from the discriminator
alone, which is post-processing. Non-saturating loss (Goodfellow et al. 2014).

The fake half of each discriminator batch must not depend on the private batch:
its size is the *expected* batch size and its labels are drawn from a public class
mix (uniform). Were it conditioned on the private labels and size (as it once was),
one record would move a real row and a fake row, a sensitivity of 2C where the
accountant assumes C, and the generator step would read private labels unnoised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import Discriminator as MonaiDiscriminator
from monai.networks.nets import Generator as MonaiGenerator
from torch import nn

from .base import Generator, one_hot_maps, sample_latent


class ConditionalGenerator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        start = cfg.image_size // 2 ** len(cfg.channels)
        self.net = MonaiGenerator(
            latent_shape=(cfg.latent_size + cfg.num_classes,),
            start_shape=(cfg.channels[-1], start, start),
            channels=tuple(reversed(cfg.channels[:-1])) + (cfg.in_channels,),
            strides=(2,) * len(cfg.channels),
            num_res_units=1,
        )

    def forward(self, z, y):
        return torch.sigmoid(self.net(torch.cat([z, F.one_hot(y, self.cfg.num_classes).float()], 1)))


class ConditionalDiscriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.net = MonaiDiscriminator(
            in_shape=(cfg.in_channels + cfg.num_classes, cfg.image_size, cfg.image_size),
            channels=tuple(cfg.channels),
            strides=(2,) * len(cfg.channels),
            num_res_units=1,
            norm="INSTANCE",  # no batch statistics: per-sample gradients stay per sample
            dropout=None,
            last_act=None,
        )

    def forward(self, x, y):
        return self.net(torch.cat([x * 2 - 1, one_hot_maps(y, self.cfg.num_classes, x.shape[-1])], 1)).flatten()


class GAN(Generator):
    name = "gan"
    private = "discriminator"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.modules = {"generator": ConditionalGenerator(cfg), "discriminator": ConditionalDiscriminator(cfg)}

    def optimizers(self, lr):
        return {m: torch.optim.Adam(mod.parameters(), lr=lr, betas=(0.5, 0.999)) for m, mod in self.modules.items()}

    def fake_batch(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` latent draws and labels from the public (uniform) class mix: no private input."""
        z = torch.randn(n, self.cfg.latent_size, device=device)
        fake_y = torch.randint(0, self.cfg.num_classes, (n,), device=device)
        return z, fake_y

    def train_step(self, private, optimizers, x, y, masks=None):
        g, d_opt, g_opt = self.modules["generator"], optimizers["discriminator"], optimizers["generator"]
        n_fake = self.batch_size or len(x)  # the expected (public) batch size under DP
        z, fake_y = self.fake_batch(n_fake, x.device)
        fake = g(z, fake_y)
        # Discriminator: real and fake in one batch, so one (DP) step per iteration.
        logits = private(torch.cat([x, fake.detach()]), torch.cat([y, fake_y]))
        target = torch.cat([torch.ones(len(x)), torch.zeros(n_fake)]).to(x.device)
        d_loss = F.binary_cross_entropy_with_logits(logits, target)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        # Generator: through the discriminator, without per-sample gradient bookkeeping.
        toggle = getattr(private, "disable_hooks", None)
        if toggle:
            private.disable_hooks()
        g_loss = F.binary_cross_entropy_with_logits(private(fake, fake_y), torch.ones(n_fake, device=x.device))
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        if toggle:
            private.enable_hooks()
        d_opt.zero_grad()
        return {"train_loss": d_loss.item(), "generator_loss": g_loss.item()}

    def sample(self, labels, seed, steps, batch_size, device, progress=True, masks=None):
        g = self.modules["generator"].to(device).eval()
        return sample_latent(g, self.cfg.latent_size, labels, seed, batch_size, device, progress)

    @torch.no_grad()
    def membership_scores(self, x, y, seed, device, masks=None):
        d = self.modules["discriminator"].to(device).eval()
        return torch.cat([d(x[i : i + 256].to(device), y[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)])
