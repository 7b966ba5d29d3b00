"""Privacy attacks on a released generator and its samples.

* Membership inference (loss threshold attack; Yeom et al. 2018, as applied to
  diffusion models by Matsumoto et al. 2023 and Carlini et al. 2023): the score is
  minus the generator's own per-example loss with fixed randomness
  (``Generator.membership_scores``). AUC and TPR at 1% FPR over members (training
  images) vs non-members (held-out images).
* Nearest-neighbour distance (pixel L2) from synthetic images to training vs
  held-out images of equal count: a memorising generator sits closer to training.
* Re-identification rate: the share of synthetic images closer to a training image
  than the ``q``-quantile of real-to-real (held-out -> training) NN distances.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc



def attack_metrics(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, fpr_target: float = 0.01) -> dict[str, float]:
    scores = torch.cat([member_scores, nonmember_scores]).float()
    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(nonmember_scores))]).long()
    fpr, tpr, _ = binary_roc(scores, truth)
    ok = fpr <= fpr_target
    return {"auc": float(binary_auroc(scores, truth)), "tpr_at_1pct_fpr": float(tpr[ok].max()) if ok.any() else 0.0}


def nn_distances(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Distance (pixel L2 over [0,1] images) from each query to its nearest reference image."""
    ref = reference.flatten(1).float()
    out = [torch.cdist(q.flatten(1).float(), ref).min(dim=1).values for q in queries.split(chunk)]
    return torch.cat(out)


def nearest_neighbour_report(
    synthetic: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor, quantile: float, seed: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    n = min(len(train), len(holdout))
    train_eq = train[torch.randperm(len(train), generator=gen)[:n]]
    hold_eq = holdout[torch.randperm(len(holdout), generator=gen)[:n]]
    d_train = nn_distances(synthetic, train_eq)
    d_hold = nn_distances(synthetic, hold_eq)
    # Real-vs-real reference: how close a new patient's image is to a training image.
    real_ref = nn_distances(holdout, train)
    threshold = float(torch.quantile(real_ref, quantile))
    d_train_full = nn_distances(synthetic, train)
    return {
        "nn_distance_to_train_median": float(d_train.median()),
        "nn_distance_to_holdout_median": float(d_hold.median()),
        "nn_distance_ratio": float(d_train.median() / d_hold.median().clamp(min=1e-12)),
        "reid_threshold": threshold,
        "reid_rate": float((d_train_full < threshold).float().mean()),
    }
