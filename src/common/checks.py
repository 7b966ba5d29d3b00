"""Checks on model weights that both a client and the server run before trusting them."""

from __future__ import annotations

import torch


class CheckFailed(ValueError):
    pass


def check_weights(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], origin: str) -> None:
    """Reject weights whose keys, shapes, dtypes or values (NaN/inf) are wrong."""
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
