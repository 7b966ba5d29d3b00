"""Downstream diagnostic classifier: a small MONAI residual CNN."""

from __future__ import annotations

from monai.networks.nets import Classifier

from ..config import ClassifierConfig


def build_classifier(cfg: ClassifierConfig, image_size: int, num_classes: int, in_channels: int = 1) -> Classifier:
    return Classifier(
        in_shape=(in_channels, image_size, image_size),
        classes=num_classes,
        channels=tuple(cfg.channels),
        strides=(2,) * len(cfg.channels),
        num_res_units=1,
        dropout=0.1,
    )
