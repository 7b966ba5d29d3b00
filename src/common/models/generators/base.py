"""The one interface every generator implements.

Clients, the server, synthesis and evaluation only talk to this interface; the
model is chosen by ``model.name`` in config. A generator owns one or more
networks (``modules``); the one named by ``private`` is the module DP-SGD wraps
(the whole model for DDPM/VAE, the discriminator for a DP-GAN).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ...config import ModelConfig


class Generator(ABC):
    name: ClassVar[str]
    private: ClassVar[str]

    supports_masks: ClassVar[bool] = False
    # The expected (public) batch size of DP training, set by the trainer: a generator that
    # draws data-independent rows (the DP-GAN's fakes) sizes them by it, never by the private batch.
    batch_size: int | None = None

    def __init__(self, cfg: ModelConfig):
        if cfg.mask_channels and not self.supports_masks:
            raise ValueError(f"model.mask_channels: mask conditioning is implemented for ddpm, not {self.name}")
        self.cfg = cfg
        self.modules: dict[str, nn.Module] = {}

    # ----------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every array exchanged with Flower, keys prefixed by module name."""
        return {f"{m}.{k}": v for m, mod in self.modules.items() for k, v in mod.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for m, mod in self.modules.items():
            prefix = f"{m}."
            mod.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def to(self, device: torch.device | str) -> "Generator":
        for mod in self.modules.values():
            mod.to(device)
        return self

    def train(self, mode: bool = True) -> "Generator":
        for mod in self.modules.values():
            mod.train(mode)
        return self

    def optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """One Adam per trained module over its trainable parameters; the private one is wrapped by Opacus."""
        return {m: torch.optim.Adam([p for p in mod.parameters() if p.requires_grad], lr=lr) for m, mod in self.modules.items()}

    # ------------------------------------------------------- training
    def private_module(self, noise_multiplicity: int = 1) -> nn.Module:
        """The module DP-SGD wraps (and ``train_step`` receives)."""
        if noise_multiplicity > 1:
            raise ValueError(f"training.noise_multiplicity: only ddpm supports it, not {self.name}")
        return self.modules[self.private]

    @abstractmethod
    def train_step(
        self, private: nn.Module, optimizers: dict[str, torch.optim.Optimizer], x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One optimisation step on a batch; ``private`` is ``modules[self.private]``, maybe DP-wrapped."""

    # ----------------------------------------------------- generation
    @abstractmethod
    def sample(
        self, labels: torch.Tensor, seed: int, steps: int, batch_size: int, device: torch.device | str, progress: bool = True,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One image per label (and mask, for a mask-conditioned model), (N, C, S, S) in [0, 1]."""

    # --------------------------------------------------------- attacks
    @abstractmethod
    def membership_scores(
        self, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device | str, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-image score for a membership-inference attack: higher = more likely a training image.
        Minus the model's own per-example loss (DDPM: denoising, VAE: negative ELBO, GAN: -D logit)."""


@torch.no_grad()
def sample_latent(decode, latent_size: int, labels: torch.Tensor, seed: int, batch_size: int, device, progress: bool) -> torch.Tensor:
    """Latent-variable sampling (VAE, GAN): ``decode(z, y)`` with seeded z ~ N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress):
        y = labels[i : i + batch_size].to(device)
        out.append(decode(torch.randn(len(y), latent_size, generator=gen).to(device), y).cpu())
    return torch.cat(out)


def one_hot_maps(y: torch.Tensor, num_classes: int, size: int) -> torch.Tensor:
    """Labels as constant one-hot image channels (B, K, S, S): how the VAE and GAN are conditioned."""
    return nn.functional.one_hot(y, num_classes).float()[:, :, None, None].expand(-1, -1, size, size)
