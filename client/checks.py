"""Local checks a hospital node runs before it trusts inputs or sends outputs."""

from __future__ import annotations

import torch

from common.checks import CheckFailed
from common.data import SiteData


def check_site_data(data: SiteData) -> None:
    """Local data must be finite, in [0, 1] and hold at least one training image."""
    for split, x in (("train", data.train_x), ("holdout", data.holdout_x)):
        if not torch.isfinite(x).all():
            raise CheckFailed(f"site {data.name}: {split} images hold NaN or inf")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise CheckFailed(f"site {data.name}: {split} images fall outside [0, 1]")
    if len(data.train_x) == 0:
        raise CheckFailed(f"site {data.name}: no training images")
