"""Ingestion time and peak memory for the real MNI152 T1 volume (+ tissue mask), cold vs cached.

    .venv/bin/python benchmarks/ingest_mni152.py [--spacing 2]

Prints JSON. Each measurement runs in a fresh subprocess so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from common.config import load_site
from common.data.ingest import ingest_site
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
res = ingest_site(load_site(sys.argv[1]), 32, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mb": base,
                  "slices": int(len(res.images)), "reused": res.summary["reused_from_cache"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=1.0, help="output spacing in mm (1 = native)")
    ap.add_argument("--data", default=os.environ.get("FEDSYNTH_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    args = ap.parse_args()
    mni = Path(args.data) / "mni152"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", tmp / "t1.nii.gz")
        shutil.copy(mni / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", tmp / "gm.nii.gz")
        (tmp / "labels.csv").write_text("path,mask,label\nt1.nii.gz,gm.nii.gz,0\n")
        (tmp / "site.yaml").write_text(
            f"name: bench\nrole: external\nstate_dir: {tmp / 'state'}\n"
            f"source: {{kind: nifti, root: {tmp}, labels_csv: {tmp / 'labels.csv'}, modality: mri, mask_column: mask, "
            f"preprocess: {{spacing: [{args.spacing}, {args.spacing}, {args.spacing}]}}}}\n"
        )
        runs = {}
        for name in ("cold", "cached"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "site.yaml")], capture_output=True, text=True, check=True)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "benchmark": "ingest_mni152",
        "volume": "MNI152 2009a T1 197x233x189 @1mm + GM mask",
        "spacing_mm": args.spacing,
        **runs,
        "cached_over_cold_time": runs["cached"]["seconds"] / runs["cold"]["seconds"],
    }, indent=2))


if __name__ == "__main__":
    main()
