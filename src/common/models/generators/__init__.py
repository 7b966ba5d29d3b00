"""Generators behind one interface, chosen by ``model.name``."""

from ...config import ModelConfig
from .base import Generator
from .ddpm import DDPM
from .gan import GAN
from .vae import VAE

REGISTRY: dict[str, type[Generator]] = {cls.name: cls for cls in (DDPM, VAE, GAN)}


def build_generator(cfg: ModelConfig, seed: int | None = None) -> Generator:
    """The configured generator; with ``seed``, the run's initial model (global RNGs seeded first)."""
    if seed is not None:
        from ...runtime import seed_everything

        seed_everything(seed)
    return REGISTRY[cfg.name](cfg)


__all__ = ["DDPM", "GAN", "REGISTRY", "VAE", "Generator", "build_generator"]
