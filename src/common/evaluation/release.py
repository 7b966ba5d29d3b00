"""Score any release (images and labels) against pooled real data: F, U, P and FUP.

One :class:`ReleaseScorer` is built per evaluation: it holds the pooled real images of the
training sites (train and held-out) and of the external sites, their features, the real
references (train vs held-out, noise vs held-out) and the pooled-real classifier. Scoring a
release then reuses all of it, so a run's release, an adversarial release in a test and each
arm of a study are scored by the same code against the same references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import RunConfig
from ..metrics.attacks import domias, release_privacy
from ..metrics.fidelity import build_extractor, equal_n, extract, fid_kid, fidelity_suite, per_class_fid, prdc
from ..metrics.fup import attack_scores, class_fidelity_score, coverage_score, fup_score, privacy_score, utility_score
from ..metrics.utility import score_classifier, train_classifier


@dataclass
class Pool:
    """Pooled real images a simulation's researcher holds (float [0, 1], labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    hold_x: torch.Tensor
    hold_y: torch.Tensor
    external: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_sites(cls, sites: dict, train_names: list[str], ext_names: list[str]) -> Pool:
        cat = lambda parts: torch.cat(parts) if parts else torch.empty(0)  # noqa: E731
        return cls(
            cat([sites[n].train_x for n in train_names]), cat([sites[n].train_y for n in train_names]),
            cat([sites[n].holdout_x for n in train_names]), cat([sites[n].holdout_y for n in train_names]),
            # An external site evaluates on all its images: none were used for training.
            {n: (cat([sites[n].train_x, sites[n].holdout_x]), cat([sites[n].train_y, sites[n].holdout_y])) for n in ext_names},
        )


class ReleaseScorer:
    def __init__(self, run: RunConfig, pool: Pool, device: torch.device, extractor=None):
        self.run, self.pool, self.device = run, pool, device
        ev = run.evaluation
        self.net, self.extractor = extractor or build_extractor(ev.fidelity, run)
        self.seed, self.cap = run.seed, ev.fidelity.max_images
        self.f_hold = extract(self.net, pool.hold_x)
        self.f_train = extract(self.net, pool.train_x)
        noise = torch.rand(pool.hold_x.shape, generator=torch.Generator().manual_seed(run.seed))
        # References on the same footing as a release: the real floor and the noise ceiling.
        self.f_null = extract(self.net, noise)
        self.reference = self._suite(self.f_train, pool.train_y)
        self.null = self._suite(self.f_null, pool.hold_y)
        self._pooled_real: dict | None = None

    def _suite(self, feats: torch.Tensor, labels: torch.Tensor) -> dict:
        ev = self.run.evaluation.fidelity
        return fidelity_suite(self.f_hold, self.pool.hold_y, feats, labels, self.seed, ev.nearest_k, ev.kid_subset_size, self.cap)

    # ------------------------------------------------------------------ fidelity
    def fidelity(self, x: torch.Tensor, y: torch.Tensor, feats: torch.Tensor | None = None) -> dict:
        """``feats``: the release's features when the caller already extracted them."""
        suite = self._suite(extract(self.net, x) if feats is None else feats, y)
        # F's references per class at the release's own n per class: FID's bias depends on n.
        caps = {int(c): v["images"] for c, v in suite["per_class"].items() if v}
        k, p = self.run.evaluation.fidelity.kid_subset_size, self.pool
        ref = {str(c): v for c, v in per_class_fid(self.f_hold, p.hold_y, self.f_train, p.train_y, self.seed, k, caps).items()}
        null = {str(c): v for c, v in per_class_fid(self.f_hold, p.hold_y, self.f_null, p.hold_y, self.seed, k, caps).items()}
        suite["per_class_reference"], suite["per_class_null"] = ref, null
        # Coverage's real reference at the release's n (coverage falls with fewer images).
        r, f = equal_n(self.f_hold, self.f_train, self.seed + 1, suite["images"])
        cov_ref = prdc(r, f, self.run.evaluation.fidelity.nearest_k)["coverage"]
        parts = {"fid": class_fidelity_score(suite["per_class"], ref, null), "coverage": coverage_score(suite["coverage"], cov_ref)}
        return {"extractor": self.extractor, **suite, "score": math.sqrt(parts["fid"] * parts["coverage"]), "score_parts": parts,
                "coverage_reference": cov_ref, "reference": self.reference, "null": self.null}

    # ------------------------------------------------------------------- utility
    def classifier_scores(self, model) -> dict:
        return {"internal": score_classifier(model, self.pool.hold_x, self.pool.hold_y, self.device),
                "external": {e: score_classifier(model, ex, ey, self.device) for e, (ex, ey) in self.pool.external.items()}}

    def fit_and_score(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
        ev, m = self.run.evaluation, self.run.model
        model = train_classifier(ev.classifier, x, y, m.image_size, m.num_classes, seed, self.device)
        return {"train_images": len(x), **self.classifier_scores(model)}

    @property
    def pooled_real(self) -> dict:
        if self._pooled_real is None:
            self._pooled_real = self.fit_and_score(self.pool.train_x, self.pool.train_y, self.seed + 12)
        return self._pooled_real

    def utility(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        syn = self.fit_and_score(x, y, self.seed + 11)
        aucs = lambda r: [r["internal"]["auc"], *(v["auc"] for v in r["external"].values())]  # noqa: E731
        return {"synthetic_only": syn, "pooled_real": self.pooled_real, "score": utility_score(aucs(syn), aucs(self.pooled_real))}

    # ------------------------------------------------------------------- privacy
    def release_privacy(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> dict:
        at = self.run.evaluation.attack
        out = release_privacy(x, self.pool.train_x, self.pool.hold_x, at.reid_quantile, self.seed, at.permutations)
        feats = extract(self.net, x) if feats is None else feats
        out["domias"] = domias(feats, self.f_train, self.f_hold, at.domias_components, at.bootstrap, self.seed)
        return out

    def score(self, x: torch.Tensor, y: torch.Tensor, epsilon: float | None, delta: float | None) -> dict:
        """F, U and P of one release with the worst site's (epsilon, delta), and its FUP."""
        feats = extract(self.net, x)  # once, for the fidelity figures and the density-ratio attack
        fid, util, priv = self.fidelity(x, y, feats), self.utility(x, y), self.release_privacy(x, feats)
        attacks = attack_scores(priv["dcr_excess"], priv["reid_rate"], priv["reid_quantile"], priv["domias"]["auc"])
        p = privacy_score(attacks, epsilon, delta)
        fup = {"fidelity": fid["score"], "utility": util["score"], "privacy": p["privacy"],
               "privacy_attack": p["attack"], "privacy_guarantee": p["guarantee"], "privacy_attacks": p["attacks"],
               "epsilon": epsilon, "delta": delta, "weights": vars(self.run.evaluation.fup_weights)}
        fup["fup"] = fup_score(fup["fidelity"], fup["utility"], fup["privacy"], self.run.evaluation.fup_weights)
        return {"fidelity": fid, "utility": util, "release_privacy": priv, "fup": fup, "features": feats}

    def site_fid(self, real: torch.Tensor, feats: torch.Tensor) -> dict:
        """FID / KID of the release (its features) against one site's real images, equal n on both sides."""
        r, f = equal_n(extract(self.net, real), feats, self.seed, self.cap)
        return {**fid_kid(r, f, self.run.evaluation.fidelity.kid_subset_size), "images": len(r)}
