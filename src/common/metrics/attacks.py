"""Privacy attacks on a release, the same for every generator family (docs/metrics.md).

Release-only attacks (they see the synthetic images, never the model), each against the
*pooled* training set of all sites, so a copy of any site's images is caught:

* Distance to closest record (DCR): for every synthetic image, is its nearest pooled
  training image closer than its nearest image in an equal-size pooled held-out set?
  Without memorisation the share is about 0.5. A one-sided binomial test against 0.5 is
  reported, but it assumes independent queries, and a hub (one real image nearest to most
  queries, as for noise-like releases) breaks that. What counts is every member against every
  held-out image with a permutation test that re-splits the same real images at random (exact
  under exchangeability), and the excess of the share over the null's 95th percentile.
* Re-identification: the share of synthetic images closer to a training image than the
  ``q``-quantile of real-to-real (held-out -> training) nearest-neighbour distances (chance: q).
* Exact and near duplicates: identical 8-bit pixels (by hash), and images closer to a training
  image than 99.9% of real held-out images come (closer than a new patient almost ever comes).
* Density-ratio membership inference in the spirit of DOMIAS (van Breugel et al. 2023):
  score(x) = log p_synthetic(x) - log p_reference(x), Gaussian KDEs in a PCA of the fidelity
  features; members (training) vs non-members (held-out), AUC with a bootstrap CI.

The model attack (loss threshold; Yeom et al. 2018, as applied to diffusion models by
Matsumoto et al. 2023 and Carlini et al. 2023) needs the model's own loss, so its score
differs per generator family: it is reported with a bootstrap CI but kept out of P.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torchmetrics.functional.classification import binary_roc


def auc_with_ci(member_scores, nonmember_scores, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """ROC AUC (members positive) and its 95% percentile bootstrap CI, resampling each group."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)

    def auc(a, b, axis=-1):
        return stats.mannwhitneyu(a, b, axis=axis).statistic / (a.shape[axis] * b.shape[axis])

    ci = stats.bootstrap((m, n), auc, n_resamples=resamples, method="percentile", random_state=seed, vectorized=True)
    return {"auc": float(auc(m, n)), "auc_ci95": [float(ci.confidence_interval.low), float(ci.confidence_interval.high)],
            "members": int(len(m)), "nonmembers": int(len(n))}


def attack_metrics(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, fpr_target: float = 0.01,
                   resamples: int = 1000, seed: int = 0) -> dict:
    scores = torch.cat([member_scores, nonmember_scores]).float()
    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(nonmember_scores))]).long()
    fpr, tpr, _ = binary_roc(scores, truth)
    ok = fpr <= fpr_target
    out = auc_with_ci(member_scores.double().numpy(), nonmember_scores.double().numpy(), resamples, seed)
    # At 1% FPR the figure rests on about 1% of the non-members: report how many that is.
    return {**out, "tpr_at_1pct_fpr": float(tpr[ok].max()) if ok.any() else 0.0,
            "false_positives_at_1pct_fpr": int(fpr_target * len(nonmember_scores))}


def nn_distances(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Distance (pixel L2 over [0,1] images) from each query to its nearest reference image."""
    ref = reference.flatten(1).float()
    out = [torch.cdist(q.flatten(1).float(), ref).min(dim=1).values for q in queries.split(chunk)]
    return torch.cat(out)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round()


def _share(d_a: torch.Tensor, d_b: torch.Tensor) -> float:
    """Share of queries strictly closer to side a, ties counted half."""
    return float(((d_a < d_b).float() + 0.5 * (d_a == d_b).float()).mean())


def dcr_permutation_null(synthetic: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor, permutations: int, seed: int) -> torch.Tensor:
    """The DCR share under H0 (membership does not matter): the same real images re-split at
    random into groups of the training and held-out sizes, ``permutations`` times. Exact under
    exchangeability; it absorbs the size difference of the two sets and hubs (one image that is
    every query's nearest neighbour), which break the binomial test's independent trials."""
    union = torch.cat([train, holdout]).flatten(1).float()
    dist = torch.cat([torch.cdist(q.flatten(1).float(), union) for q in synthetic.split(512)])
    gen, n, out = torch.Generator().manual_seed(seed), len(train), []
    for _ in range(permutations):
        perm = torch.randperm(len(union), generator=gen)
        out.append(_share(dist[:, perm[:n]].min(1).values, dist[:, perm[n:]].min(1).values))
    return torch.tensor(out)


def _image_hashes(x: torch.Tensor) -> list[bytes]:
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).numpy()
    return [row.tobytes() for row in u8]


def release_privacy(synthetic: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor, quantile: float, seed: int,
                    permutations: int = 500) -> dict:
    """DCR tests, re-identification and duplicates of ``synthetic`` against pooled ``train`` and ``holdout``."""
    gen = torch.Generator().manual_seed(seed)
    # The classic form: equal-size sets, binomial test against 0.5 (reported, not trusted alone).
    n = min(len(train), len(holdout))
    train_eq = train[torch.randperm(len(train), generator=gen)[:n]]
    hold_eq = holdout[torch.randperm(len(holdout), generator=gen)[:n]]
    d_train, d_hold = nn_distances(synthetic, train_eq), nn_distances(synthetic, hold_eq)
    closer, ties = int((d_train < d_hold).sum()), int((d_train == d_hold).sum())
    trials = len(synthetic) - ties  # a tie (e.g. an image present on both sides) says nothing
    binom_p = float(stats.binomtest(closer, trials, 0.5, alternative="greater").pvalue) if trials else 1.0
    # What counts: every member against every held-out image, calibrated by permutation.
    d_full, d_hold_full = nn_distances(synthetic, train), nn_distances(synthetic, holdout)
    share_full = _share(d_full, d_hold_full)
    null = dcr_permutation_null(synthetic, train, holdout, permutations, seed)
    q95 = float(null.quantile(0.95))
    # Real-vs-real: how close a new patient's image comes to a training image.
    real_ref = nn_distances(holdout, train)
    threshold = float(torch.quantile(real_ref, quantile))
    near_threshold = float(torch.quantile(real_ref, 0.001))
    members = set(_image_hashes(train))
    exact = sum(h in members for h in _image_hashes(synthetic))
    near = int((d_full < near_threshold).sum())
    return {
        "dcr_share_closer_to_train": _share(d_train, d_hold),  # equal-size sets (0.5 = no memorisation)
        "dcr_binomial_p": binom_p,  # assumes independent queries; hubs break that (docs/metrics.md)
        "dcr_share_full": share_full,  # all members vs all held-out images (above 0.5 by chance: more members)
        "dcr_p_value": float((1 + (null >= share_full).sum()) / (1 + len(null))),  # permutation test
        "dcr_null_mean": float(null.mean()),
        "dcr_null_q95": q95,
        # The share beyond what chance reaches 95% of the time, as a fraction of the room above
        # chance's mean (not above q95: when the null sits near 1, as for a noise release whose
        # nearest neighbour is one hub image, that room is tiny and would amplify nothing into a lot).
        # 0 = chance; copies of the members reach about 0.8; 1 at most.
        "dcr_excess": min(1.0, max(0.0, (share_full - q95) / max(1e-12, 1 - float(null.mean())))),
        "dcr_permutations": len(null),
        "dcr_images": len(synthetic),
        "dcr_reference_size": n,
        "dcr_train_median": float(d_train.median()),
        "dcr_holdout_median": float(d_hold.median()),
        "reid_threshold": threshold,
        "reid_quantile": quantile,
        "reid_rate": float((d_full < threshold).float().mean()),
        "exact_duplicates": int(exact),
        "near_duplicates": near,
        "near_duplicate_share": near / len(synthetic),
        "near_duplicate_threshold": near_threshold,  # the 0.1% quantile of held-out -> training distances
    }


def domias(syn_feats: torch.Tensor, member_feats: torch.Tensor, holdout_feats: torch.Tensor, components: int,
           resamples: int, seed: int) -> dict:
    """Density-ratio membership attack on the released images alone (DOMIAS-style).

    The held-out set is split in half: one half is the attacker's reference sample of the
    population, the other the non-members; members are an equal number of training images."""
    rng = np.random.default_rng(seed)
    hold = holdout_feats.numpy()[rng.permutation(len(holdout_feats))]
    ref, non = hold[: len(hold) // 2], hold[len(hold) // 2 :]
    mem = member_feats.numpy()[rng.permutation(len(member_feats))[: len(non)]]
    # PCA fitted on the reference (public to the attacker), so the KDEs are well conditioned.
    mean = ref.mean(0)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    proj = vt[: min(components, len(ref) - 1)].T

    def z(a):
        return (a - mean) @ proj

    zs = z(syn_feats.numpy())
    try:
        p_syn = stats.gaussian_kde(zs.T)
    except (np.linalg.LinAlgError, ValueError):
        # A collapsed release (a handful of distinct images) has a singular covariance: spread it
        # by a thousandth of the reference's scale, which leaves its density where the images are.
        zs = zs + 1e-3 * z(ref).std(0) * rng.standard_normal(zs.shape)
        p_syn = stats.gaussian_kde(zs.T)
    p_ref = stats.gaussian_kde(z(ref).T)

    def score(a):
        return p_syn.logpdf(z(a).T) - p_ref.logpdf(z(a).T)

    return auc_with_ci(score(mem), score(non), resamples, seed) | {"components": int(proj.shape[1]), "reference": len(ref)}
