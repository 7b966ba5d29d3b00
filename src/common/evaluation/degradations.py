"""Known-bad releases built from real images: the yardsticks every fidelity and privacy figure
must rank (tests/test_release_scoring.py, benchmarks/metric_floors.py)."""

from __future__ import annotations

import torch
from monai.transforms import GaussianSmooth

# Each fidelity figure and the failures it claims to catch by a clear margin over its real-data
# noise floor (docs/metrics.md). A figure that cannot rank a failure does not claim it: added
# noise of SD 0.05 moves FID / KID / F by less than their floor at the demo's n (550 per side),
# so only the severity order (0.05 below 0.2) is asserted for it; FID and KID of a 10-image
# collapse ranged from 11 to 68 with the ten images drawn (floor 2 +- 2.5), so they do not claim it.
CLAIMS = {
    "fid": ["flip", "blur_1", "blur_2", "noise_0.2", "class_dropped", "uniform_noise"],
    "kid": ["flip", "blur_1", "blur_2", "noise_0.2", "class_dropped", "uniform_noise"],
    "precision": ["noise_0.2", "uniform_noise"],
    "density": ["noise_0.2", "uniform_noise"],
    "recall": ["blur_2", "mode_collapse_10"],
    "coverage": ["flip", "blur_2", "noise_0.2", "class_dropped", "mode_collapse_10", "uniform_noise"],
    "score": ["flip", "blur_1", "blur_2", "noise_0.2", "class_dropped", "mode_collapse_10", "uniform_noise"],
}


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.stack([GaussianSmooth(sigma)(i) for i in x])


def degraded_releases(x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fidelity failures of a release whose ideal is ``x`` (real images, labels)."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    keep = y != int(torch.bincount(y).argmin())
    return {
        "copies": (x, y),
        "flip": (x.flip(-1), y),
        "blur_1": (blur(x, 1.0), y),
        "blur_2": (blur(x, 2.0), y),
        "noise_0.05": ((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), y),
        "noise_0.2": ((x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1), y),
        "class_dropped": (x[keep], y[keep]),  # the rare class ignored
        "mode_collapse_10": (x[:10].repeat(n // 10, 1, 1, 1), y[:10].repeat(n // 10)),
        "uniform_noise": (torch.rand(x.shape, generator=g), y),
    }


def adversarial_releases(members: tuple[torch.Tensor, torch.Tensor], fresh: tuple[torch.Tensor, torch.Tensor],
                         seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Releases that try to game FUP, beside a good one. ``members``: training images;
    ``fresh``: real images of new patients (what a perfect private generator would emit)."""
    g = torch.Generator().manual_seed(seed)
    (x, y), (fx, fy) = members, fresh
    one = fy == int(torch.bincount(fy).argmax())
    return {
        "good (new patients)": (fx, fy),
        "verbatim copies": (x, y),
        "copies with light noise": ((x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1), y),
        "class-collapsed": (fx[one], fy[one]),
        "pure noise": (torch.rand(x.shape, generator=g), y),
    }
