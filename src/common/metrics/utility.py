"""Utility: train a downstream classifier and score it on real images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_recall, binary_specificity

from ..config import ClassifierConfig
from ..models import build_classifier
from ..runtime import seed_everything


def train_classifier(
    cfg: ClassifierConfig, x: torch.Tensor, y: torch.Tensor, image_size: int, num_classes: int, seed: int, device: torch.device
) -> torch.nn.Module:
    """Class-weighted cross-entropy, Adam, ``cfg.epochs`` epochs."""
    seed_everything(seed)
    model = build_classifier(cfg, image_size, num_classes, in_channels=x.shape[1]).to(device)
    counts = torch.bincount(y, minlength=num_classes).float().clamp(min=1)
    loss_fn = torch.nn.CrossEntropyLoss(weight=(counts.sum() / (num_classes * counts)).to(device))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True, generator=gen)
    model.train()
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb.to(device)), yb.to(device)).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def score_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, float]:
    """AUC, accuracy, sensitivity and specificity (positive class = 1) at threshold 0.5."""
    probs = torch.cat([torch.softmax(model(x[i : i + 512].to(device)), 1)[:, 1].cpu() for i in range(0, len(x), 512)])
    return {
        "auc": float(binary_auroc(probs, y)),
        "accuracy": float(binary_accuracy(probs, y)),
        "sensitivity": float(binary_recall(probs, y)),
        "specificity": float(binary_specificity(probs, y)),
    }
