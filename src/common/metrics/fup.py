"""The Fidelity-Utility-Privacy (FUP) composite score, 0-100 (docs/metrics.md).

Each pillar is scaled to 0-100 against a reference measured in the same run,
so the score does not depend on the feature extractor's units:

* Fidelity  F = 100 * clip(log(FID_null / FID_syn) / log(FID_null / FID_ref), 0, 1):
  where the synthetic FID falls, on a log scale, between FID_ref (real training vs
  real held-out images of the same count: the real data's own floor, F = 100) and
  FID_null (uniform-noise images: a generator that learned nothing, F = 0).
* Utility   U = 100 * clip((AUC_syn - 0.5) / (AUC_real - 0.5), 0, 1), averaged over
  internal and external test sets, where AUC_syn is a classifier trained on
  synthetic data only and AUC_real one trained on pooled real data (the
  train-on-synthetic / test-on-real ratio).
* Privacy   P = min(P_MI, P_reid), with P_MI = 100 * clip(1 - 2 (AUC_MI - 0.5), 0, 1)
  for the worst site's membership-inference AUC, and
  P_reid = 100 * clip(1 - (r - q) / (1 - q), 0, 1) for the worst site's
  re-identification rate r against its chance level q (the real-vs-real quantile).

FUP = (w_F F + w_U U + w_P P) / (w_F + w_U + w_P).
"""

from __future__ import annotations

import math
import warnings

from ..config import FUPWeights


def _clip01(v: float) -> float:
    return max(0.0, min(1.0, v))


def fidelity_score(fid_synthetic: float, fid_reference: float, fid_null: float) -> float:
    if fid_null <= fid_reference:
        warnings.warn(
            f"FID of noise ({fid_null:.4g}) is not above the real reference ({fid_reference:.4g}): "
            "too few images for this extractor to tell; fidelity scored 0",
            RuntimeWarning,
        )
        return 0.0
    span = math.log(fid_null / fid_reference)
    return 100.0 * _clip01(math.log(fid_null / max(fid_synthetic, 1e-12)) / span)


def utility_score(auc_synthetic: list[float], auc_real: list[float]) -> float:
    ratios = [_clip01((s - 0.5) / max(r - 0.5, 1e-6)) for s, r in zip(auc_synthetic, auc_real, strict=True)]
    return 100.0 * sum(ratios) / len(ratios)


def privacy_score(mi_auc: float, reid_rate: float, reid_quantile: float) -> float:
    p_mi = _clip01(1.0 - 2.0 * (mi_auc - 0.5))
    p_reid = _clip01(1.0 - (reid_rate - reid_quantile) / (1.0 - reid_quantile))
    return 100.0 * min(p_mi, p_reid)


def fup_score(fidelity: float, utility: float, privacy: float, weights: FUPWeights) -> float:
    total = weights.fidelity + weights.utility + weights.privacy
    if total <= 0:
        raise ValueError("evaluation.fup_weights: at least one weight must be positive")
    return (weights.fidelity * fidelity + weights.utility * utility + weights.privacy * privacy) / total
