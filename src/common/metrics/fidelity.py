"""Fidelity in a documented feature space: FID / KID (overall and per class), precision /
recall (Kynkäänniemi et al. 2019), density / coverage (Naeem et al. 2020), MS-SSIM diversity.

Feature extractors (see docs/metrics.md):

* ``domain`` (default): a MONAI residual encoder trained to classify the *public* partition
  (``public_prior.data``: no site's and no evaluation set's images), recipe in
  ``evaluation.fidelity.domain``; its recipe, data hash and weight hash go in the report.
* ``random-convnet`` (fallback when no public data is declared): the same encoder with
  weights drawn from a seeded generator. Weaker: it rates a release missing a whole class
  close to real data (docs/metrics.md, measured).
* ``inception``: the standard TF-Inception-v3 port used by StyleGAN2-ADA / clean-fid
  (TorchScript ``inception-2015-12-05.pt``), read from a configured local path.

Every comparison uses the same number of images on both sides: FID's bias grows as n falls.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from pathlib import Path


import torch
from monai.networks.blocks import ResidualUnit
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..config import FidelityConfig, RunConfig
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


def train_domain_extractor(x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> RandomConvNetFeatures:
    """The encoder plus a linear head, trained by cross-entropy on public images; returns the encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RandomConvNetFeatures(seed=seed)
        net.requires_grad_(True).train()
        head = nn.Linear(net.num_features, int(y.max()) + 1)
        opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=lr)
        draw = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(x), (batch_size,), generator=draw)
            opt.zero_grad()
            nn.functional.cross_entropy(head(net(x[idx])), y[idx]).backward()
            opt.step()
    return net.eval().requires_grad_(False)


def domain_extractor(run: RunConfig, runs_root: Path | None = None) -> tuple[nn.Module, dict]:
    """The domain encoder for ``run``, trained once on the public partition and then cached."""
    from ..data import load_public

    if run.public_prior is None:
        raise ValueError("evaluation.fidelity.extractor: 'domain' needs public data (public_prior.data); "
                         "declare it, or choose random-convnet")
    cfg = run.evaluation.fidelity.domain
    data = load_public(run)
    recipe = {"objective": "cross-entropy on the public labels", "steps": cfg.steps, "batch_size": cfg.batch_size,
              "lr": cfg.lr, "seed": cfg.seed, "image_size": run.model.image_size}
    blob = json.dumps({"data": data.sha256, "acquisition": vars(run.public_prior.data.acquisition), "recipe": recipe,
                       "torch": torch.__version__}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:24]
    cache = Path(cfg.cache_dir).expanduser()
    cache = cache if cache.is_absolute() else (runs_root or Path(run.output_dir).expanduser().resolve()) / cache
    path = cache / f"{key}.pt"
    net = RandomConvNetFeatures()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu"))
    except (OSError, RuntimeError, EOFError, ValueError):
        net = train_domain_extractor(data.x, data.y, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    info = {"name": "domain-convnet-v1", "dims": net.num_features, "weights_sha256": sha256_state_dict(net.state_dict()),
            "trained_on": {"name": data.name, "images": len(data.y), "data_sha256": data.sha256}, "recipe": recipe,
            "fallback": False}
    return net, info


def build_extractor(cfg: FidelityConfig, run: RunConfig | None = None) -> tuple[nn.Module, dict]:
    """Return the feature network and a description of it for the report. ``domain`` falls back
    to ``random-convnet`` (labelled ``fallback: true``) when the run declares no public data."""
    if cfg.extractor == "domain":
        if run is not None and run.public_prior is not None:
            return domain_extractor(run)
        net = RandomConvNetFeatures(seed=0)
        return net, {"name": "random-convnet-v1 (seed 0)", "dims": net.num_features, "weights_sha256": sha256_state_dict(net.state_dict()),
                     "fallback": True, "why": "no public data declared (public_prior.data): no domain extractor can be trained"}
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
        return net, {"name": "inception-2015-12-05 (TorchScript)", "path": str(path), "dims": 2048, "fallback": False}
    net = RandomConvNetFeatures(seed=0)
    return net, {"name": "random-convnet-v1 (seed 0)", "dims": net.num_features, "weights_sha256": sha256_state_dict(net.state_dict()),
                 "fallback": False}


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


def prdc(real_feats: torch.Tensor, fake_feats: torch.Tensor, nearest_k: int) -> dict[str, float]:
    """Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020),
    by the authors' reference implementation (``prdc``), on k-NN balls in feature space."""
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the sample sizes
        out = compute_prdc(real_feats.float().numpy(), fake_feats.float().numpy(), nearest_k)
    return {k: float(v) for k, v in out.items()}


def equal_n(real: torch.Tensor, fake: torch.Tensor, seed: int, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same number of rows from each side (seeded draws without replacement)."""
    n = min(len(real), len(fake), cap or len(real))
    gen = torch.Generator().manual_seed(seed)
    return real[torch.randperm(len(real), generator=gen)[:n]], fake[torch.randperm(len(fake), generator=gen)[:n]]


MIN_CLASS_IMAGES = 10  # fewer images of a class than this: the class counts as missing


def per_class_fid(real_feats: torch.Tensor, real_y: torch.Tensor, fake_feats: torch.Tensor, fake_y: torch.Tensor,
                  seed: int, kid_subset_size: int = 100, caps: dict[int, int] | None = None) -> dict[int, dict | None]:
    """FID / KID of each class against real images of that class, equal n per class (at most
    ``caps[c]``, so references can be computed at a release's n); None where the release holds
    fewer than ``MIN_CLASS_IMAGES`` images of the class (the class is missing)."""
    out: dict[int, dict | None] = {}
    for c in real_y.unique().tolist():
        r, f = real_feats[real_y == c], fake_feats[fake_y == c]
        if len(f) < MIN_CLASS_IMAGES or len(r) < MIN_CLASS_IMAGES:
            out[c] = None
            continue
        r, f = equal_n(r, f, seed + c, (caps or {}).get(c))
        out[c] = {**fid_kid(r, f, kid_subset_size), "images": len(r)}
    return out


def fidelity_suite(real_feats: torch.Tensor, real_y: torch.Tensor, fake_feats: torch.Tensor, fake_y: torch.Tensor,
                   seed: int, nearest_k: int = 5, kid_subset_size: int = 100, cap: int | None = None) -> dict:
    """Every fidelity figure of ``fake`` against ``real`` (features), with equal n throughout."""
    r, f = equal_n(real_feats, fake_feats, seed, cap)
    out = {"images": len(r), **fid_kid(r, f, kid_subset_size), **prdc(r, f, nearest_k)}
    classes = per_class_fid(real_feats, real_y, fake_feats, fake_y, seed, kid_subset_size)
    out["per_class"] = {str(c): v for c, v in classes.items()}
    return out


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
