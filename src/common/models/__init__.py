"""Networks: the DDPM generator and the downstream classifier (both MONAI)."""

from .classifier import build_classifier
from .diffusion import build_unet, noise_prediction_loss, sample, train_scheduler

__all__ = ["build_classifier", "build_unet", "noise_prediction_loss", "sample", "train_scheduler"]
