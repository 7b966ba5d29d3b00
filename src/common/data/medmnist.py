"""Locate, download (online users) and read MedMNIST ``.npz`` files.

Resolution order for a site's file:
1. ``source.path`` in the site YAML;
2. ``$FEDSYNTH_DATA_DIR/medmnist/<dataset>.npz``;
3. ``<cache_dir>/<dataset>.npz``, downloaded there first when ``source.download`` is true.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from ..config import SourceConfig
from ..runtime import file_digest

# Official MedMNIST v2/v3 release files (Zenodo record 10519652) and their MD5s
# as published in the ``medmnist`` package's INFO table.
OFFICIAL = {
    "pneumoniamnist": (
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    ),
}


class DataError(ValueError):
    """A dataset file is missing, corrupt or lacks the expected arrays."""


def download(url: str, dest: Path, md5: str | None) -> Path:
    """Download ``url`` to ``dest`` and check its MD5 (when known); a mismatch leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
        got = file_digest(tmp, "md5")
        if md5 is not None and got != md5:
            raise DataError(f"{url}: MD5 mismatch (expected {md5}, got {got}); download discarded")
        os.replace(tmp, dest)
    except OSError as exc:
        raise DataError(f"{url}: download failed ({exc}). Set source.path or $FEDSYNTH_DATA_DIR to a local copy") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def locate(source: SourceConfig) -> Path:
    if source.path:
        path = Path(os.path.expanduser(source.path))
        if not path.is_file():
            raise DataError(f"source.path: {path} does not exist")
        return path
    name = f"{source.dataset}.npz"
    env = os.environ.get("FEDSYNTH_DATA_DIR")
    if env and (Path(env) / "medmnist" / name).is_file():
        return Path(env) / "medmnist" / name
    cached = Path(os.path.expanduser(source.cache_dir)) / name
    if cached.is_file():
        return cached
    if source.download:
        if source.dataset not in OFFICIAL:
            raise DataError(f"source.dataset: no official download known for {source.dataset!r}")
        url, md5 = OFFICIAL[source.dataset]
        return download(url, cached, md5)
    raise DataError(
        f"{name} not found: set source.path in the site YAML, or $FEDSYNTH_DATA_DIR "
        f"(looked in {env or '<unset>'}/medmnist and {cached.parent}), or source.download: true"
    )


def load_splits(path: Path, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the requested splits: uint8 images (N, H, W) and int64 labels (N,)."""
    try:
        with np.load(path) as npz:
            images = [npz[f"{s}_images"] for s in splits]
            labels = [npz[f"{s}_labels"] for s in splits]
    except KeyError as exc:
        raise DataError(f"{path}: missing array {exc}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    x = np.concatenate(images)
    y = np.concatenate(labels).reshape(-1).astype(np.int64)
    if x.ndim != 3 or len(x) != len(y):
        raise DataError(f"{path}: expected images (N,H,W) matching labels, got {x.shape} and {y.shape}")
    return x, y
