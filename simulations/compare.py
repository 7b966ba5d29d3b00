"""``fedsynth compare``: several generators on one federation, one comparison report.

Each entry of the compare YAML is the base simulation plus overrides; every run
is a full ``fedsynth simulate`` run in its own folder, and the comparison gathers
their report.json figures into the shapes of the papers' Tables 1-3.
"""

from __future__ import annotations

import html
import json
import time
from datetime import datetime
from pathlib import Path

import torch

from common.config import ConfigError, read_yaml, load_run
from common.evaluation.gate import ReleaseRefused
from common.reporting.figures import image_grid
from common.reporting.report import fmt, html_table
from common.runtime import versions, write_json
from server.synthesis import load_synthetic, release_dir

from .simulate import console, simulate_run

COLUMNS = [
    ("model", "model"), ("dp", "DP"), ("fid", "FID"), ("kid", "KID"), ("msssim", "MS-SSIM (syn)"),
    ("auc_int", "AUC int (syn only)"), ("auc_ext", "AUC ext (syn only)"),
    ("gain_int", "hybrid gain int"), ("gain_ext", "hybrid gain ext"),
    ("eps", "ε max"), ("dcr", "DCR excess (0 = chance)"), ("domias", "density-ratio MI AUC"), ("reid", "re-id rate"),
    ("mi_auc", "model-loss MI-AUC max (per family)"), ("F", "F"), ("U", "U"), ("P", "P"), ("fup", "FUP"), ("gate", "memorisation gate"),
]


def row(label: str, report: dict) -> dict:
    f, u, p = report["fidelity"], report["utility"], report["privacy"]
    ext = next(iter(u["synthetic_only"]["external"].values()), {})
    rel = p["release"]
    return {
        "model": label,
        "dp": report["run"]["config"]["training"]["dp"],
        "fid": f["fid"], "kid": f["kid"], "msssim": f["msssim_synthetic"],
        "auc_int": u["synthetic_only"]["internal"]["auc"], "auc_ext": ext.get("auc"),
        "gain_int": u["auc_gain_internal"], "gain_ext": u["auc_gain_external"],
        "eps": p["epsilon_max"], "dcr": rel["dcr_excess"], "domias": rel["domias"]["auc"],
        "reid": rel["reid_rate"], "mi_auc": p["mi_auc_max"],
        "F": report["fup"]["fidelity"], "U": report["fup"]["utility"], "P": report["fup"]["privacy"], "fup": report["fup"]["fup"],
    }


def compare(config: str, profile: str = "quick", output_dir: str | None = None) -> Path:
    start = time.time()
    path = Path(config).resolve()
    spec = read_yaml(path)
    for key in ("base", "models"):
        if key not in spec:
            raise ConfigError(f"{path}: {key}: required")
    base = path.parent / spec["base"]
    common = {"output_dir": output_dir} if output_dir else {}
    base_run = load_run(base, profile, overrides=common)
    out = Path(base_run.output_dir).expanduser().resolve() / f"{spec.get('name', 'compare')}-{datetime.now():%Y%m%d-%H%M%S}"
    rows, grids = [], []
    for i, entry in enumerate(spec["models"]):
        label = entry.get("label") or f"model{i}"
        run = load_run(base, profile, overrides={**(entry.get("overrides") or {}), **common, "name": f"{base_run.name}-{label}"})
        run_dir = out / label.replace("/", "_")
        console.rule(f"[bold]compare[/] {i + 1}/{len(spec['models'])}: {label}")
        try:
            report, gate = simulate_run(run, run_dir), "passed"
        except ReleaseRefused as exc:  # one memorising arm is a finding, not the end of the comparison
            console.print(f"[red]{label}: {exc}")
            report, gate = json.loads((run_dir / "report.json").read_text()), "REFUSED"
        rows.append({**row(label, report), "gate": gate})
        x, y = load_synthetic(release_dir(run_dir) / "synthetic.npz")
        pick = torch.cat([x[y == c][:16] for c in range(run.model.num_classes)])
        grids.append((label, image_grid(pick, f"{label}: 16 per class")))
    result = {"name": spec.get("name", "compare"), "profile": profile, "base": str(base), "wall_time_s": time.time() - start,
              "rows": rows, "columns": dict(COLUMNS), "versions": versions()}
    write_json(out / "report.json", result)
    table = html_table([{title: r[key] for key, title in COLUMNS} for r in rows], [title for _, title in COLUMNS])
    imgs = "".join(f"<div><img src='{uri}'></div>" for _, uri in grids)
    (out / "report.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>fedsynth compare</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}th{{background:#f3f3f3}}</style></head><body>
<h1>fedsynth compare: {html.escape(result['name'])}</h1>
<p>Base {html.escape(str(base))}, profile {html.escape(profile)}; wall time {result['wall_time_s']:.0f} s. Each model's full report is in its own folder.
ε max is n/a for a non-private baseline. Definitions: docs/metrics.md.</p>{table}<h2>Samples</h2>{imgs}</body></html>""", encoding="utf-8")
    console.rule("[bold]Comparison")
    for r in rows:
        console.print("  ".join(f"{k}={fmt(r[k]) if not isinstance(r[k], bool) else r[k]}" for k, _ in COLUMNS))
    console.print(f"Reports: {out / 'report.json'} and {out / 'report.html'}")
    return out


__all__ = ["compare"]
