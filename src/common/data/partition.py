"""Seeded splits of a labelled pool across hospitals and within a hospital."""

from __future__ import annotations

import hashlib

import numpy as np


def content_hashes(images: np.ndarray) -> list[bytes]:
    """SHA-256 of each image's bytes: equal exactly when the pixels are."""
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest() for image in images]


def first_occurrences(images: np.ndarray) -> np.ndarray:
    """Sorted indices that keep the first copy of every exactly repeated image (SHA-256 of its bytes)."""
    seen: set[bytes] = set()
    keep = []
    for i, digest in enumerate(content_hashes(images)):
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def _positive(shares: list[float]) -> np.ndarray:
    arr = np.asarray(shares, dtype=float)
    if (arr <= 0).any():
        raise ValueError("shares must be positive")
    return arr


def label_skewed_partition(
    labels: np.ndarray,
    shares: list[float],
    alpha: float,
    seed: int,
    min_per_class: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split indices into ``len(shares)`` disjoint parts of unequal size and label mix.

    For each class, its indices are divided by proportions drawn from
    ``Dirichlet(alpha * K * shares / sum(shares))`` (K = number of sites), so the
    expected size of part k follows ``shares[k]`` while the label mix varies; a
    smaller ``alpha`` means stronger skew. Draws are repeated until every part holds
    at least ``min_per_class`` images of every class.
    """
    shares_arr = _positive(shares)
    conc = alpha * len(shares_arr) * shares_arr / shares_arr.sum()
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in shares_arr]
        ok = True
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(conc)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                ok &= len(chunk) >= min_per_class
                parts[k].append(chunk)
        if ok:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ValueError(
        f"could not give every site {min_per_class} images per class in {max_tries} draws; "
        "raise partition.alpha or lower partition.min_per_class"
    )


def sized_label_skewed_partition(
    labels: np.ndarray,
    shares: list[float],
    alpha: float,
    seed: int,
    min_images: int = 0,
    min_per_class: int = 0,
) -> list[np.ndarray]:
    """Split indices into parts whose *sizes* follow ``shares`` and whose label mixes are skewed.

    Part k gets ``min_images`` plus its share of the rest of the pool and a label mix
    drawn from ``Dirichlet(alpha x pool prevalence)``: size skew and label skew are set
    independently, as in cross-silo benchmarks with many small hospitals (Li et al. 2022,
    "Federated learning on non-IID data silos"). Each class is taken first from that mix, at
    least ``min_per_class`` (every site's floor is taken before any site's mix), then the part
    is filled from whatever is left. Sites are served in a seeded random order, so no site
    index is always served last.
    """
    shares_arr = _positive(shares)
    n_total, k_sites = len(labels), len(shares_arr)
    if k_sites * min_images > n_total:
        raise ValueError(f"{k_sites} sites of at least {min_images} images need {k_sites * min_images}; the pool holds {n_total}: "
                         "lower partition.min_images or the number of sites")
    # Every site its floor, then the rest of the pool by share.
    sizes = min_images + np.floor(shares_arr / shares_arr.sum() * (n_total - k_sites * min_images)).astype(int)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    prevalence = np.array([(labels == c).mean() for c in classes])
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    order = rng.permutation(k_sites)
    mixes = {k: rng.dirichlet(alpha * len(classes) * prevalence) for k in order}
    taken: dict[int, list[int]] = {k: [] for k in order}
    # First every site's floor of every class (while the class lasts), so that no site's floor
    # depends on being served early; then each site's own mix, filled from what is left.
    for k in order:
        floor = min(min_per_class, sizes[k] // len(classes))
        for c in range(len(classes)):
            n = min(floor, len(pools[c]))
            taken[k] += pools[c][:n]
            del pools[c][:n]
    for k in order:
        want = rng.multinomial(sizes[k] - len(taken[k]), mixes[k])
        for c, n in enumerate(want):
            n = min(int(n), len(pools[c]))
            taken[k] += pools[c][:n]
            del pools[c][:n]
        while len(taken[k]) < sizes[k]:  # a class ran out: fill from the largest that is left
            c = int(np.argmax([len(p) for p in pools]))
            taken[k].append(pools[c].pop())
    parts = [np.sort(np.array(taken[k], dtype=np.int64)) for k in range(k_sites)]
    return parts


def holdout_split(n: int, holdout_fraction: float, seed: int, labels: np.ndarray | None = None,
                  folds: int = 0, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train, held-out) index split, stratified by label when given.

    ``folds >= 2``: stratified k-fold instead; the held-out set is fold ``fold`` (each class dealt
    round-robin into ``folds`` groups after a seeded shuffle), so the folds are disjoint and cover all."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, hold = [], []
    for g in groups:
        g = rng.permutation(g)
        if folds >= 2:
            in_fold = (np.arange(len(g)) % folds) == fold
            hold.append(g[in_fold])
            train.append(g[~in_fold])
            continue
        k = int(round(len(g) * holdout_fraction))
        hold.append(g[:k])
        train.append(g[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(hold))
