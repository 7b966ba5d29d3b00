"""Scan -> model-ready 2D slices: reorient, resample, normalise by modality, slice, resize.

Images are resampled with linear interpolation and masks with nearest neighbour
onto the same grid, so they stay aligned. Intensities end in [0, 1]:

* CT: HU window (centre, width) -> [0, 1]; a volume mostly above the window is not HU;
* MRI: clip to percentiles, z-score, then z in [-3, 3] -> [0, 1];
* X-ray: percentile min-max -> [0, 1].
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.transforms import NormalizeIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

from ..config import PreprocessConfig
from .readers import ScanError

# A "CT" with more of its voxels above the window's top than this is quarantined (modality_mismatch).
CT_MAX_ABOVE_WINDOW = 0.5


def standardise(image: sitk.Image, cfg: PreprocessConfig, is_mask: bool = False) -> sitk.Image:
    """Reorient (3D) and resample to ``cfg.spacing``."""
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]
    if image.GetDimension() not in (2, 3):
        raise ScanError("wrong_dimensionality", f"{image.GetDimension()}D image; expected 2D or 3D")
    if image.GetDimension() == 3:
        image = sitk.DICOMOrient(image, cfg.orientation)
    if cfg.spacing:
        spacing = tuple(float(s) for s in cfg.spacing[: image.GetDimension()])
        if len(spacing) < image.GetDimension():
            spacing = spacing + tuple(image.GetSpacing()[len(spacing):])
        size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
        interp = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
        # Masks keep their pixel type (thresholded later); images are resampled as float.
        image = sitk.Resample(image, size, sitk.Transform(), interp, image.GetOrigin(), spacing, image.GetDirection(), 0.0,
                              image.GetPixelID() if is_mask else sitk.sitkFloat32)
    return image


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def normalise(array: np.ndarray, modality: str, cfg: PreprocessConfig) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ScanError("non_finite", f"{int((~np.isfinite(array)).sum())} NaN/inf voxels")
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise ScanError("empty_or_constant", "no intensity variation")
    x = torch.from_numpy(array.astype(np.float32))[None]
    lo, hi = cfg.percentiles
    if modality == "ct":
        c, w = cfg.ct_window
        # Most of a CT lies below any clinical window's top (air, fat, soft tissue); most of an MR
        # or X-ray image in scanner units lies above it and would saturate to white.
        above = float((array > c + w / 2).mean())
        if above > CT_MAX_ABOVE_WINDOW:
            raise ScanError("modality_mismatch", f"{above:.0%} of voxels above the CT window: not Hounsfield units "
                            "(an MR or X-ray image in a CT site?)")
        out = ScaleIntensityRange(a_min=c - w / 2, a_max=c + w / 2, b_min=0.0, b_max=1.0, clip=True)(x)
    elif modality == "mri":
        clipped = torch.clamp(x, float(np.percentile(array, lo)), float(np.percentile(array, hi)))
        z = NormalizeIntensity()(clipped)
        out = ((torch.as_tensor(z) + 3.0) / 6.0).clamp(0, 1)
    else:
        out = ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)(x)
    return torch.as_tensor(out)[0].numpy().astype(np.float32)


def to_square(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): pad to square with each image's background
    (its minimum: air after any of the normalisations), then resize."""
    h, w = x.shape[-2:]
    m = max(h, w)
    low = x.amin(dim=(-2, -1), keepdim=True)
    x = F.pad(x - low, ((m - w) // 2, m - w - (m - w) // 2, (m - h) // 2, m - h - (m - h) // 2)) + low
    if m == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")  # pixel centres, as bilinear
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def scan_to_slices(
    channels: list[np.ndarray], mask: np.ndarray | None, cfg: PreprocessConfig, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised channel arrays ((Z,)Y,X each) -> informative slices (N, C, size, size)."""
    vol = np.stack(channels)  # (C, Z, Y, X) or (C, Y, X)
    if vol.ndim == 3:
        vol = vol[:, None]
        mask = None if mask is None else mask[None]
    # Foreground is measured above the volume's own background (its minimum), since
    # MRI z-scoring maps air to ~0.35 rather than 0.
    lo, hi = float(vol.min()), float(vol.max())
    level = lo + cfg.foreground_level * (hi - lo)
    keep = []
    for z in range(vol.shape[1]):
        fg = float((vol[:, z] > level).mean())
        if fg >= cfg.min_foreground or (mask is not None and mask[z].any()):
            keep.append(z)
    if not keep:
        raise ScanError("empty_or_constant", "no informative slice (too little foreground)")
    images = to_square(torch.from_numpy(vol[:, keep]).permute(1, 0, 2, 3).float(), size, "bilinear").numpy()
    masks = None
    if mask is not None:
        masks = to_square(torch.from_numpy(mask[keep][:, None].astype(np.float32)), size, "nearest").numpy().astype(np.uint8)
    return images.astype(np.float32), masks
