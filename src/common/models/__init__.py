"""Networks: the DDPM generator and the downstream classifier (both MONAI)."""

from . import dp_layers  # noqa: F401 - registers Opacus per-sample gradients for every layer we use
from .classifier import build_classifier
from .diffusion import build_unet, noise_prediction_loss, sample, train_scheduler

__all__ = ["build_classifier", "build_unet", "noise_prediction_loss", "sample", "train_scheduler"]
