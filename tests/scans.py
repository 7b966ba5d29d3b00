"""Builders for real-scan fixtures: written from ../shared/data at test time, never stored."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Planted on purpose; tests assert none of these ever reaches an output.
PHI = {
    "0010|0010": "Testpatient^Planted",
    "0010|0020": "MRN-PLANTED-0042",
    "0010|0030": "19510704",
    "0008|0080": "Planted General Hospital",
    "0008|0090": "Dr^Planted^Referrer",
    "0008|0050": "ACC-PLANTED-99",
}


def mni_path(shared_data: Path, which: str = "t1") -> Path:
    return shared_data / "mni152" / f"mni_icbm152_{which}_tal_nlin_sym_09a_converted.nii.gz"


def write_dicom_series(volume: sitk.Image, folder: Path, tags: dict[str, str], series_uid: str) -> None:
    """Write a 3D image as one DICOM file per axial slice (SimpleITK's documented recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = sitk.Cast(volume, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = vol.GetDirection()
    common = {
        **tags,
        "0008|0060": "MR",
        "0020|000d": series_uid + ".1",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(map(str, (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))),
        "0018|0050": str(vol.GetSpacing()[2]),
    }
    for i in range(vol.GetDepth()):
        sl = vol[:, :, i]
        for k, v in common.items():
            sl.SetMetaData(k, v)
        sl.SetMetaData("0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, i)))))
        sl.SetMetaData("0020|0013", str(i))
        sl.SetMetaData("0008|0018", f"{series_uid}.{i + 100}")
        writer.SetFileName(str(folder / f"slice_{i:04d}.dcm"))
        writer.Execute(sl)


def write_xray_dicoms(images: np.ndarray, labels: np.ndarray, folder: Path, patients: int = 40) -> Path:
    """2D X-ray DICOM files (one image each, several per patient) plus labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        im = sitk.GetImageFromArray(img.astype(np.uint8))
        p = i % patients
        tags = {**PHI, "0010|0020": f"{PHI['0010|0020']}-{p}", "0010|0010": f"{PHI['0010|0010']}{p}",
                "0008|0060": "DX", "0020|000e": f"1.2.826.0.1.3680043.9.7133.{i + 1}", "0020|000d": f"1.2.826.0.1.3680043.9.7133.{p}.0"}
        for k, v in tags.items():
            im.SetMetaData(k, v)
        name = f"img_{i:05d}.dcm"
        sitk.WriteImage(im, str(folder / name))
        rows.append({"path": name, "label": int(y)})
    csv_path = folder / "labels.csv"
    write_csv(csv_path, rows)
    return csv_path


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def site_yaml(path: Path, name: str, source: str, role: str = "train", extra: str = "") -> Path:
    text = f"name: {name}\nrole: {role}\nsource: {source}\nstate_dir: {path.parent / ('state_' + name)}\n{extra}"
    if role == "train":
        text += "privacy: {epsilon: 8.0, delta: 1.0e-5}\n"
    path.write_text(text)
    return path


def all_bytes_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())
