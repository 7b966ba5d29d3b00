"""A hospital's scans -> model-ready slices, with de-identification, cache and quarantine.

Every scan ends either in the result or in ``quarantine.json`` with a reason, whatever
went wrong with it; nothing valid is dropped silently. The cache (``ingest_cache/``)
holds arrays and a manifest of source hashes and parameters, never a patient identifier
or a file name: patients appear only as keyed pseudonyms and files as keyed path names
(:mod:`.pseudonym`). Every file the site state holds is the owner's alone (0600 in 0700
folders). Threat model and defences: docs/ingestion.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from ..config import ConfigError, SiteConfig, site_path, site_state_dir
from ..runtime import sha256_file
from .medmnist import DataError
from .preprocess import normalise, same_geometry, scan_to_slices, standardise
from .pseudonym import UNKNOWN_PATIENT, Pseudonymiser
from .readers import ScanError, first_line, find_dicom_series, list_scans, read_dicom_series, read_image

CACHE_VERSION = 3  # 3: manifest keyed by keyed path names (was: file paths)


@dataclass
class Scan:
    key: str  # path relative to the site root: how the hospital finds the file again (never written down)
    files: list[list[Path]]  # per channel: the file(s) of that channel
    mask: Path | None = None
    label: str | None = None  # the CSV's label text; None: no row names the scan
    patient: str = ""  # raw identifier; pseudonymised before anything is stored
    problem: tuple[str, str] | None = None  # (reason, detail) found before reading: quarantined first


@dataclass
class IngestResult:
    images: np.ndarray  # (N, C, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    patients: list[str]  # pseudonym per slice
    masks: np.ndarray | None  # (N, 1, S, S) uint8 when any scan has a mask; zeros where has_mask is False
    has_mask: np.ndarray  # (N,) bool
    # {"key", "path", "reason", "detail"} per quarantined scan. "path" stays in memory:
    # quarantine.json holds the keyed name only (see quarantined()).
    quarantine: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def read_labels(site: SiteConfig) -> tuple[dict[str, dict], Path]:
    path = site_path(site, site.source.labels_csv)
    if not path.is_file():
        raise ConfigError(f"{site.origin}: source.labels_csv: {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a UTF-8 CSV file ({exc})") from None
    needed = {"label", *site.source.channels} | ({site.source.mask_column} if site.source.mask_column else set())
    missing = needed - set(rows[0].keys() if rows else ())
    if missing:
        raise ConfigError(f"{path}: missing column(s) {sorted(missing)} (source.channels / mask_column in {site.origin})")
    return {_cell(r, site.source.channels[0]): r for r in rows}, path


def _cell(row: dict, column: str | None) -> str:
    return str(row.get(column) or "").strip() if column else ""  # a short row has None cells


def _label(text: str | None, num_classes: int | None, labels_csv: str) -> int:
    """The scan's class, or ScanError: training would fail later on a label outside [0, num_classes)."""
    if not text:
        raise ScanError("label_missing", f"no row, or an empty label, in {labels_csv}")
    try:
        label = int(text)
    except ValueError:
        # The value is not echoed: a shifted column can put an MRN or a name here.
        raise ScanError("invalid_label", "label is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        allowed = f"0..{num_classes - 1} (model.num_classes {num_classes})" if num_classes else "0 or more"
        raise ScanError("invalid_label", f"label outside {allowed}")
    return label


def _inside(root: Path, path: Path) -> Path | None:
    """``path`` with every symlink and '..' resolved, or None when that leaves ``root`` (resolved)
    or cannot be resolved (a symlink loop)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return None
    return resolved if resolved.is_relative_to(root) else None


OUTSIDE = "outside_root"


def discover(site: SiteConfig, root: Path, rows: dict[str, dict]) -> tuple[list[Scan], list[dict]]:
    """Scans to ingest, plus files already known to be bad (unreadable DICOM)."""
    src, bad = site.source, []
    real_root = root.resolve()
    scans: list[Scan] = []
    if src.kind == "dicom":
        series, stray = find_dicom_series(root)
        for p in stray:
            reason = "unreadable" if _inside(real_root, p) else OUTSIDE
            bad.append({"path": str(p.relative_to(root)), "reason": reason, "detail": "not a readable DICOM file" if reason == "unreadable"
                        else "a symlink that leaves source.root (or loops)"})
        for files in series:
            rel_file, rel_dir = str(files[0].relative_to(root)), str(files[0].parent.relative_to(root))
            row = rows.get(rel_file) or rows.get(rel_dir)
            key = rel_file if rel_file in rows or len(files) == 1 else rel_dir
            resolved = [_inside(real_root, f) for f in files]
            problem = (OUTSIDE, "a file of the series resolves outside source.root") if None in resolved else None
            scans.append(Scan(key, [resolved if problem is None else files], label=_cell(row, "label") if row else None, problem=problem))
        return scans, bad
    listed = set()
    for key, row in rows.items():
        named = [_cell(row, c) for c in src.channels] + ([_cell(row, src.mask_column)] if _cell(row, src.mask_column) else [])
        # Absolute paths, '..' and symlinks are all resolved, then must stay under the resolved root.
        resolved = [_inside(real_root, root / n) for n in named]
        problem = None
        if None in resolved:
            problem = (OUTSIDE, "a file the row names resolves outside source.root (absolute path, '..' or a symlink)")
            resolved = [root / n for n in named]  # never opened: the scan is quarantined first
        listed.update([str(p) for p in resolved] + [str(root / n) for n in named])
        chans, mask = [[p] for p in resolved[: len(src.channels)]], (resolved[-1] if len(named) > len(src.channels) else None)
        scans.append(Scan(key, chans, mask, _cell(row, "label"), _cell(row, src.patient_column), problem))
    # A scan on disk that the CSV does not name has no label: quarantine, do not drop.
    for p in list_scans(root, src.kind):
        real = _inside(real_root, p)
        if str(p) in listed or str(real) in listed:
            continue
        if real is None:
            scans.append(Scan(str(p.relative_to(root)), [[p]], problem=(OUTSIDE, "a symlink that leaves source.root (or loops)")))
        else:
            scans.append(Scan(str(p.relative_to(root)), [[real]], label=None))
    return scans, bad


def _params_hash(site: SiteConfig, image_size: int) -> str:
    s = site.source
    params = {"v": CACHE_VERSION, "size": image_size, "kind": s.kind, "modality": s.modality, "channels": s.channels,
              "mask": s.mask_column, "max_voxels": s.max_voxels, "pre": asdict(s.preprocess)}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _process(scan: Scan, site: SiteConfig, image_size: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Read, check and preprocess one scan; raises ScanError to quarantine it."""
    src = site.source
    pre, raw_pid, arrays, ref = src.preprocess, scan.patient, [], None
    for files in scan.files:
        if src.kind == "dicom":
            image, raw_pid = read_dicom_series(files, src.modality, src.max_voxels)
        else:
            image = read_image(files[0], src.max_voxels)
        image = standardise(image, pre)
        if ref is not None and not same_geometry(ref, image):
            raise ScanError("mask_geometry_mismatch", "channels differ in geometry")
        ref = image
        arrays.append(normalise(sitk.GetArrayFromImage(image), src.modality, pre))
    mask = None
    if scan.mask is not None:
        raw_mask = read_image(scan.mask, src.max_voxels)
        m = standardise(raw_mask, pre, is_mask=True)
        if not same_geometry(ref, m):
            raise ScanError("mask_geometry_mismatch", f"mask {m.GetSize()} vs image {ref.GetSize()}")
        mask = sitk.GetArrayFromImage(m) > pre.mask_threshold
    images, masks = scan_to_slices(arrays, mask, pre, image_size)
    return images, masks, raw_pid


# --------------------------------------------------------------- private site state
def _private_dir(path: Path) -> Path:
    """Create ``path`` owner-only (0700), or make an existing one so: it holds patient images."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create or make private (chmod 700) the site state folder: {exc.strerror}") from None
    return path


def _write_private(path: Path, write) -> None:
    """Atomically write ``path`` as 0600: ``write(f)`` fills a temporary file that replaces it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover tmp file keeps its old mode under O_CREAT
    with os.fdopen(fd, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path: Path, data) -> None:
    _write_private(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def _read_manifest(path: Path, cache_dir: Path) -> dict:
    """The cache manifest, or a one-line error naming what to do when it is not one."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        ok = isinstance(data, dict) and isinstance(data.get("entries", {}), dict) and all(
            isinstance(e, dict) and {"sha256", "patient", "label", "slices"} <= e.keys() for e in data.get("entries", {}).values())
        if not ok:
            raise ValueError("not an ingestion manifest")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: ingestion cache manifest is corrupt ({str(exc)[:120]}); delete the folder {cache_dir} "
                        "and rerun: the cache is rebuilt from the scans, nothing is lost") from None
    return data


def _scrub(text: str, scan: Scan, root: Path) -> str:
    """An error message without the file's name or path (readers' messages quote it)."""
    names = {str(root), str(root.resolve()), scan.key}
    for f in [p for ch in scan.files for p in ch] + ([scan.mask] if scan.mask else []):
        names |= {str(f), f.name}
    for name in sorted((n for n in names if len(n) > 2), key=len, reverse=True):
        text = text.replace(name, "<file>")
    return text[:300]


# --------------------------------------------------------------- ingestion
def ingest_site(site: SiteConfig, image_size: int, progress: bool = True, num_classes: int | None = None) -> IngestResult:
    """Ingest (or reuse the cache of) a DICOM, NIfTI or image-folder site.

    ``num_classes`` (the model's): labels outside [0, num_classes) are quarantined; without it,
    only negative and non-integer labels are."""
    start = time.time()
    root = site_path(site, site.source.root)
    if not root.is_dir():
        raise ConfigError(f"{site.origin}: source.root: {root} is not a folder")
    rows, _ = read_labels(site)
    state = _private_dir(site_state_dir(site))
    pseudonymise = Pseudonymiser(state / "pseudonym.key")
    cache_dir = _private_dir(state / "ingest_cache")
    manifest_path = cache_dir / "manifest.json"
    old = _read_manifest(manifest_path, cache_dir)
    params = _params_hash(site, image_size)
    entries = old.get("entries", {}) if old.get("params") == params else {}
    new_entries: dict[str, dict] = {}

    scans, quarantine = discover(site, root, rows)
    for q in quarantine:
        q["key"] = pseudonymise.path_key(q["path"])
    seen: dict[str, str] = {}
    images, labels, patients, masks, reused = [], [], [], [], 0
    for scan in tqdm(scans, desc=f"ingest {site.name}", unit="scan", disable=not progress):
        key = pseudonymise.path_key(scan.key)
        try:
            if scan.problem:
                raise ScanError(*scan.problem)
            files = [f for ch in scan.files for f in ch] + ([scan.mask] if scan.mask else [])
            if not all(f.is_file() for f in files):  # also refuses FIFOs and devices, which never end
                raise ScanError("unreadable", "file not found (or not a regular file)")
            digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
            if digest in seen:
                raise ScanError("duplicate", f"same content as {seen[digest]}")
            seen[digest] = key
            label = _label(scan.label, num_classes, site.source.labels_csv)
            cached = entries.get(key)
            arrays_path = cache_dir / f"{digest[:32]}.npz"
            img = None
            if cached and cached["sha256"] == digest and arrays_path.exists():
                try:
                    with np.load(arrays_path) as z:
                        img, msk = z["images"], (z["masks"] if "masks" in z else None)
                    pid = cached["patient"]
                    os.chmod(arrays_path, 0o600)  # arrays cached by an older version were world-readable
                    reused += 1
                except Exception:  # a damaged cached array is rebuilt from the scan, not quarantined
                    img = None
            if img is None:
                img, msk, raw_pid = _process(scan, site, image_size)
                # No patient id: the scan is its own privacy unit, and says so (a patient with several
                # such scans is several units; docs/privacy.md).
                pid = pseudonymise(raw_pid) if raw_pid else UNKNOWN_PATIENT + pseudonymise(scan.key)
                del raw_pid
                _write_private(arrays_path, lambda f: np.savez_compressed(f, images=img, **({"masks": msk} if msk is not None else {})))
            new_entries[key] = {"sha256": digest, "patient": pid, "label": label, "slices": len(img)}
        except Exception as exc:  # noqa: BLE001 - one bad scan, whatever the error, must not cost the site its run
            reason, detail = (exc.reason, exc.detail) if isinstance(exc, ScanError) else ("unexpected_error", f"{type(exc).__name__}: {first_line(exc)}")
            quarantine.append({"key": key, "path": scan.key, "reason": reason, "detail": _scrub(detail, scan, root)})
            continue
        images.append(img)
        labels += [label] * len(img)
        patients += [pid] * len(img)
        masks.append(msk)

    _write_json(manifest_path, {"params": params, "entries": new_entries})
    for stale in set(p.name for p in cache_dir.glob("*.npz")) - {f"{e['sha256'][:32]}.npz" for e in new_entries.values()}:
        (cache_dir / stale).unlink()
    # On disk: keyed names only (quarantined() gives the operator the paths back).
    _write_json(state / "quarantine.json", {"site": site.name, "quarantined": [{k: q[k] for k in ("key", "reason", "detail")} for q in quarantine]})
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


# --------------------------------------------------------------- the operator's look-up
def path_key(site: SiteConfig, path: str | os.PathLike) -> str:
    """The keyed name under which a scan appears in ``manifest.json`` and ``quarantine.json``:
    ``path`` as the labels CSV names it (relative to ``source.root``; for DICOM, the file or the
    series folder), or an absolute path inside the root."""
    root = site_path(site, site.source.root)
    p = Path(path)
    rel = str(p.relative_to(root)) if p.is_absolute() and p.is_relative_to(root) else str(path)
    return Pseudonymiser(site_state_dir(site) / "pseudonym.key").path_key(rel)


def quarantined(site: SiteConfig) -> list[dict]:
    """The site's ``quarantine.json`` with each keyed name matched back to its path under
    ``source.root`` (for the operator's eyes: print it, do not store it in a shared place)."""
    state = site_state_dir(site)
    path = state / "quarantine.json"
    if not path.is_file():
        raise DataError(f"{path}: no quarantine file; run `fedsynth ingest {site.origin}` first")
    try:
        entries = json.loads(path.read_text())["quarantined"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a quarantine file; rerun `fedsynth ingest {site.origin}` to rewrite it") from None
    root = site_path(site, site.source.root)
    pseudonymise = Pseudonymiser(state / "pseudonym.key")
    scans, bad = discover(site, root, read_labels(site)[0])
    paths = {pseudonymise.path_key(p): p for p in [s.key for s in scans] + [b["path"] for b in bad]}
    out = []
    for e in entries:
        detail = e["detail"]
        for k in set(paths) & set(detail.split()):  # "same content as <key>" names the other file
            detail = detail.replace(k, paths[k])
        out.append({**e, "path": paths.get(e["key"], "(no longer under source.root)"), "detail": detail})
    return out
