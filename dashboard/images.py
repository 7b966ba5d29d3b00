"""Image grids for a run page: synthetic per class, and real per site and class where allowed."""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np


def grid_png(images: np.ndarray, cols: int = 8, scale: int = 2) -> bytes:
    """uint8 (N, S, S) images tiled on a dark background, upscaled without smoothing, as PNG."""
    from PIL import Image

    n = max(1, len(images))
    size = images.shape[-1] if len(images) else 28
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (size + 2), cols * (size + 2)), 32, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (size + 2) + 1: r * (size + 2) + 1 + size, c * (size + 2) + 1: c * (size + 2) + 1 + size] = img
    out = Image.fromarray(canvas, mode="L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _u8(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return arr.reshape(len(arr), arr.shape[-2], arr.shape[-1])


@lru_cache(maxsize=16)
def _release(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as npz:
        return _u8(npz["images"]), np.asarray(npz["labels"]).astype(int)


def synthetic_by_class(release: Path, per_class: int = 8) -> dict[int, np.ndarray]:
    x, y = _release(str(release), release.stat().st_mtime)
    return {int(c): x[y == c][:per_class] for c in np.unique(y)}


@lru_cache(maxsize=4)
def _real(run_dir: str, mtime: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from common.config import run_from_dict
    from common.data.sites import load_site

    run = run_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    out = {}
    for site in run.sites:
        data = load_site(run, site)  # held-out images: what the evaluation compares with
        out[site.name] = (_u8(data.holdout_x.numpy()), data.holdout_y.numpy().astype(int))
    return out


def real_by_site_and_class(run_dir: Path, per_class: int = 8) -> dict[str, dict[int, np.ndarray]]:
    """Held-out real images of each site. Only for a simulation: the coordinator holds its data."""
    sites = _real(str(run_dir), (run_dir / "config.json").stat().st_mtime)
    return {s: {int(c): x[y == c][:per_class] for c in np.unique(y)} for s, (x, y) in sites.items()}
