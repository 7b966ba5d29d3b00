"""Fidelity: FID / KID in a documented feature space, and MS-SSIM diversity.

Feature extractors (see docs/metrics.md):

* ``random-convnet`` (default, offline): a fixed MONAI residual encoder whose
  weights are drawn from a seeded generator; features are the global averages of
  every stage (480 dims). Its weight hash is reported so numbers are comparable
  only between runs with the same hash. Not comparable to published Inception FIDs.
* ``inception``: the standard TF-Inception-v3 port used by StyleGAN2-ADA /
  clean-fid (TorchScript ``inception-2015-12-05.pt``), read from a configured
  local path, 2048-d pool features. Needs no torchvision.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..config import FidelityConfig
from ..data.medmnist import download
from ..runtime import sha256_state_dict

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# First three standard MS-SSIM weights (Wang et al. 2003), renormalised: 32x32 images allow three scales.
MSSSIM_BETAS = (0.0711, 0.4530, 0.4760)


class RandomConvNetFeatures(nn.Module):
    """Seeded random MONAI residual encoder; multi-scale average-pooled features."""

    def __init__(self, seed: int = 0, channels: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stages, c_in = [], 1
            for c_out in channels:
                stages.append(ResidualUnit(2, c_in, c_out, strides=2, subunits=2, norm="INSTANCE", act="LEAKYRELU"))
                c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.num_features = sum(channels)
        self.eval().requires_grad_(False)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01.mean(dim=1, keepdim=True) * 2 - 1  # multi-contrast: scored on the channel mean
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x.mean(dim=(-2, -1)))
        return torch.cat(feats, dim=1)


class InceptionFeatures(nn.Module):
    """The TorchScript TF-Inception-v3 (2048-d pool3 features) from a local file."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features = 2048

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = (x01.mean(dim=1, keepdim=True).clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
        return self.net(x, return_features=True)


def build_extractor(cfg: FidelityConfig) -> tuple[nn.Module, dict]:
    """Return the feature network and a description of it for the report."""
    if cfg.extractor == "inception":
        if not cfg.inception_path:
            raise ValueError("evaluation.fidelity.inception_path: required when extractor is 'inception'")
        path = Path(cfg.inception_path).expanduser()
        if not path.is_file():
            if not cfg.inception_download:
                raise FileNotFoundError(
                    f"evaluation.fidelity.inception_path: {path} not found; place inception-2015-12-05.pt "
                    "there or set inception_download: true"
                )
            download(INCEPTION_URL, path, md5=None)
        net = InceptionFeatures(path)
        return net, {"name": "inception-2015-12-05 (TorchScript)", "path": str(path), "dims": 2048}
    net = RandomConvNetFeatures(seed=0)
    return net, {"name": "random-convnet-v1 (seed 0)", "dims": net.num_features, "weights_sha256": sha256_state_dict(net.state_dict())}


@torch.no_grad()
def extract(net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([net(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).double()


class _Precomputed(nn.Module):
    """Lets torchmetrics FID/KID consume features we extracted once."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def fid_kid(real_feats: torch.Tensor, fake_feats: torch.Tensor, kid_subset_size: int = 100) -> dict[str, float]:
    """FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) from feature matrices."""
    dims = real_feats.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dims)).double()
    subset = min(kid_subset_size, len(real_feats), len(fake_feats))
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        kid = KernelInceptionDistance(feature=_Precomputed(dims), subset_size=subset).double()
    for metric in (fid, kid):
        metric.update(real_feats, real=True)
        metric.update(fake_feats, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def msssim_diversity(images: torch.Tensor, labels: torch.Tensor, pairs: int, seed: int) -> float:
    """Mean MS-SSIM of random same-class pairs (lower = more diverse; 1 = collapse)."""
    gen = torch.Generator().manual_seed(seed)
    a_idx, b_idx = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            continue
        n = max(1, round(pairs * len(idx) / len(labels)))
        a = idx[torch.randint(len(idx), (n,), generator=gen)]
        b = idx[torch.randint(len(idx), (n,), generator=gen)]
        keep = a != b
        a_idx.append(a[keep])
        b_idx.append(b[keep])
    a, b = torch.cat(a_idx), torch.cat(b_idx)
    score = ms_ssim(images[a].float(), images[b].float(), data_range=1.0, kernel_size=7, betas=MSSSIM_BETAS, normalize="relu")
    return float(score)
