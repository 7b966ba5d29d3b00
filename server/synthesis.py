"""Sample the pooled synthetic dataset from the final global model and write its manifest.

The release is *staged* (``run_dir/staging``), unsigned: it becomes a signed release in
``run_dir/synthetic`` only once the memorisation gate passes (server.export)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.models.generators import build_generator
from common.security.signing import SIGNING_KEY_ENV
from common.runtime import pick_device, sha256_file, sha256_state_dict, versions, write_json

STAGING, RELEASE = "staging", "synthetic"


def release_dir(run_dir: Path) -> Path:
    """The released folder when the gate passed, else the staged one."""
    return run_dir / RELEASE if (run_dir / RELEASE / "synthetic.npz").exists() else run_dir / STAGING


def class_counts(run: RunConfig) -> list[int]:
    """Images per class: ``synthesis.class_mix`` if set, else uniform. A public input: the
    sites' own label counts never leave them (they would be an unaccounted release)."""
    k = run.model.num_classes
    if run.synthesis.class_mix:
        mix = np.array([run.synthesis.class_mix.get(c, 0.0) for c in range(k)], dtype=float)
    else:
        mix = np.ones(k)
    if mix.sum() <= 0:
        raise ValueError("synthesis.class_mix: shares must sum to a positive number")
    mix = mix / mix.sum()
    counts = np.floor(mix * run.synthesis.num_images).astype(int)
    counts[np.argmax(mix)] += run.synthesis.num_images - counts.sum()
    return counts.tolist()


def synthesize(run: RunConfig, weights: dict[str, torch.Tensor], out_dir: Path, provenance: dict) -> Path:
    """Write ``out_dir/synthetic.npz`` (uint8 images, labels) and an unsigned ``manifest.json``."""
    counts = class_counts(run)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    gen = build_generator(run.model)
    gen.load_state_dict(weights)
    seed = run.seed + 1
    images = gen.sample(labels, seed, run.synthesis.ddim_steps, run.synthesis.batch_size, pick_device())
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "synthetic.npz"
    partial = out_dir / "synthetic.npz.partial"  # readers (the dashboard) never see half a file
    with open(partial, "wb") as f:
        np.savez_compressed(f, images=(images.numpy() * 255).round().astype(np.uint8),  # (N, C, S, S)
                            labels=labels.numpy().astype(np.int64))
    os.replace(partial, data_path)
    manifest = {
        "files": {data_path.name: sha256_file(data_path)},
        "num_images": int(len(labels)),
        "class_counts": counts,
        "class_mix": "configured (public)" if run.synthesis.class_mix else "uniform (public)",
        "generator": run.model.name,
        "sampler": {"name": "DDIM" if run.model.name == "ddpm" else "ancestral", "steps": run.synthesis.ddim_steps, "eta": 0.0, "seed": seed},
        "model_sha256": sha256_state_dict(weights),
        "run_seed": run.seed,
        "versions": versions(),
        **provenance,
    }
    write_json(out_dir / "manifest.json", manifest)
    return data_path


def signing_key_path(run: RunConfig, run_dir: Path) -> Path:
    """The deployment's release-signing key: ``$FEDSYNTH_SIGNING_KEY``, else ``synthesis.signing_key``
    (a relative path is relative to the working directory). Refused inside the run folders: they are
    shared and copied, and a key beside the data would let anyone who holds the data re-sign it."""
    given = os.environ.get(SIGNING_KEY_ENV) or run.synthesis.signing_key
    path = Path(given).expanduser().resolve()
    runs = Path(run_dir).resolve().parent
    if path.is_relative_to(runs):
        raise ValueError(f"synthesis.signing_key: {path} lies inside the run folders ({runs}); keep the deployment's "
                         "signing key outside them (fedsynth certs makes certs/release_signing.pem)")
    return path


def load_synthetic(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as npz:
        x = torch.from_numpy(npz["images"].astype(np.float32) / 255.0)
        y = torch.from_numpy(npz["labels"])
    return x, y
