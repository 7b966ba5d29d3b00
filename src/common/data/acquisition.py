"""Deterministic per-site acquisition profiles, so sites differ as scanners do.

Applied to intensities in [0, 1], in this order: gamma, contrast about the mean,
Gaussian blur, intensity offset, seeded Gaussian noise, clip to [0, 1].
"""

from __future__ import annotations

import torch
from monai.transforms import AdjustContrast, GaussianSmooth

from ..config import AcquisitionConfig


def apply_profile(images: torch.Tensor, profile: AcquisitionConfig) -> torch.Tensor:
    """``images``: float tensor (N, C, H, W) in [0, 1]. Returns a new tensor."""
    x = images.clone()
    if profile.gamma != 1.0:
        # MONAI AdjustContrast is the gamma transform (x - min)/(range) ** gamma, rescaled.
        x = torch.stack([AdjustContrast(gamma=profile.gamma)(img) for img in x])
    if profile.contrast != 1.0:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * profile.contrast + mean
    if profile.blur_sigma > 0:
        smooth = GaussianSmooth(sigma=profile.blur_sigma)
        x = torch.stack([smooth(img) for img in x])
    x = x + profile.offset
    if profile.noise_std > 0:
        gen = torch.Generator().manual_seed(profile.seed)
        x = x + profile.noise_std * torch.randn(x.shape, generator=gen)
    # A plain tensor: MONAI's transforms return MetaTensors, whose per-op metadata bookkeeping
    # slowed every training step that touched the images (about 3x for the VAE on CPU).
    return x.clamp(0.0, 1.0).float().as_subclass(torch.Tensor)


