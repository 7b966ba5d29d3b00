"""Reading scans with SimpleITK: DICOM series, NIfTI volumes, PNG/JPEG images.

Every file's header is read before its pixels: a scan is refused (``ScanError``) when
its format does not match its name, it holds more voxels than ``source.max_voxels``,
or (DICOM) it declares another modality or burned-in annotation. Identifying DICOM
tags are read only to derive a pseudonym and are never returned, logged or stored.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
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
MODALITY_TAG = "0008|0060"
BURNED_IN_TAG = "0028|0301"  # BurnedInAnnotation: YES when text (names, dates) is part of the pixels
# DICOM Modality (0008,0060) codes each site modality accepts (PS3.3 C.7.3.1.1.1): projection
# radiography for xray. "OT" (other, e.g. secondary captures) and a missing tag name no modality.
DICOM_MODALITIES = {
    "ct": {"CT"},
    "mri": {"MR"},
    "xray": {"CR", "DX", "RG", "MG", "IO", "PX", "RF", "XA"},
}
UNDECLARED_MODALITIES = {"", "OT"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The reader a file's name promises; its contents must match (PNG bytes named .nii are refused).
IMAGE_IO = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".png": "PNGImageIO", ".jpg": "JPEGImageIO", ".jpeg": "JPEGImageIO"}
# ITU-R BT.601 luma: GDCM hands colour DICOM (RGB, YBR, palette) over as RGB.
LUMA = (0.299, 0.587, 0.114)


class ScanError(Exception):
    """A scan that must be quarantined; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def find_dicom_series(root: Path) -> tuple[list[list[Path]], list[Path]]:
    """Every DICOM series under ``root`` (files in slice order) and the files in no series.

    Symlinked folders are not followed; symlinked files are listed as found (the caller
    refuses those that resolve outside ``root``). GDCM scans a whole folder, so a folder that
    holds a symlink or anything but regular files is scanned through a shadow folder of its
    regular files inside ``root``: GDCM never opens a file outside it, a device or a FIFO."""
    series: list[list[Path]] = []
    claimed: set[Path] = set()
    all_files: list[Path] = []
    inside = Path(root).resolve()
    for folder, _dirs, files in sorted(os.walk(root)):
        names = [f for f in sorted(files) if not f.startswith(".") and not f.endswith(".csv")]
        if not names:
            continue
        paths = [Path(folder) / f for f in names]
        all_files += paths
        try:
            found = _scan_series(Path(folder), paths, inside)
        except RuntimeError:  # a folder GDCM cannot scan: its files are quarantined, not the site lost
            continue
        series += found
        claimed.update(n for names in found for n in names)
    return series, [f for f in all_files if f not in claimed]


def _regular_inside(path: Path, root: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and path.resolve().is_relative_to(root)
    except OSError:
        return False


def _scan_series(folder: Path, paths: list[Path], root: Path) -> list[list[Path]]:
    def scan(where: str) -> list[list[str]]:
        return [list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(where, sid))
                for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(where) or ()]

    if not any(p.is_symlink() or not stat.S_ISREG(os.lstat(p).st_mode) for p in paths):
        return [[Path(n) for n in names] for names in scan(str(folder))]
    with tempfile.TemporaryDirectory(prefix="fedsynth-scan-") as shadow:
        back = {}
        for p in paths:
            if _regular_inside(p, root):
                link = Path(shadow) / p.name
                link.symlink_to(p.resolve())
                back[str(link)] = p
        return [[back[n] for n in names if n in back] for names in scan(shadow)]


def read_dicom_series(files: list[Path], modality: str, max_voxels: int) -> tuple[sitk.Image, str]:
    """The series as one grey image, and its PatientID (to be pseudonymised at once).

    Each file's header is checked first: modality, burned-in annotation, voxel count."""
    voxels, pid = 0, ""
    for i, f in enumerate(files):
        header = _header(f, "GDCMImageIO")
        tag = lambda key: header.GetMetaData(key).strip() if header.HasMetaDataKey(key) else ""  # noqa: E731
        declared = tag(MODALITY_TAG).upper()
        burned_in = tag(BURNED_IN_TAG).upper()
        if burned_in == "YES":
            raise ScanError("burned_in_annotation", "BurnedInAnnotation is YES: text such as a name may be in the pixels")
        if declared == "OT" and burned_in != "NO":  # secondary captures (screenshots) carry burned-in text unless declared otherwise
            raise ScanError("burned_in_annotation", "a secondary capture (Modality OT) without BurnedInAnnotation NO")
        if declared not in UNDECLARED_MODALITIES | DICOM_MODALITIES[modality]:
            raise ScanError("modality_mismatch", f"DICOM Modality {declared}, but the site's source.modality is {modality}")
        voxels += _voxels(header)
        if i == 0:
            pid = tag(PATIENT_ID_TAG)
    _check_voxels(voxels, max_voxels)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ScanError("unreadable", first_line(exc)) from None
    return to_grey(image), pid


def read_image(path: Path, max_voxels: int) -> sitk.Image:
    """A NIfTI volume or a PNG/JPEG image (colour turned to grey), its header checked first."""
    if not path.is_file():
        raise ScanError("unreadable", "file not found")
    io = next((IMAGE_IO[s] for s in IMAGE_IO if path.name.lower().endswith(s)), None)
    if io is None:
        raise ScanError("unreadable", f"not a {'/'.join(sorted(IMAGE_IO))} file name")
    header = _header(path, io)
    _check_voxels(_voxels(header), max_voxels)
    if io == "NiftiImageIO":
        _check_nifti_finite(path)
    try:
        image = header.Execute()
    except RuntimeError as exc:
        raise ScanError("unreadable", first_line(exc)) from None
    return to_grey(image)


def to_grey(image: sitk.Image) -> sitk.Image:
    """A colour image as grey luma; grey images unchanged. Without this an RGB image's
    pixel axis would be taken for a spatial one (its rows read as slices)."""
    n = image.GetNumberOfComponentsPerPixel()
    if n == 1:
        return image
    if n < 3:  # grey + alpha
        return sitk.VectorIndexSelectionCast(image, 0, sitk.sitkFloat32)
    return sum(w * sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32) for i, w in enumerate(LUMA))


def _header(path: Path, io: str) -> sitk.ImageFileReader:
    """A reader with the file's header read (size, pixel type, tags) and no pixel data."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io)
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ScanError("unreadable", first_line(exc)) from None
    return reader


def _voxels(header: sitk.ImageFileReader) -> int:
    return math.prod(header.GetSize()) * max(1, header.GetNumberOfComponents())


def _check_voxels(voxels: int, max_voxels: int) -> None:
    # Before any pixel is decompressed: a small .nii.gz can expand to gigabytes.
    if voxels > max_voxels:
        raise ScanError("too_large", f"{voxels:,} voxels in the header, over source.max_voxels ({max_voxels:,})")


def _check_nifti_finite(path: Path) -> None:
    # SimpleITK's NIfTI reader silently turns NaN voxels into 0, so check the stored voxels.
    try:
        raw = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ValueError...
        raise ScanError("unreadable", f"{type(exc).__name__}: {first_line(exc)}") from None
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raise ScanError("non_finite", f"{int((~np.isfinite(raw)).sum())} NaN/inf voxels")


def list_scans(root: Path, kind: str) -> list[Path]:
    """Candidate scan files under ``root`` for a NIfTI or image-folder site (symlinked folders not followed)."""
    out = []
    for folder, _dirs, files in os.walk(root):
        for f in files:
            name = f.lower()
            if name.endswith(NIFTI_SUFFIXES) if kind == "nifti" else Path(name).suffix in IMAGE_SUFFIXES:
                out.append(Path(folder) / f)
    return sorted(out)


def first_line(exc: Exception) -> str:
    # SimpleITK errors are long; keep the message, drop its C++ trace.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
