"""The Fidelity-Utility-Privacy (FUP) composite score, 0-100 (docs/metrics.md).

Each pillar is scaled to 0-100 against references measured in the same run:

* Fidelity  F = sqrt(F_FID * F_coverage), where
  F_FID = mean over classes of 100 * clip(log(FID_null,c / FID_syn,c) / log(FID_null,c / FID_ref,c), 0, 1):
  per class, where the release's FID falls, on a log scale, between FID_ref (real training vs
  real held-out images of that class, at the release's n: the real data's own floor, 100) and
  FID_null (uniform noise: a generator that learned nothing, 0); a class the release lacks scores 0;
  F_coverage = 100 * clip(coverage / coverage_real): the share of real images whose neighbourhood
  holds a synthetic one (Naeem et al. 2020), against real data's own at the same n. FID alone is
  noisy at a few hundred images per class and blind to a small mode collapse; coverage sees
  missing modes with a floor of 0.006 (docs/metrics.md).
* Utility   U = 100 * clip((AUC_syn - 0.5) / (AUC_real - 0.5), 0, 1), averaged over internal
  and external test sets (train on synthetic, test on real; macro AUC when multi-class).
* Privacy   P = (P_attack + min(P_attack, P_guarantee)) / 2: half what the attacks allow, half the
  guarantee, which can lower P but never lift it above the attacks (a copy of the training set
  scores 0 whatever epsilon it claims: a bug in the accounting must not hide it), where
  P_attack = min over the release attacks (the same for every generator family) of
  100 * (1 - e) for the DCR excess e (the share of synthetic images nearer a member than any
  held-out image, above the 95th percentile of its permutation null, as a fraction of the room
  above the null's mean: 0 by chance, about 0.8 for copies),
  100 * clip(1 - (r - q) / (1 - q)) for the re-identification rate r at chance level q, and
  100 * clip(1 - 2 (AUC - 0.5)) for the density-ratio membership attack; and
  P_guarantee = 100 * (1 - (e^eps - 1 + 2 delta) / (e^eps + 1)) for the worst site's (eps, delta):
  one minus the largest membership advantage (TPR - FPR) any attack can have against an
  (eps, delta)-DP mechanism (Kairouz et al. 2015's hypothesis-testing bound). No DP: 0.
  The attacks can only show leakage, never its absence; the guarantee is what is proven.

FUP = weighted geometric mean of F, U and P: a release that fails one pillar (copies: P = 0;
noise: F = 0; one class: U = 0) cannot buy it back with the other two.
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
    span = math.log(fid_null / max(fid_reference, 1e-12))
    return 100.0 * _clip01(math.log(fid_null / max(fid_synthetic, 1e-12)) / span)


def class_fidelity_score(per_class: dict[str, dict | None], reference: dict[str, dict | None], null: dict[str, dict | None]) -> float:
    """Mean per-class fidelity score; a class missing from the release scores 0."""
    scores = []
    for c, ref in reference.items():
        syn, nul = per_class.get(c), null.get(c)
        scores.append(0.0 if syn is None or ref is None or nul is None else fidelity_score(syn["fid"], ref["fid"], nul["fid"]))
    return sum(scores) / len(scores)


def coverage_score(coverage: float, coverage_reference: float) -> float:
    return 100.0 * _clip01(coverage / max(coverage_reference, 1e-12))


def utility_score(auc_synthetic: list[float], auc_real: list[float]) -> float:
    ratios = [_clip01((s - 0.5) / max(r - 0.5, 1e-6)) for s, r in zip(auc_synthetic, auc_real, strict=True)]
    return 100.0 * sum(ratios) / len(ratios)


def membership_advantage_bound(epsilon: float | None, delta: float | None) -> float:
    """The largest TPR - FPR of any membership test against an (eps, delta)-DP mechanism."""
    if epsilon is None or math.isinf(epsilon):
        return 1.0
    if epsilon > 700:  # e^eps overflows; the bound is 1 to double precision
        return 1.0
    e = math.exp(epsilon)
    return min(1.0, (e - 1 + 2 * (delta or 0.0)) / (e + 1))


def attack_scores(dcr_excess: float, reid_rate: float, reid_quantile: float, domias_auc: float) -> dict[str, float]:
    """``dcr_excess``: the DCR share above its permutation null's 95th percentile, scaled to [0, 1]."""
    return {
        "dcr": 100.0 * _clip01(1 - dcr_excess),
        "reid": 100.0 * _clip01(1.0 - (reid_rate - reid_quantile) / (1.0 - reid_quantile)),
        "domias": 100.0 * _clip01(1.0 - 2.0 * (domias_auc - 0.5)),
    }


def privacy_score(attacks: dict[str, float], epsilon: float | None, delta: float | None) -> dict[str, float]:
    """P and its parts: P_attack (the weakest attack score), P_guarantee (from eps, delta)."""
    p_attack = min(attacks.values())
    p_guarantee = 100.0 * (1.0 - membership_advantage_bound(epsilon, delta))
    return {"privacy": (p_attack + min(p_attack, p_guarantee)) / 2, "attack": p_attack, "guarantee": p_guarantee, "attacks": attacks}


def fup_score(fidelity: float, utility: float, privacy: float, weights: FUPWeights) -> float:
    """Weighted geometric mean of the pillars (0-100); any pillar at 0 with a positive weight gives 0."""
    pairs = [(weights.fidelity, fidelity), (weights.utility, utility), (weights.privacy, privacy)]
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError("evaluation.fup_weights: at least one weight must be positive")
    if any(w > 0 and v <= 0 for w, v in pairs):
        return 0.0
    return math.exp(sum(w * math.log(v) for w, v in pairs if w > 0) / total)
