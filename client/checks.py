"""Local checks a hospital node runs before it trusts inputs or sends outputs."""

from __future__ import annotations

import torch

from common.data import SiteData


class CheckFailed(ValueError):
    pass


def check_weights(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], origin: str) -> None:
    """Reject a global model whose keys, shapes, dtypes or values are wrong."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise CheckFailed(f"{origin}: weights have missing keys {missing[:5]} / unexpected keys {extra[:5]}")
    for key, ref in expected.items():
        got = received[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckFailed(f"{origin}: {key} is {tuple(got.shape)}/{got.dtype}, expected {tuple(ref.shape)}/{ref.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckFailed(f"{origin}: {key} holds NaN or inf")


def check_site_data(data: SiteData) -> None:
    """Local data must be finite, in [0, 1] and hold at least one training image."""
    for split, x in (("train", data.train_x), ("holdout", data.holdout_x)):
        if not torch.isfinite(x).all():
            raise CheckFailed(f"site {data.name}: {split} images hold NaN or inf")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise CheckFailed(f"site {data.name}: {split} images fall outside [0, 1]")
    if len(data.train_x) == 0:
        raise CheckFailed(f"site {data.name}: no training images")
