"""Mask-conditioned DDPM on real MNI152 slices: generated slices follow their masks."""

import math

from simulations.mask_conditioning import mask_demo

from .conftest import REPO


def test_conditioned_slices_follow_masks_better_than_unconditioned(shared_data, tmp_path):
    out, report = mask_demo(
        str(REPO / "simulations" / "mask.yaml"),
        output_dir=str(tmp_path),
        overrides={"training": {"local_steps": 200}, "segmentation": {"epochs": 3}, "sampling": {"ddim_steps": 10}},
    )
    c = report["mask_contrast"]
    assert c["real"] > 0.05  # white matter is brighter than the rest of the brain in T1
    assert c["mask_conditioned"] > c["unconditioned"] + 0.03
    for v in report["dice"].values():
        assert 0 <= v <= 1 and math.isfinite(v)
    assert (out / "report.html").read_text().count("data:image/png") == 4
