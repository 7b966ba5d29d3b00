"""Utility: train a downstream classifier and score it on real images.

Synthetic data is used the two ways practitioners use it (``evaluation.downstream``):

* ``mix``: real and synthetic images in one training set (``ratio`` synthetic per real image);
* ``pretrain_finetune``: train on synthetic images first, then fine-tune on the real ones.

Every real-data phase takes the same number of optimiser steps as the real-only classifier
(``epochs`` passes over the real images), so a gain is not bought with extra real-data steps.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_recall,
    binary_specificity,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_recall,
)

from ..config import ClassifierConfig
from ..models import build_classifier
from ..runtime import seed_everything


def real_steps(cfg: ClassifierConfig, n_real: int) -> int:
    """Optimiser steps of ``cfg.epochs`` passes over ``n_real`` images: the budget every mode gets."""
    return cfg.epochs * math.ceil(n_real / cfg.batch_size)


def train_classifier(
    cfg: ClassifierConfig, x: torch.Tensor, y: torch.Tensor, image_size: int, num_classes: int, seed: int, device: torch.device,
    steps: int | None = None, init: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Class-weighted cross-entropy, Adam; ``steps`` optimiser steps (default ``cfg.epochs`` epochs).
    ``init``: continue from this model (fine-tuning) instead of a fresh one."""
    seed_everything(seed)
    model = init if init is not None else build_classifier(cfg, image_size, num_classes, in_channels=x.shape[1]).to(device)
    counts = torch.bincount(y, minlength=num_classes).float().clamp(min=1)
    loss_fn = torch.nn.CrossEntropyLoss(weight=(counts.sum() / (num_classes * counts)).to(device))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True, generator=gen)
    steps = real_steps(cfg, len(x)) if steps is None else steps
    model.train()
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # reshuffled each pass
    for xb, yb in itertools.islice(batches, steps):
        opt.zero_grad()
        loss_fn(model(xb.to(device)), yb.to(device)).backward()
        opt.step()
    return model.eval()


def synthetic_share(syn_x: torch.Tensor, syn_y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic images drawn without replacement (all of them when the release is smaller)."""
    idx = torch.randperm(len(syn_x), generator=torch.Generator().manual_seed(seed))[:n]
    return syn_x[idx], syn_y[idx]


def train_with_synthetic(
    mode: str, ratio: float, cfg: ClassifierConfig, real: tuple[torch.Tensor, torch.Tensor], syn: tuple[torch.Tensor, torch.Tensor],
    image_size: int, num_classes: int, seed: int, device: torch.device,
) -> tuple[torch.nn.Module, int]:
    """A classifier trained with ``round(ratio * len(real))`` synthetic images; returns it and that count."""
    (rx, ry), steps = real, real_steps(cfg, len(real[0]))
    sx, sy = synthetic_share(*syn, max(1, round(ratio * len(rx))), seed)
    if mode == "mix":
        return train_classifier(cfg, torch.cat([rx, sx]), torch.cat([ry, sy]), image_size, num_classes, seed, device, steps), len(sx)
    if mode == "pretrain_finetune":
        model = train_classifier(cfg, sx, sy, image_size, num_classes, seed, device, real_steps(cfg, len(sx)))
        return train_classifier(cfg, rx, ry, image_size, num_classes, seed, device, steps, init=model.train()), len(sx)
    raise ValueError(f"evaluation.downstream.modes: unknown mode {mode!r}")


@torch.no_grad()
def score_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Two classes: AUC, accuracy, sensitivity and specificity (positive class = 1, threshold 0.5).
    More classes: macro one-vs-rest AUC, accuracy and balanced accuracy (macro recall)."""
    probs = torch.cat([torch.softmax(model(x[i : i + 512].to(device)), 1).cpu() for i in range(0, len(x), 512)])
    k = probs.shape[1]
    if k == 2:
        p1 = probs[:, 1]
        return {
            "auc": float(binary_auroc(p1, y)),
            "accuracy": float(binary_accuracy(p1, y)),
            "sensitivity": float(binary_recall(p1, y)),
            "specificity": float(binary_specificity(p1, y)),
        }
    return {
        "auc": float(multiclass_auroc(probs, y, num_classes=k, average="macro")),
        "accuracy": float(multiclass_accuracy(probs, y, num_classes=k, average="micro")),
        "balanced_accuracy": float(multiclass_recall(probs, y, num_classes=k, average="macro")),
    }
