"""Reading scans with SimpleITK: DICOM series, NIfTI volumes, PNG/JPEG images.

Identifying DICOM tags are read only to derive a pseudonym and are never
returned, logged or stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# DICOM attributes that identify a patient (PS3.15 Annex E basic profile, the ones
# our tests plant and check). Only PatientID is read, to make a keyed pseudonym.
PHI_TAGS = {
    "0010|0010": "PatientName",
    "0010|0020": "PatientID",
    "0010|0030": "PatientBirthDate",
    "0010|1000": "OtherPatientIDs",
    "0008|0020": "StudyDate",
    "0008|0050": "AccessionNumber",
    "0008|0080": "InstitutionName",
    "0008|0090": "ReferringPhysicianName",
    "0020|0010": "StudyID",
}
PATIENT_ID_TAG = "0010|0020"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ScanError(Exception):
    """A scan that must be quarantined; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def find_dicom_series(root: Path) -> tuple[list[list[Path]], list[Path]]:
    """Every DICOM series under ``root`` (files in slice order) and the files in no series."""
    series: list[list[Path]] = []
    claimed: set[Path] = set()
    all_files: list[Path] = []
    for folder, _dirs, files in sorted(os.walk(root)):
        if not files:
            continue
        all_files += [Path(folder) / f for f in sorted(files) if not f.startswith(".") and not f.endswith(".csv")]
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
            names = [Path(n) for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)]
            series.append(names)
            claimed.update(names)
    return series, [f for f in all_files if f not in claimed]


def read_dicom_series(files: list[Path]) -> tuple[sitk.Image, str]:
    """The series as one image, and its PatientID (to be pseudonymised at once)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ScanError("unreadable", _first_line(exc)) from None
    pid = reader.GetMetaData(0, PATIENT_ID_TAG).strip() if reader.HasMetaDataKey(0, PATIENT_ID_TAG) else ""
    return image, pid


def read_image(path: Path) -> sitk.Image:
    """A NIfTI volume or a PNG/JPEG image (colour averaged to grey)."""
    if not path.is_file():
        raise ScanError("unreadable", "file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ScanError("unreadable", _first_line(exc)) from None
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        _check_nifti_finite(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        comps = [sitk.Cast(sitk.VectorIndexSelectionCast(image, i), sitk.sitkFloat32) for i in range(min(3, image.GetNumberOfComponentsPerPixel()))]
        image = sum(comps[1:], comps[0]) / len(comps)
    return image


def _check_nifti_finite(path: Path) -> None:
    # SimpleITK's NIfTI reader silently turns NaN voxels into 0, so check the stored voxels.
    raw = np.asanyarray(nib.load(str(path)).dataobj)
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raise ScanError("non_finite", f"{int((~np.isfinite(raw)).sum())} NaN/inf voxels")


def list_scans(root: Path, kind: str) -> list[Path]:
    """Candidate scan files under ``root`` for a NIfTI or image-folder site."""
    out = []
    for p in sorted(root.rglob("*")):
        name = p.name.lower()
        if p.is_file() and (name.endswith(NIFTI_SUFFIXES) if kind == "nifti" else p.suffix.lower() in IMAGE_SUFFIXES):
            out.append(p)
    return out


def _first_line(exc: Exception) -> str:
    # SimpleITK errors are long; keep the message, drop its C++ trace.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__

