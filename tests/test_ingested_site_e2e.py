"""A hospital whose data is a DICOM folder trains in the federation in place of an npz site."""

import json

import numpy as np
import pytest

from common.data.medmnist import load_splits
from simulations.cli import main as cli
from simulations.simulate import simulate

from .conftest import REPO
from .scans import PHI, all_bytes_under, site_yaml, write_xray_dicoms


@pytest.fixture(scope="module")
def federation(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dicomfed")
    # The DICOM hospital holds 240 official-val X-rays (40 patients); the npz sites use train only.
    x, y = load_splits(shared_data / "medmnist" / "pneumoniamnist.npz", ["val"])
    root = tmp / "pacs_export"
    csv_path = write_xray_dicoms(x[:240], y[:240], root, patients=40)
    dicom_site = site_yaml(tmp / "hospital_dcm.yaml", "hospital_dcm", f"{{kind: dicom, root: {root}, labels_csv: {csv_path}, modality: xray}}")
    npz_site = tmp / "hospital_a.yaml"
    npz_site.write_text((REPO / "sites" / "hospital_a.yaml").read_text().replace("splits: [train, val]", "splits: [train]"))
    run_yaml = (REPO / "tests" / "configs" / "tiny.yaml").read_text()
    run_yaml = run_yaml.replace("../../sites/hospital_a.yaml", str(npz_site)).replace("../../sites/hospital_c.yaml", str(dicom_site))
    run_yaml = run_yaml.replace("../../sites/external_d.yaml", str(REPO / "sites" / "external_d.yaml"))
    # No public prior: this federation's DICOM site is made of val images a train+val archive would hold.
    run_yaml = "\n".join(line for line in run_yaml.splitlines() if not line.startswith("public_prior:"))
    (tmp / "run.yaml").write_text(run_yaml)
    run_dir = simulate(str(tmp / "run.yaml"), output_dir=str(tmp / "runs"))
    return tmp, dicom_site, run_dir, json.loads((run_dir / "report.json").read_text())


def test_dicom_site_trains_within_budget(federation):
    _, _, _, report = federation
    site = report["privacy"]["sites"]["hospital_dcm"]
    assert site["rounds_trained"] == 2 and 0 < site["epsilon"] <= 8.0
    assert np.isfinite(report["utility"]["sites"]["hospital_dcm"]["auc_gain_internal"])


def test_no_planted_phi_in_any_output_or_message(federation):
    tmp, _, run_dir, _ = federation
    # history.json and privacy_ledger.json hold every message the clients sent.
    written = all_bytes_under(run_dir) + all_bytes_under(tmp / "state_hospital_dcm")
    for value in PHI.values():
        assert value.encode() not in written, value


def test_ingest_command_prints_the_summary(federation, capsys):
    _, dicom_site, _, _ = federation
    assert cli(["ingest", str(dicom_site)]) == 0
    out = capsys.readouterr().out
    assert "240 scans -> 240 slices from 40 patients" in out
    assert "240 scans from cache" in out
    assert "images per label: 0: " in out and "slices per patient: min 6, median 6, max 6" in out
    assert "quarantined: 0" in out
