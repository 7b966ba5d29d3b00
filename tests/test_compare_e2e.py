"""`fedsynth compare`: four generators on one federation, one comparison (tiny settings)."""

import json
import math

from simulations.compare import compare

from .conftest import REPO


def test_compare_trains_every_model_and_writes_the_table(shared_data, tmp_path):
    out = compare(str(REPO / "tests" / "configs" / "compare_tiny.yaml"), output_dir=str(tmp_path))
    report = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["VAE", "GAN", "DDPM", "DP-DDPM"]
    for label, r in rows.items():
        for key in ("fid", "kid", "msssim", "auc_int", "auc_ext", "gain_int", "gain_ext", "mi_auc", "dcr", "domias", "reid", "F", "U", "P", "fup"):
            assert math.isfinite(r[key]), (label, key)
        assert r["gate"] in ("passed", "REFUSED")
    assert rows["DP-DDPM"]["dp"] and 0 < rows["DP-DDPM"]["eps"] <= 8.0
    assert rows["DDPM"]["eps"] is None and not rows["DDPM"]["dp"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    for label in rows:
        assert (out / label / "report.json").exists()
