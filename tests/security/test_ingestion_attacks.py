"""Issue 12, items 8-12: each attack on (or mistake in) a hospital's scan folder, replayed on real files.

Real files: DICOM from pydicom's test set (edited with pydicom where an attack needs a tag),
NIfTI written with nibabel / SimpleITK from the MNI152 template or from DICOM pixels, PNG
chest X-rays from PneumoniaMNIST. Threat model and what each defence does not stop:
docs/ingestion.md.
"""

import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import common.data.ingest as ingest_mod
import common.data.readers as readers_mod
from common.config import load_site, site_state_dir
from common.data.ingest import ingest_site, path_key, quarantined
from common.data.medmnist import DataError, load_splits

from ..scans import all_bytes_under, mni_path, site_yaml, write_csv


# ------------------------------------------------------------------ builders
@pytest.fixture(scope="module")
def xrays(shared_data):
    x, y = load_splits(shared_data / "medmnist" / "pneumoniamnist.npz", ["test"])
    return x[:8], y[:8]


@pytest.fixture(scope="module")
def mri_volume(shared_data):
    t1 = sitk.ReadImage(str(mni_path(shared_data, "t1")))
    return sitk.Resample(t1, [40, 46, 38], sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), [5.0] * 3, t1.GetDirection())


def write_png(x, path):
    sitk.WriteImage(sitk.GetImageFromArray(x), str(path))


def make_site(tmp_path, kind, rows, modality="xray", extra="", name="site"):
    root = tmp_path / "scans"
    root.mkdir(exist_ok=True)
    write_csv(root / "labels.csv", rows)
    src = f"{{kind: {kind}, root: {root}, labels_csv: {root / 'labels.csv'}, modality: {modality}{extra}}}"
    return load_site(site_yaml(tmp_path / f"{name}.yaml", name, src))


def reasons(res):
    return {q["path"]: q["reason"] for q in res.quarantine}


def hu(ds):
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# ------------------------------------------- 8. one bad file must not abort a site
def test_png_bytes_named_nii_are_quarantined_and_the_valid_scans_kept(tmp_path, mri_volume, xrays):
    root = tmp_path / "scans"
    root.mkdir()
    sitk.WriteImage(mri_volume, str(root / "good.nii.gz"))
    write_png(xrays[0][0], root / "xray.png")
    shutil.copy(root / "xray.png", root / "not_a_volume.nii")  # crashed nibabel (ImageFileError) before
    site = make_site(tmp_path, "nifti", [{"path": "good.nii.gz", "label": 0}, {"path": "not_a_volume.nii", "label": 1}], "mri")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"not_a_volume.nii": "unreadable"}
    assert "not recognized as a NIFTI file" in res.quarantine[0]["detail"]
    assert res.summary["scans"] == 1 and len(res.images) > 5
    on_disk = json.loads((site_state_dir(site) / "quarantine.json").read_text())["quarantined"]
    assert [q["reason"] for q in on_disk] == ["unreadable"]


def test_any_error_in_one_scan_is_quarantined_with_a_reason_and_the_run_goes_on(tmp_path, xrays, monkeypatch):
    root = tmp_path / "scans"
    root.mkdir()
    for i in range(3):
        write_png(xrays[0][i], root / f"cxr_{i}.png")
    real_read = ingest_mod.read_image

    def flaky(path, max_voxels):  # an error no reader anticipates, quoting the file's path
        if path.name == "cxr_1.png":
            raise OSError(f"[Errno 5] Input/output error: '{path}'")
        return real_read(path, max_voxels)

    monkeypatch.setattr(ingest_mod, "read_image", flaky)
    site = make_site(tmp_path, "images", [{"path": f"cxr_{i}.png", "label": i % 2} for i in range(3)])
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"cxr_1.png": "unexpected_error"}
    assert res.quarantine[0]["detail"] == "OSError: [Errno 5] Input/output error: '<file>'"
    assert len(res.images) == 2


# ---------------------------------------------- 9. invalid input must not pass silently
def test_rgb_dicom_is_one_grey_image_not_rows_taken_for_slices(tmp_path):
    src = get_testdata_file("SC_rgb_rle.dcm")  # 100 x 100 RGB secondary capture
    root = tmp_path / "scans"
    root.mkdir()
    ds = pydicom.dcmread(src)
    ds.BurnedInAnnotation = "NO"  # a secondary capture is ingested only when it declares no burned-in text
    ds.save_as(root / "rgb.dcm")
    site = make_site(tmp_path, "dicom", [{"path": "rgb.dcm", "label": 1}])
    res = ingest_site(site, 32, progress=False)
    assert res.quarantine == [] and res.images.shape == (1, 1, 32, 32)  # was 90 "slices" of 100 x 3 pixels
    rgb = pydicom.dcmread(src).pixel_array.astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    small = sitk.GetArrayFromImage(sitk.Resample(sitk.GetImageFromArray(luma), [32, 32], sitk.Transform(), sitk.sitkLinear,
                                                 (0, 0), (100 / 32, 100 / 32)))
    assert np.corrcoef(small.ravel(), res.images[0, 0].ravel())[0, 1] > 0.9


def test_a_secondary_capture_that_does_not_declare_its_pixels_free_of_text_is_quarantined(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "plain.dcm")
    shutil.copy(get_testdata_file("SC_rgb_rle.dcm"), root / "screenshot.dcm")  # Modality OT, no BurnedInAnnotation
    site = make_site(tmp_path, "dicom", [{"path": "plain.dcm", "label": 0}, {"path": "screenshot.dcm", "label": 1}], "ct")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"screenshot.dcm": "burned_in_annotation"} and res.labels.tolist() == [0]


def test_mr_dicom_in_a_ct_site_is_quarantined_as_modality_mismatch(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), root / name)
    site = make_site(tmp_path, "dicom", [{"path": "CT_small.dcm", "label": 0}, {"path": "MR_small.dcm", "label": 1}], "ct")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"MR_small.dcm": "modality_mismatch"}
    assert "Modality MR" in res.quarantine[0]["detail"] and res.labels.tolist() == [0]


def test_mr_pixels_without_a_modality_tag_are_refused_by_a_ct_site(tmp_path):
    # As NIfTI there is no Modality tag; MR intensities are not HU and would be 79% saturated white.
    root = tmp_path / "scans"
    root.mkdir()
    for name, arr in (("ct.nii.gz", hu(pydicom.dcmread(get_testdata_file("CT_small.dcm")))),
                      ("mr.nii.gz", pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array)):
        nib.save(nib.Nifti1Image(arr.T[:, :, None].astype(np.float32), np.eye(4)), root / name)
    site = make_site(tmp_path, "nifti", [{"path": "ct.nii.gz", "label": 0}, {"path": "mr.nii.gz", "label": 1}], "ct")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"mr.nii.gz": "modality_mismatch"}
    assert "not Hounsfield units" in res.quarantine[0]["detail"]


def test_labels_outside_the_models_classes_are_quarantined_as_invalid(tmp_path, xrays):
    root = tmp_path / "scans"
    root.mkdir()
    labels = ["0", "1", "-1", "-3", "7", "yes", "1.5"]
    for i in range(len(labels)):
        write_png(xrays[0][i], root / f"cxr_{i}.png")
    site = make_site(tmp_path, "images", [{"path": f"cxr_{i}.png", "label": v} for i, v in enumerate(labels)])
    res = ingest_site(site, 32, progress=False, num_classes=2)
    assert reasons(res) == {f"cxr_{i}.png": "invalid_label" for i in range(2, 7)}
    assert res.labels.tolist() == [0, 1]
    assert "label outside 0..1 (model.num_classes 2)" in {q["detail"] for q in res.quarantine}
    # Alone (`fedsynth ingest`), the model's classes are unknown: negative and non-integer labels are still refused.
    alone = ingest_site(site, 32, progress=False)
    assert set(reasons(alone)) == {f"cxr_{i}.png" for i in (2, 3, 5, 6)}


def test_dicom_with_burned_in_annotation_is_quarantined(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "plain.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"  # the pixels may show a name or a date
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(root / "annotated.dcm")
    site = make_site(tmp_path, "dicom", [{"path": "plain.dcm", "label": 0}, {"path": "annotated.dcm", "label": 1}], "ct")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"annotated.dcm": "burned_in_annotation"} and res.labels.tolist() == [0]


# ------------------------------------------------- 10. paths must not escape the root
@pytest.fixture
def opened(monkeypatch):
    """Every file ingestion hashes or reads."""
    seen = []
    for mod, name in ((ingest_mod, "sha256_file"), (ingest_mod, "read_image")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda p, *a, _real=real: seen.append(os.path.realpath(p)) or _real(p, *a))
    return seen


def test_csv_paths_that_leave_the_root_are_refused_unopened(tmp_path, xrays, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_png(xrays[0][1], outside / "x.png")
    root = tmp_path / "scans"
    root.mkdir()
    write_png(xrays[0][0], root / "inside.png")
    rows = [{"path": "inside.png", "label": 0}, {"path": "../outside/x.png", "label": 1},
            {"path": str(outside / "x.png"), "label": 1}, {"path": "../../../../../../../../etc/hostname", "label": 1}]
    site = make_site(tmp_path, "images", rows)
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {r["path"]: "outside_root" for r in rows[1:]}
    assert len(res.images) == 1
    assert all(p.startswith(str(root.resolve())) for p in opened) and opened


def test_symlinks_that_leave_the_root_are_refused_and_those_inside_it_followed(tmp_path, xrays, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_png(xrays[0][1], outside / "x.png")
    root = tmp_path / "scans"
    (root / "sub").mkdir(parents=True)
    write_png(xrays[0][0], root / "sub" / "real.png")
    (root / "inside_link.png").symlink_to(root / "sub" / "real.png")
    (root / "listed_link.png").symlink_to(outside / "x.png")
    (root / "unlisted_link.png").symlink_to(outside / "x.png")
    (root / "linked_dir").symlink_to(outside)  # not walked
    (root / "loop.png").symlink_to(root / "loop.png")
    site = make_site(tmp_path, "images", [{"path": "inside_link.png", "label": 0}, {"path": "listed_link.png", "label": 1}])
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"listed_link.png": "outside_root", "unlisted_link.png": "outside_root", "loop.png": "outside_root"}
    assert len(res.images) == 1 and all(p.startswith(str(root.resolve())) for p in opened)


def test_dicom_symlinked_out_of_the_root_is_refused(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = generate_uid()  # another series, in another patient's folder
    ds.save_as(outside / "other_patient.dcm")
    root = tmp_path / "scans"
    root.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "ct.dcm")
    (root / "link.dcm").symlink_to(outside / "other_patient.dcm")
    (outside / "notes.txt").write_text("not DICOM")
    (root / "notes.dcm").symlink_to(outside / "notes.txt")
    os.mkfifo(root / "pipe.dcm")  # opening it would block the scan for ever
    from common.data import readers

    real_scan = readers.sitk.ImageSeriesReader.GetGDCMSeriesIDs

    def scan_only_safe_folders(folder, *args):  # GDCM opens every file of the folder it scans
        for entry in Path(folder).iterdir():
            assert stat.S_ISREG(os.stat(entry).st_mode) and entry.resolve().is_relative_to(root.resolve()), entry
        return real_scan(folder, *args)

    monkeypatch.setattr(readers.sitk.ImageSeriesReader, "GetGDCMSeriesIDs", staticmethod(scan_only_safe_folders))
    site = make_site(tmp_path, "dicom", [{"path": "ct.dcm", "label": 0}, {"path": "link.dcm", "label": 1}], "ct")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res)["link.dcm"] == "outside_root" and reasons(res)["notes.dcm"] == "outside_root"
    assert "pipe.dcm" in reasons(res) and res.labels.tolist() == [0]


# ------------------------------------------------------------ 11. a size limit
def test_header_claiming_32767_cubed_voxels_is_quarantined_unread(tmp_path, xrays):
    root = tmp_path / "scans"
    root.mkdir()
    header = nib.Nifti1Header()
    header.set_data_shape((32767, 32767, 32767))
    header.set_data_dtype(np.int16)
    with gzip.open(root / "huge.nii.gz", "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 4096)  # 70 TB claimed, 4 kB present
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([xrays[0][0]] * 4).astype(np.float32)), str(root / "ok.nii.gz"))
    site = make_site(tmp_path, "nifti", [{"path": "ok.nii.gz", "label": 0}, {"path": "huge.nii.gz", "label": 1}],
                     extra=", preprocess: {min_foreground: 0.05}")
    res = ingest_site(site, 32, progress=False)
    assert reasons(res) == {"huge.nii.gz": "too_large"}
    assert "35,181,150,961,663 voxels" in res.quarantine[0]["detail"]


def test_small_gzip_that_expands_past_the_default_cap_is_quarantined_unexpanded(tmp_path, xrays, monkeypatch):
    root = tmp_path / "scans"
    root.mkdir()
    shape = (512, 512, 520)  # 136 M voxels, over the default 512^3
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    plane = bytes(512 * 512)
    with gzip.open(root / "bomb.nii.gz", "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        for _ in range(shape[2]):
            f.write(plane)
    assert (root / "bomb.nii.gz").stat().st_size < 1_000_000
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([xrays[0][0]] * 4).astype(np.float32)), str(root / "ok.nii.gz"))
    loaded = []
    monkeypatch.setattr(readers_mod.nib, "load", lambda p, *a, _real=nib.load: loaded.append(p) or _real(p, *a))
    site = make_site(tmp_path, "nifti", [{"path": "bomb.nii.gz", "label": 1}, {"path": "ok.nii.gz", "label": 0}])
    assert site.source.max_voxels == 512**3  # the default
    res = ingest_site(site, 32, progress=False)
    assert reasons(res)["bomb.nii.gz"] == "too_large"
    assert not any("bomb" in str(p) for p in loaded)  # its voxels were never read


def test_voxel_cap_is_configurable_and_applies_to_png_and_dicom(tmp_path, xrays):
    root = tmp_path / "scans"
    root.mkdir()
    write_png(xrays[0][0], root / "cxr.png")  # 28 x 28 = 784 pixels
    site = make_site(tmp_path, "images", [{"path": "cxr.png", "label": 0}], extra=", max_voxels: 700", name="png")
    with pytest.raises(DataError, match="too_large"):
        ingest_site(site, 32, progress=False)
    dcm = tmp_path / "d"
    dcm.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), dcm / "ct.dcm")  # 128 x 128 = 16,384 voxels
    write_csv(dcm / "labels.csv", [{"path": "ct.dcm", "label": 0}])
    site = load_site(site_yaml(tmp_path / "dcm.yaml", "dcm", f"{{kind: dicom, root: {dcm}, labels_csv: {dcm / 'labels.csv'}, modality: ct, max_voxels: 16000}}"))
    with pytest.raises(DataError, match="too_large"):
        ingest_site(site, 32, progress=False)


# ------------------------------------------------------- 12. identifiers in local files
PHI_NAMES = ("Smith", "John", "19700101", "MRN12345", "Doe", "Jane", "67890")


def test_identifying_file_names_never_reach_the_site_state_but_can_be_looked_up(tmp_path, xrays):
    root = tmp_path / "scans"
    root.mkdir()
    write_png(xrays[0][0], root / "Smith_John_DOB19700101_MRN12345.png")
    write_png(xrays[0][1], root / "Smith_John_DOB19700101_MRN12345_copy.png")
    shutil.copy(root / "Smith_John_DOB19700101_MRN12345.png", root / "Doe_Jane_DOB19800202_MRN67890.png")  # a duplicate
    (root / "Doe_Jane_corrupt_MRN67890.png").write_bytes(b"\x89PNG not really")
    names = ["Smith_John_DOB19700101_MRN12345.png", "Smith_John_DOB19700101_MRN12345_copy.png",
             "Doe_Jane_DOB19800202_MRN67890.png", "Doe_Jane_corrupt_MRN67890.png"]
    site = make_site(tmp_path, "images", [{"path": n, "label": i % 2} for i, n in enumerate(names)])
    res = ingest_site(site, 32, progress=False)
    ingest_site(site, 32, progress=False)  # and again, from the cache
    written = all_bytes_under(site_state_dir(site))
    for phi in PHI_NAMES:
        assert phi.encode() not in written, phi
    # The operator, holding the site key, finds any file in the manifest and every quarantined file's path.
    manifest = json.loads((site_state_dir(site) / "ingest_cache" / "manifest.json").read_text())["entries"]
    assert path_key(site, "Smith_John_DOB19700101_MRN12345.png") in manifest
    assert path_key(site, root / "Smith_John_DOB19700101_MRN12345.png") in manifest
    assert {q["path"]: q["reason"] for q in quarantined(site)} == reasons(res) == {
        "Doe_Jane_DOB19800202_MRN67890.png": "duplicate", "Doe_Jane_corrupt_MRN67890.png": "unreadable"}
    found = {q["path"]: q["detail"] for q in quarantined(site)}
    assert found["Doe_Jane_DOB19800202_MRN67890.png"] == "same content as Smith_John_DOB19700101_MRN12345.png"


def test_site_state_is_owner_only_even_where_it_existed_world_readable(tmp_path, xrays):
    root = tmp_path / "scans"
    root.mkdir()
    write_png(xrays[0][0], root / "cxr.png")
    site = make_site(tmp_path, "images", [{"path": "cxr.png", "label": 0}])
    state = site_state_dir(site)
    (state / "ingest_cache").mkdir(parents=True, mode=0o755)
    os.chmod(state, 0o755)
    ingest_site(site, 32, progress=False)
    paths = [state, *state.rglob("*")]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths} == {
        p.name: 0o700 if p.is_dir() else 0o600 for p in paths}
    assert {p.name for p in paths} >= {state.name, "ingest_cache", "manifest.json", "pseudonym.key", "quarantine.json"}


def ingested_png_site(tmp_path, xrays):
    """A one-image site, ingested once: its cache and pseudonym key exist."""
    root = tmp_path / "scans"
    root.mkdir()
    write_png(xrays[0][0], root / "cxr.png")
    site = make_site(tmp_path, "images", [{"path": "cxr.png", "label": 0}])
    ingest_site(site, 32, progress=False)
    return site


def test_corrupt_cache_manifest_is_a_one_line_error_that_says_what_to_do(tmp_path, xrays, capsys):
    site = ingested_png_site(tmp_path, xrays)
    cache = site_state_dir(site) / "ingest_cache"
    (cache / "manifest.json").write_text('{"params": "x", "entries": {"k": ')  # a write cut short
    from simulations.cli import main as cli

    assert cli(["ingest", site.origin]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"fedsynth: error: {cache / 'manifest.json'}: ingestion cache manifest is corrupt")
    assert f"delete the folder {cache} and rerun" in err
    shutil.rmtree(cache)
    assert ingest_site(site, 32, progress=False).summary["scans"] == 1


def test_pseudonym_key_readable_by_others_is_a_one_line_error_that_says_what_to_do(tmp_path, xrays, capsys):
    site = ingested_png_site(tmp_path, xrays)
    key = site_state_dir(site) / "pseudonym.key"
    os.chmod(key, 0o644)
    from simulations.cli import main as cli

    assert cli(["ingest", site.origin]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err == f"fedsynth: error: {key}: pseudonym key is readable by others (mode 644); run: chmod 600 {key}"
