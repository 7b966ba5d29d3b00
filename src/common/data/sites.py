"""A hospital's local dataset, built the same way on the client and in evaluation.

Training sites share the pooled official train+val images by a seeded,
label-skewed partition; an external site reads its own splits (the official
test split in the demo). Every site then applies its acquisition profile and
splits 70/30 into generator-training and held-out images.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RunConfig, SiteConfig
from .acquisition import apply_profile
from .medmnist import DataError, load_splits, locate
from .partition import content_hashes, first_occurrences, holdout_split, label_skewed_partition, sized_label_skewed_partition
from .pseudonym import UNKNOWN_PATIENT


@dataclass
class SiteData:
    """Images are float32 (N, 1, S, S) in [0, 1]; labels int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor
    # (N, 1, S, S) uint8 masks, for sites whose scans come with masks
    train_masks: torch.Tensor | None = None
    holdout_masks: torch.Tensor | None = None
    # The unit of privacy of each training row (a pseudonymised patient), when the source
    # knows patients; None means every image is its own unit (MedMNIST has no patient ids).
    train_units: list[str] | None = None

    @property
    def privacy_unit(self) -> str:
        """"patient" where every scan's patient is known; "scan" where some are not (each such scan
        is its own unit); "image" where the source knows no patients at all."""
        if self.train_units is None:
            return "image"
        return "scan" if any(u.startswith(UNKNOWN_PATIENT) for u in self.train_units) else "patient"

    def unit_groups(self) -> list[np.ndarray]:
        """Training-row indices of each privacy unit (one list per patient, or one per image)."""
        if self.train_units is None:
            return [np.array([i]) for i in range(len(self.train_x))]
        order: dict[str, list[int]] = {}
        for i, unit in enumerate(self.train_units):
            order.setdefault(unit, []).append(i)
        return [np.array(v) for v in order.values()]

    @property
    def max_records_per_unit(self) -> int:
        if self.train_units is None:
            return 1 if len(self.train_x) else 0
        return max(Counter(self.train_units).values(), default=0)


def to_model_space(images_u8: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [0, 1], bilinear resize."""
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0)[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x


@lru_cache(maxsize=8)
def _read(path: str, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The source's images with exact duplicates removed (by content hash) before any split:
    a copy on both sides of a split would count a training image as held out."""
    x, y = load_splits(Path(path), list(splits))
    keep = first_occurrences(x)
    return x[keep], y[keep]


def _pool(site: SiteConfig) -> tuple[str, tuple[str, ...]]:
    return str(locate(site.source).resolve()), tuple(site.source.splits)


def partitioned_sites(run: RunConfig) -> list[SiteConfig]:
    """The sites that divide the training sites' shared MedMNIST pool among them, in order:
    the training sites, then a public prior's data when it is declared as a share of that pool."""
    train_sites = [s for s in run.training_sites if s.source.kind == "medmnist"]
    sources = {_pool(s) for s in train_sites}
    if len(sources) > 1:
        raise DataError(f"{train_sites[0].origin}: training sites drawn by partition must share one source; got {sorted(sources)}")
    public = run.public_prior.data if run.public_prior else None
    if public is not None and public.source.kind == "medmnist" and train_sites:
        (pool_file, pool_splits), (file, splits) = _pool(train_sites[0]), _pool(public)
        if file == pool_file and set(splits) & set(pool_splits):
            if splits != pool_splits:  # the same images in another order would partition differently
                raise DataError(f"{public.origin}: source.splits {list(splits)} overlap the sites' pool {list(pool_splits)}: "
                                "take the same splits in the same order (a share of the partition) or disjoint ones")
            return [*train_sites, public]
        for site in run.sites:  # the same dataset in another file (another resolution): splits must not meet
            if site.source.kind == "medmnist" and site.source.dataset == public.source.dataset and set(splits) & set(site.source.splits):
                raise DataError(f"{public.origin}: source: {public.source.dataset} splits {list(splits)} are also read by "
                                f"site {site.name}; a public prior takes a share of the sites' own file or disjoint splits")
    return train_sites


def site_indices(run: RunConfig, site: SiteConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of ``site`` in its source arrays; returns (all images, labels, own indices)."""
    x, y = _read(*_pool(site))
    parts_of = partitioned_sites(run)
    if site.role == "external" or all(s.name != site.name or s.role != site.role for s in parts_of):
        return x, y, np.arange(len(y))
    seed = run.seed if run.partition.seed is None else run.partition.seed
    cfg = run.partition
    parts = _partition(*_pool(site), tuple(s.share for s in parts_of), cfg.scheme, cfg.alpha, cfg.min_per_class, cfg.min_images, seed)
    k = [(s.name, s.role) for s in parts_of].index((site.name, site.role))
    return x, y, parts[k]


@lru_cache(maxsize=4)
def _partition(path: str, splits: tuple[str, ...], shares: tuple[float, ...], scheme: str, alpha: float, min_per_class: int,
               min_images: int, seed: int) -> list[np.ndarray]:
    """Cached: every site's load (and a simulated node's every round) would otherwise redo the
    split of the whole pool, O(sites) each, O(sites^2) for a federation's preflight."""
    _, y = _read(path, splits)
    if scheme == "by_site":
        return sized_label_skewed_partition(y, list(shares), alpha, seed, min_images, min_per_class)
    return label_skewed_partition(y, list(shares), alpha=alpha, seed=seed, min_per_class=min_per_class)


def load_site(run: RunConfig, site: SiteConfig) -> SiteData:
    if site.source.kind != "medmnist":
        return _load_ingested(run, site)
    x, y, idx = site_indices(run, site)
    images = apply_profile(to_model_space(x[idx], run.model.image_size), site.acquisition)
    labels = torch.from_numpy(y[idx])
    # Each site's split seed mixes the run seed with the site name: seeded, site-specific.
    tr, ho = holdout_split(len(labels), site.holdout_fraction, _split_seed(run, site), labels.numpy(), run.partition.folds, run.partition.fold)
    return SiteData(site.name, images[tr], labels[tr], images[ho], labels[ho])


@dataclass
class PublicData:
    """Images declared public (float (N, C, S, S) in [0, 1], labels), with what identifies them."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    sha256: str  # of the uint8 images and labels, before the acquisition profile
    removed_overlap: int  # images dropped because a site or evaluation set holds the same pixels
    hashes: list[bytes] = field(default_factory=list)  # each image's content hash (before the profile)


def load_public(run: RunConfig) -> PublicData:
    """The public prior's data: no image of any site's share, held-out set or external set.

    A share of the sites' own pool is disjoint by the partition; exact copies of any image in
    another MedMNIST source a site reads (e.g. the external test split) are removed by content hash."""
    if run.public_prior is None:
        raise ValueError("public_prior: not configured")
    site = run.public_prior.data
    if site.source.kind == "medmnist":
        x, y, idx = site_indices(run, site)
        raw, labels = x[idx], y[idx]
        foreign: set[bytes] = set()
        for other in run.sites:
            if other.source.kind == "medmnist":
                ox, _, oidx = site_indices(run, other)
                foreign |= set(content_hashes(ox[oidx]))
        keep = np.array([h not in foreign for h in content_hashes(raw)], dtype=bool)
        raw, labels = raw[keep], labels[keep]
        images = to_model_space(raw, run.model.image_size)
        removed = int((~keep).sum())
    else:
        from .ingest import ingest_site

        res = ingest_site(site, run.model.image_size, progress=False, num_classes=run.model.num_classes)
        keep = first_occurrences(res.images)
        raw, labels, removed = res.images[keep], res.labels[keep], 0
        images = torch.from_numpy(raw)
    if images.shape[1] != run.model.in_channels:
        raise DataError(f"{site.origin}: {images.shape[1]} channels per image, but model.in_channels is {run.model.in_channels}")
    if len(labels) == 0:
        raise DataError(f"{site.origin}: no public image is left once every site's and evaluation set's images are removed")
    digest = hashlib.sha256(np.ascontiguousarray(raw).tobytes() + np.ascontiguousarray(labels).astype(np.int64).tobytes()).hexdigest()
    return PublicData(site.name, apply_profile(images, site.acquisition), torch.from_numpy(labels).long(), digest, removed, content_hashes(raw))


def _split_seed(run: RunConfig, site: SiteConfig) -> int:
    return run.seed * 1_000_003 + sum(map(ord, site.name))


def _load_ingested(run: RunConfig, site: SiteConfig) -> SiteData:
    """A DICOM / NIfTI / image-folder site, split 70/30 by patient, never by slice."""
    from .ingest import ingest_site

    res = ingest_site(site, run.model.image_size, progress=False, num_classes=run.model.num_classes)
    if res.images.shape[1] != run.model.in_channels:
        raise DataError(f"{site.origin}: {res.images.shape[1]} channels per image, but model.in_channels is {run.model.in_channels}")
    # Exact duplicate slices (the same pixels twice, even under two patients) go before the split.
    keep = first_occurrences(res.images)
    patients = [res.patients[i] for i in keep.tolist()]
    images = apply_profile(torch.from_numpy(res.images[keep]), site.acquisition)
    labels = torch.from_numpy(res.labels[keep])
    ho = patient_holdout(patients, res.labels[keep], site.holdout_fraction, _split_seed(run, site), site.name,
                         run.partition.folds, run.partition.fold)
    tr_idx, ho_idx = torch.from_numpy(np.flatnonzero(~ho)), torch.from_numpy(np.flatnonzero(ho))
    masks = None if res.masks is None else torch.from_numpy(res.masks[keep])
    return SiteData(site.name, images[tr_idx], labels[tr_idx], images[ho_idx], labels[ho_idx],
                    None if masks is None else masks[tr_idx], None if masks is None else masks[ho_idx],
                    train_units=[patients[i] for i in tr_idx.tolist()])


def patient_holdout(patients: list[str], labels: np.ndarray, fraction: float, seed: int, site: str = "",
                    folds: int = 0, fold: int = 0) -> np.ndarray:
    """Boolean held-out mask per slice: whole patients go to one side, stratified by label
    (with ``folds >= 2``: the patients of fold ``fold``)."""
    ids = sorted(set(patients))
    first = {p: int(l) for p, l in zip(reversed(patients), reversed(labels.tolist()))}
    p_labels = np.array([first[p] for p in ids])
    strat = p_labels if np.bincount(p_labels).min() >= 2 else None
    tr, ho = holdout_split(len(ids), fraction, seed, strat, folds, fold)
    if len(tr) == 0 or len(ho) == 0:
        raise DataError(f"site {site}: {len(ids)} patient(s) cannot be split {1 - fraction:.0%}/{fraction:.0%} by patient")
    held = {ids[i] for i in ho}
    return np.array([p in held for p in patients])
