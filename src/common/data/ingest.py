"""A hospital's scans -> model-ready slices, with de-identification, cache and quarantine.

Every scan ends either in the result or in ``quarantine.json`` with a reason;
nothing valid is dropped silently. The cache (``ingest_cache/``) holds arrays and
a manifest of source hashes and parameters, never a patient identifier: patients
appear only as keyed pseudonyms (:mod:`.pseudonym`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from ..config import ConfigError, SiteConfig, site_path, site_state_dir
from ..runtime import sha256_file, write_json
from .medmnist import DataError
from .preprocess import normalise, same_geometry, scan_to_slices, standardise
from .pseudonym import UNKNOWN_PATIENT, Pseudonymiser
from .readers import ScanError, find_dicom_series, list_scans, read_dicom_series, read_image

CACHE_VERSION = 2  # 2: scans without a patient id are their own privacy unit, marked 'scan-'


@dataclass
class Scan:
    key: str  # path relative to the site root: how the hospital finds the file again
    files: list[list[Path]]  # per channel: the file(s) of that channel
    mask: Path | None = None
    label: int | None = None
    patient: str = ""  # raw identifier; pseudonymised before anything is stored


@dataclass
class IngestResult:
    images: np.ndarray  # (N, C, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    patients: list[str]  # pseudonym per slice
    masks: np.ndarray | None  # (N, 1, S, S) uint8 when any scan has a mask; zeros where has_mask is False
    has_mask: np.ndarray  # (N,) bool
    quarantine: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def read_labels(site: SiteConfig) -> tuple[dict[str, dict], Path]:
    path = site_path(site, site.source.labels_csv)
    if not path.is_file():
        raise ConfigError(f"{site.origin}: source.labels_csv: {path} not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"label", *site.source.channels} | ({site.source.mask_column} if site.source.mask_column else set())
    missing = needed - set(rows[0].keys() if rows else ())
    if missing:
        raise ConfigError(f"{path}: missing column(s) {sorted(missing)} (source.channels / mask_column in {site.origin})")
    return {r[site.source.channels[0]].strip(): r for r in rows}, path


def _label(row: dict | None) -> int | None:
    try:
        return int(str(row["label"]).strip()) if row else None
    except ValueError:
        return None


def discover(site: SiteConfig, root: Path, rows: dict[str, dict]) -> tuple[list[Scan], list[dict]]:
    """Scans to ingest, plus files already known to be bad (unreadable DICOM)."""
    src, bad = site.source, []
    scans: list[Scan] = []
    if src.kind == "dicom":
        series, stray = find_dicom_series(root)
        bad += [{"path": str(p.relative_to(root)), "reason": "unreadable", "detail": "not a readable DICOM file"} for p in stray]
        for files in series:
            rel_file, rel_dir = str(files[0].relative_to(root)), str(files[0].parent.relative_to(root))
            row = rows.get(rel_file) or rows.get(rel_dir)
            key = rel_file if rel_file in rows or len(files) == 1 else rel_dir
            scans.append(Scan(key, [files], label=_label(row)))
        return scans, bad
    listed = set()
    for key, row in rows.items():
        chans = [[root / row[c].strip()] for c in src.channels]
        listed.update(str(p[0].resolve()) for p in chans)
        mask = root / row[src.mask_column].strip() if src.mask_column and row.get(src.mask_column, "").strip() else None
        if mask is not None:
            listed.add(str(mask.resolve()))
        patient = row.get(src.patient_column, "").strip() if src.patient_column else ""
        scans.append(Scan(key, chans, mask, _label(row), patient))
    # A scan on disk that the CSV does not name has no label: quarantine, do not drop.
    for p in list_scans(root, src.kind):
        if str(p.resolve()) not in listed:
            scans.append(Scan(str(p.relative_to(root)), [[p]], label=None))
    return scans, bad


def _params_hash(site: SiteConfig, image_size: int) -> str:
    s = site.source
    params = {"v": CACHE_VERSION, "size": image_size, "kind": s.kind, "modality": s.modality, "channels": s.channels,
              "mask": s.mask_column, "pre": asdict(s.preprocess)}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _process(scan: Scan, site: SiteConfig, image_size: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Read, check and preprocess one scan; raises ScanError to quarantine it."""
    pre, raw_pid, arrays, ref = site.source.preprocess, scan.patient, [], None
    for files in scan.files:
        if site.source.kind == "dicom":
            image, raw_pid = read_dicom_series(files)
        else:
            image = read_image(files[0])
        image = standardise(image, pre)
        if ref is not None and not same_geometry(ref, image):
            raise ScanError("mask_geometry_mismatch", "channels differ in geometry")
        ref = image
        arrays.append(normalise(sitk.GetArrayFromImage(image), site.source.modality, pre))
    mask = None
    if scan.mask is not None:
        raw_mask = read_image(scan.mask)
        m = standardise(raw_mask, pre, is_mask=True)
        if not same_geometry(ref, m):
            raise ScanError("mask_geometry_mismatch", f"mask {m.GetSize()} vs image {ref.GetSize()}")
        mask = sitk.GetArrayFromImage(m) > pre.mask_threshold
    images, masks = scan_to_slices(arrays, mask, pre, image_size)
    return images, masks, raw_pid


def ingest_site(site: SiteConfig, image_size: int, progress: bool = True) -> IngestResult:
    """Ingest (or reuse the cache of) a DICOM, NIfTI or image-folder site."""
    start = time.time()
    root = site_path(site, site.source.root)
    if not root.is_dir():
        raise ConfigError(f"{site.origin}: source.root: {root} is not a folder")
    rows, _ = read_labels(site)
    state = site_state_dir(site)
    pseudonymise = Pseudonymiser(state / "pseudonym.key")
    cache_dir = state / "ingest_cache"
    manifest_path = cache_dir / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    params = _params_hash(site, image_size)
    entries = old.get("entries", {}) if old.get("params") == params else {}
    new_entries: dict[str, dict] = {}

    scans, quarantine = discover(site, root, rows)
    seen: dict[str, str] = {}
    images, labels, patients, masks, reused = [], [], [], [], 0
    for scan in tqdm(scans, desc=f"ingest {site.name}", unit="scan", disable=not progress):
        try:
            files = [f for ch in scan.files for f in ch] + ([scan.mask] if scan.mask else [])
            if not all(f.is_file() for f in files):
                raise ScanError("unreadable", "file not found")
            digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
            if digest in seen:
                raise ScanError("duplicate", f"same content as {seen[digest]}")
            seen[digest] = scan.key
            if scan.label is None:
                raise ScanError("label_missing", f"no valid label for {scan.key} in {site.source.labels_csv}")
            cached = entries.get(scan.key)
            arrays_path = cache_dir / f"{digest[:32]}.npz"
            if cached and cached["sha256"] == digest and arrays_path.exists():
                with np.load(arrays_path) as z:
                    img, msk = z["images"], (z["masks"] if "masks" in z else None)
                pid = cached["patient"]
                reused += 1
            else:
                img, msk, raw_pid = _process(scan, site, image_size)
                # No patient id: the scan is its own privacy unit, and says so (a patient with several
                # such scans is several units; docs/privacy.md).
                pid = pseudonymise(raw_pid) if raw_pid else UNKNOWN_PATIENT + pseudonymise(scan.key)
                del raw_pid
                cache_dir.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(arrays_path, images=img, **({"masks": msk} if msk is not None else {}))
            new_entries[scan.key] = {"sha256": digest, "patient": pid, "label": scan.label, "slices": len(img)}
        except ScanError as exc:
            quarantine.append({"path": scan.key, "reason": exc.reason, "detail": exc.detail})
            continue
        images.append(img)
        labels += [scan.label] * len(img)
        patients += [pid] * len(img)
        masks.append(msk)

    write_json(manifest_path, {"params": params, "entries": new_entries})
    for stale in set(p.name for p in cache_dir.glob("*.npz")) - {f"{e['sha256'][:32]}.npz" for e in new_entries.values()}:
        (cache_dir / stale).unlink()
    write_json(state / "quarantine.json", {"site": site.name, "quarantined": quarantine})
    if not images:
        reasons = Counter(q["reason"] for q in quarantine)
        raise DataError(f"site {site.name}: no valid scan in {root}; quarantined {dict(reasons)} (see {state / 'quarantine.json'})")
    has_mask = np.concatenate([np.full(len(i), m is not None) for i, m in zip(images, masks)])
    all_masks = None
    if has_mask.any():
        all_masks = np.concatenate([m if m is not None else np.zeros((len(i), 1, *i.shape[-2:]), np.uint8) for i, m in zip(images, masks)])
    per_patient = Counter(patients)
    summary = {
        "site": site.name,
        "scans": len(new_entries),
        "slices": len(labels),
        "images_per_label": dict(sorted(Counter(labels).items())),
        "patients": len(per_patient),
        "slices_per_patient": {"min": min(per_patient.values()), "median": float(np.median(list(per_patient.values()))), "max": max(per_patient.values())},
        "quarantined": len(quarantine),
        "quarantine_reasons": dict(Counter(q["reason"] for q in quarantine)),
        "reused_from_cache": reused,
        "seconds": time.time() - start,
    }
    return IngestResult(np.concatenate(images), np.asarray(labels, dtype=np.int64), patients, all_masks, has_mask, quarantine, summary)
