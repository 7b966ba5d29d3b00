"""Ingestion: real NIfTI and DICOM scans -> de-identified, cached, quarantined slices."""

import json
import os
import shutil
import stat

import numpy as np
import pytest
import SimpleITK as sitk

from common.config import ConfigError, PreprocessConfig, load_site, site_state_dir
from common.data.ingest import ingest_site, path_key, quarantined
from common.data.medmnist import DataError
from common.data.preprocess import normalise
from common.data.pseudonym import Pseudonymiser

from .scans import PHI, all_bytes_under, mni_path, site_yaml, write_csv, write_dicom_series

PRE = "preprocess: {spacing: [4.0, 4.0, 4.0], min_foreground: 0.05}"


@pytest.fixture(scope="module")
def mni(shared_data):
    t1 = mni_path(shared_data, "t1")
    if not t1.is_file():
        pytest.fail(f"real MNI152 volume missing: {t1}")
    return {k: mni_path(shared_data, k) for k in ("t1", "gm", "wm")}


def nifti_site(tmp_path, rows, extra_source="", name="mri_site"):
    root = tmp_path / "scans"
    root.mkdir(exist_ok=True)
    write_csv(root / "labels.csv", rows)
    src = f"{{kind: nifti, root: {root}, labels_csv: {root / 'labels.csv'}, modality: mri, {PRE}{extra_source}}}"
    return load_site(site_yaml(tmp_path / f"{name}.yaml", name, src)), root


def test_mri_normalisation_clips_percentiles_then_z_scores():
    x = np.concatenate([np.linspace(0, 100, 1000), [1e6]]).astype(np.float32)
    out = normalise(x, "mri", PreprocessConfig())
    assert 0 <= out.min() and out.max() <= 1
    assert out[-1] == pytest.approx(out[:-1].max(), abs=0.02)  # the outlier was clipped first
    assert abs(out.mean() - 0.5) < 0.02


def test_ct_uses_the_hu_window_and_xray_percentiles():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.float32)
    assert normalise(hu, "ct", PreprocessConfig(ct_window=[40, 400])).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    xr = np.linspace(0, 255, 101).astype(np.float32)
    out = normalise(xr, "xray", PreprocessConfig(percentiles=[0, 100]))
    assert out.min() == 0 and out.max() == 1


def test_nifti_with_mask_is_resampled_sliced_and_stays_aligned(mni, tmp_path):
    brain = sitk.Cast(sitk.ReadImage(str(mni["gm"])), sitk.sitkFloat32) + sitk.Cast(sitk.ReadImage(str(mni["wm"])), sitk.sitkFloat32)
    mask = sitk.Cast(brain > 128, sitk.sitkUInt8)
    root = tmp_path / "scans"
    root.mkdir()
    sitk.WriteImage(mask, str(root / "mask.nii.gz"))
    # The image is the mask itself as floats: after reorienting, resampling (linear vs
    # nearest) and resizing, the image thresholded half-way must coincide with the mask.
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkFloat32) * 100.0, str(root / "img.nii.gz"))
    shutil.copy(mni["t1"], root / "t1.nii.gz")
    site, _ = nifti_site(tmp_path, [
        {"path": "img.nii.gz", "mask": "mask.nii.gz", "label": 1, "patient": "A"},
        {"path": "t1.nii.gz", "mask": "", "label": 0, "patient": "B"},
    ], ", mask_column: mask, patient_column: patient")
    res = ingest_site(site, 32, progress=False)
    assert res.images.shape[1:] == (1, 32, 32) and res.images.dtype == np.float32
    assert res.quarantine == []
    first = [i for i, p in enumerate(res.patients) if p == res.patients[0]]
    vals = res.images[first, 0]
    img, msk = vals > (vals.min() + vals.max()) / 2, res.masks[first, 0] > 0
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(img, msk) > 0.9
    assert iou(img, np.roll(msk, 2, axis=-1)) < iou(img, msk) - 0.1  # a 2-pixel shift would show
    # 197x233x189 mm at 4 mm -> ~48 axial slices, of which the informative ones are kept.
    assert 10 < len(first) <= 48


def test_multi_contrast_channels_are_stacked(mni, tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    for k in ("t1", "gm", "wm"):
        shutil.copy(mni[k], root / f"{k}.nii.gz")
    site, _ = nifti_site(tmp_path, [{"t1": "t1.nii.gz", "gm": "gm.nii.gz", "wm": "wm.nii.gz", "label": 0}],
                         ", channels: [t1, gm, wm]")
    res = ingest_site(site, 32, progress=False)
    assert res.images.shape[1] == 3
    assert not np.allclose(res.images[:, 0], res.images[:, 1])


def test_dicom_series_phi_never_reaches_any_output(mni, tmp_path):
    vol = sitk.ReadImage(str(mni["t1"]))
    vol = sitk.Resample(vol, [50, 58, 47], sitk.Transform(), sitk.sitkLinear, vol.GetOrigin(), [4.0, 4.0, 4.0], vol.GetDirection())
    root = tmp_path / "dicom"
    write_dicom_series(vol, root / "study1" / "series1", PHI, "1.2.826.0.1.3680043.9.7134.1")
    write_csv(root / "labels.csv", [{"path": "study1/series1", "label": 1}])
    src = f"{{kind: dicom, root: {root}, labels_csv: {root / 'labels.csv'}, modality: mri, preprocess: {{min_foreground: 0.05}}}}"
    site = load_site(site_yaml(tmp_path / "d.yaml", "dicom_site", src))
    res = ingest_site(site, 32, progress=False)
    assert res.quarantine == [] and res.images.shape[0] > 10
    state = site_state_dir(site)
    # Pseudonym = HMAC of the real PatientID under this site's key.
    assert set(res.patients) == {Pseudonymiser(state / "pseudonym.key")(PHI["0010|0020"])}
    written = all_bytes_under(state)
    outputs = [written, json.dumps(res.summary).encode(), json.dumps(res.quarantine).encode(), " ".join(res.patients).encode()]
    for tag, value in PHI.items():
        for out in outputs:
            assert value.encode() not in out, (tag, value)
            assert value.split("^")[0].encode() not in out, (tag, value)


def test_pydicom_test_files_read_with_patient_tags_removed(tmp_path):
    pydicom = pytest.importorskip("pydicom")  # a test dependency, installed by make test
    from pydicom.data import get_testdata_file

    # Each file in a site of its own modality (an MR file in a CT site is quarantined: tests/security).
    for name, modality in (("CT_small.dcm", "ct"), ("MR_small.dcm", "mri")):
        root = tmp_path / modality
        root.mkdir()
        src = get_testdata_file(name)
        ds = pydicom.dcmread(src)
        phi = {str(ds.PatientName), str(ds.PatientID)}
        shutil.copy(src, root / name)
        write_csv(root / "labels.csv", [{"path": name, "label": 1}])
        site = load_site(site_yaml(tmp_path / f"{modality}.yaml", f"pyd_{modality}",
                                   f"{{kind: dicom, root: {root}, labels_csv: {root / 'labels.csv'}, modality: {modality}}}"))
        res = ingest_site(site, 32, progress=False)
        assert res.labels.tolist() == [1] and res.quarantine == []
        assert res.patients == [Pseudonymiser(site_state_dir(site) / "pseudonym.key")(str(ds.PatientID))]
        written = all_bytes_under(site_state_dir(site)) + json.dumps(res.summary).encode()
        for value in phi:
            assert value.encode() not in written, value


def test_every_bad_input_is_quarantined_with_its_reason_and_valid_scans_kept(mni, tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    t1 = sitk.ReadImage(str(mni["t1"]))
    small = sitk.Resample(t1, [40, 46, 38], sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), [5.0, 5.0, 5.0], t1.GetDirection())
    sitk.WriteImage(small, str(root / "good1.nii.gz"))
    sitk.WriteImage(sitk.Flip(small, [True, False, False]), str(root / "good2.nii.gz"))
    shutil.copy(root / "good1.nii.gz", root / "copy_of_good1.nii.gz")
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    arr = sitk.GetArrayFromImage(small).astype(np.float32)
    nan = arr.copy()
    nan[5, 5, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(root / "nan.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros_like(arr)), str(root / "constant.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr, arr, arr])[..., None].repeat(2, -1).transpose(0, 4, 1, 2, 3).reshape(8, *arr.shape), isVector=False), str(root / "fourd.nii.gz"))
    bad_mask = sitk.Cast(sitk.Resample(small, [20, 23, 19], sitk.Transform(), sitk.sitkNearestNeighbor, small.GetOrigin(), [10.0] * 3, small.GetDirection()) > 50, sitk.sitkUInt8)
    sitk.WriteImage(bad_mask, str(root / "bad_mask.nii.gz"))
    sitk.WriteImage(sitk.Flip(small, [False, True, False]), str(root / "withmask.nii.gz"))
    sitk.WriteImage(sitk.Flip(small, [False, False, True]), str(root / "unlabelled.nii.gz"))
    rows = [
        {"path": "good1.nii.gz", "mask": "", "label": 0},
        {"path": "good2.nii.gz", "mask": "", "label": 1},
        {"path": "copy_of_good1.nii.gz", "mask": "", "label": 0},
        {"path": "corrupt.nii.gz", "mask": "", "label": 1},
        {"path": "nan.nii.gz", "mask": "", "label": 1},
        {"path": "constant.nii.gz", "mask": "", "label": 1},
        {"path": "fourd.nii.gz", "mask": "", "label": 1},
        {"path": "withmask.nii.gz", "mask": "bad_mask.nii.gz", "label": 1},
    ]
    site, _ = nifti_site(tmp_path, rows, ", mask_column: mask")
    res = ingest_site(site, 32, progress=False)
    got = {q["path"]: q["reason"] for q in res.quarantine}
    assert got == {
        "copy_of_good1.nii.gz": "duplicate",
        "corrupt.nii.gz": "unreadable",
        "nan.nii.gz": "non_finite",
        "constant.nii.gz": "empty_or_constant",
        "fourd.nii.gz": "wrong_dimensionality",
        "withmask.nii.gz": "mask_geometry_mismatch",
        "unlabelled.nii.gz": "label_missing",
    }
    assert sorted(set(res.labels.tolist())) == [0, 1] and len(set(res.patients)) == 2
    # On disk, files are named by keyed names the operator can compute (and match back), not by path.
    on_disk = json.loads((site_state_dir(site) / "quarantine.json").read_text())["quarantined"]
    assert {q["key"]: q["reason"] for q in on_disk} == {path_key(site, p): r for p, r in got.items()}
    assert {q["path"]: q["reason"] for q in quarantined(site)} == got


def test_nothing_valid_is_a_clear_error_naming_site_and_reasons(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    (root / "a.nii.gz").write_bytes(b"junk")
    site, _ = nifti_site(tmp_path, [{"path": "a.nii.gz", "label": 1}], name="broken_site")
    with pytest.raises(DataError, match=r"broken_site.*unreadable"):
        ingest_site(site, 32, progress=False)


def test_missing_csv_column_names_the_file(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    write_csv(root / "labels.csv", [{"path": "x.nii.gz", "diagnosis": 1}])
    site = load_site(site_yaml(tmp_path / "s.yaml", "s", f"{{kind: nifti, root: {root}, labels_csv: {root / 'labels.csv'}}}"))
    with pytest.raises(ConfigError, match=r"labels.csv: missing column\(s\) \['label'\]"):
        ingest_site(site, 32, progress=False)


def test_cache_is_reused_and_invalidated_per_file_and_per_parameter(mni, tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    t1 = sitk.ReadImage(str(mni["t1"]))
    small = sitk.Resample(t1, [40, 46, 38], sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), [5.0] * 3, t1.GetDirection())
    for i in range(3):
        sitk.WriteImage(sitk.Flip(small, [i == 1, i == 2, False]), str(root / f"v{i}.nii.gz"))
    rows = [{"path": f"v{i}.nii.gz", "label": i % 2} for i in range(3)]
    site, _ = nifti_site(tmp_path, rows)
    first = ingest_site(site, 32, progress=False)
    again = ingest_site(site, 32, progress=False)
    assert first.summary["reused_from_cache"] == 0 and again.summary["reused_from_cache"] == 3
    assert np.array_equal(first.images, again.images) and first.patients == again.patients
    sitk.WriteImage(sitk.Flip(small, [True, True, False]), str(root / "v0.nii.gz"))
    assert ingest_site(site, 32, progress=False).summary["reused_from_cache"] == 2
    assert ingest_site(site, 16, progress=False).summary["reused_from_cache"] == 0


def test_pseudonym_key_is_private_stable_and_keyed(tmp_path):
    p1 = Pseudonymiser(tmp_path / "a" / "key")
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "key").st_mode) == 0o600
    assert Pseudonymiser(tmp_path / "a" / "key")("MRN1") == p1("MRN1") != p1("MRN2")
    assert Pseudonymiser(tmp_path / "b" / "key")("MRN1") != p1("MRN1")
    assert "MRN1" not in p1("MRN1")
    os.chmod(tmp_path / "a" / "key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Pseudonymiser(tmp_path / "a" / "key")


def test_split_is_by_patient_seeded_and_disjoint():
    from common.data.sites import patient_holdout

    patients = [f"p{i // 5}" for i in range(200)]  # 40 patients x 5 slices
    labels = np.array([(i // 5) % 2 for i in range(200)])
    ho = patient_holdout(patients, labels, 0.3, seed=3)
    held = {p for p, h in zip(patients, ho) if h}
    kept = {p for p, h in zip(patients, ho) if not h}
    assert not held & kept and len(held) == 12
    assert np.array_equal(ho, patient_holdout(patients, labels, 0.3, seed=3))
    with pytest.raises(DataError, match="cannot be split"):
        patient_holdout(["only"] * 4, np.zeros(4, dtype=int), 0.3, seed=0, site="tiny")


def test_png_folder_site_reads_real_xrays(shared_data, tmp_path):
    from common.data.medmnist import load_splits

    x, y = load_splits(shared_data / "medmnist" / "pneumoniamnist.npz", ["test"])
    root = tmp_path / "scans"
    root.mkdir()
    rows = []
    for i in range(12):
        sitk.WriteImage(sitk.GetImageFromArray(x[i]), str(root / f"cxr_{i}.png"))
        rows.append({"path": f"cxr_{i}.png", "label": int(y[i]), "patient": f"MRN{i // 2}"})
    write_csv(root / "labels.csv", rows)
    src = f"{{kind: images, root: {root}, labels_csv: {root / 'labels.csv'}, modality: xray, patient_column: patient}}"
    site = load_site(site_yaml(tmp_path / "png.yaml", "png_site", src))
    res = ingest_site(site, 32, progress=False)
    assert res.images.shape == (12, 1, 32, 32) and res.labels.tolist() == [int(v) for v in y[:12]]
    assert len(set(res.patients)) == 6 and not any("MRN" in p for p in res.patients)
    assert res.images.min() == 0 and res.images.max() == 1
