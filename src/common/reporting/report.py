"""Write ``report.json`` (every figure, machine-readable) and ``report.html`` (for people)."""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..runtime import write_json
from .figures import image_grid, line_plot, samples_figure


def write_reports(report: dict, previews: dict, history: dict, run_dir: Path) -> tuple[Path, Path]:
    write_json(run_dir / "report.json", report)
    path = run_dir / "report.html"
    path.write_text(render_html(report, previews, history), encoding="utf-8")
    samples_figure(previews, run_dir / "samples.png")  # real beside synthetic, per class, as a file
    return run_dir / "report.json", path


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _per_site_series(entries: list[dict], key: str) -> dict[str, tuple[list[float], list[float]]]:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for e in entries:
        if key in e:
            xs, ys = series.setdefault(e["site"], ([], []))
            xs.append(e["round"])
            ys.append(e[key])
    return series


def render_html(report: dict, previews: dict, history: dict) -> str:
    h, fid, util, priv, fup = (report[k] for k in ("headline", "fidelity", "utility", "privacy", "fup"))
    grids = "".join(
        f"<div class='pair'><img src='{image_grid(previews['real'][c], f'real, class {c}')}'>"
        f"<img src='{image_grid(previews['synthetic'][c], f'synthetic, class {c}')}'></div>"
        for c in sorted(previews["real"])
    )
    # Losses never leave a site; a simulation's researcher holds the sites' local logs.
    local = [{"site": site, **e} for site, entries in history.get("local", {}).items() for e in entries]
    loss = line_plot(
        # Two different losses: training batches at uniform t (under DP), held-out images at fixed
        # t = 50-300 (Generator.membership_scores). Each is comparable across rounds, not with the other.
        {**{f"{s} train (all t)": v for s, v in _per_site_series([e for e in local if e.get("kind") == "train"], "train_loss").items()},
         **{f"{s} held-out (t 50-300)": v for s, v in _per_site_series([e for e in local if e.get("kind") == "evaluate"], "heldout_loss").items()}},
        "Loss per round (sites' local logs; the two kinds differ in t)", "round", "loss",
    )
    by_budget: dict[float, list[str]] = {}
    for s, p in priv["sites"].items():
        if p["epsilon_budget"] is not None:
            by_budget.setdefault(p["epsilon_budget"], []).append(s)
    budgets = {f"budget of {', '.join(names)}": b for b, names in by_budget.items()}
    eps = line_plot(_per_site_series(history["train"], "epsilon"), "ε spent per round per site", "round", "ε", budgets)

    headline_rows = [{"figure": k, "value": v if not isinstance(v, dict) else ", ".join(f"{s}: {fmt(e)}" for s, e in v.items())} for k, v in h.items()]
    util_rows = []
    modes = util.get("modes", ["hybrid"])
    for name, s in util["sites"].items():
        for way in ("real_only", *modes):
            r = s[way]
            ext = next(iter(r["external"].values()), {})
            util_rows.append({"model": f"{name}: {way}", "train images": r["train_images"], **{f"int {k}": v for k, v in r["internal"].items()}, **{f"ext {k}": v for k, v in ext.items()}})
    gain_rows = [{"site": name, "real train images": s.get("train_images", ""),
                  **{f"{m} {w}": s.get(f"{m}_gain_{w}", s.get(f"auc_gain_{w}")) for m in modes for w in ("internal", "external")}}
                 for name, s in util["sites"].items()]
    by_size = sorted(util["sites"].items(), key=lambda kv: kv[1].get("train_images", 0))
    gain_plot = line_plot({f"{m} {w}": ([s.get("train_images", 0) for _, s in by_size], [s.get(f"{m}_gain_{w}", 0.0) for _, s in by_size])
                           for m in modes for w in ("internal", "external")},
                          "AUC gain over real-only against site size", "site's real training images", "AUC gain", {"no gain": 0.0})
    gcols = ["site", "real train images"] + [f"{m} {w}" for m in modes for w in ("internal", "external")]
    prior = report.get("public_prior")
    prior_html = ("<p>Training started from random weights (no public prior).</p>" if not prior else
                  f"<p>Round 0 was pretrained without DP on <b>{html.escape(prior['name'])}</b>: {html.escape(prior.get('description', ''))} "
                  f"{prior['images']} images (per class {prior['class_counts']}), data SHA-256 <code>{prior['data_sha256']}</code>, "
                  f"{prior['steps']} steps; model SHA-256 <code>{prior['model_sha256'][:16]}...</code>. No site data entered this stage. "
                  f"Sites then trained ({html.escape(', '.join(report['run']['config']['training']['trainable']))}) under DP.</p>")
    for way in ("synthetic_only", "pooled_real"):
        r = util[way]
        ext = next(iter(r["external"].values()), {})
        util_rows.append({"model": way, "train images": r["train_images"], **{f"int {k}": v for k, v in r["internal"].items()}, **{f"ext {k}": v for k, v in ext.items()}})
    ucols = ["model", "train images"] + [f"{p} {m}" for p in ("int", "ext") for m in ("auc", "accuracy", "sensitivity", "specificity")]
    priv_rows = [{"site": s, **p, "mi_auc_ci95": ", ".join(f"{v:.3f}" for v in p.get("mi_auc_ci95") or [])} for s, p in priv["sites"].items()]
    pcols = ["site", "epsilon", "epsilon_lower", "epsilon_budget", "delta", "accountant", "privacy_unit", "max_records_per_unit",
             "rounds_trained", "mi_auc", "mi_auc_ci95", "mi_members", "mi_nonmembers", "mi_tpr_at_1pct_fpr"]
    rel = priv.get("release", {})
    rel_rows = [{"test": "DCR, equal-size sets: share closer to pooled training than to pooled held-out (0.5 = none)",
                 "value": rel.get("dcr_share_closer_to_train"), "detail": f"binomial p = {fmt(rel.get('dcr_binomial_p'))} (assumes independent queries); n = {rel.get('dcr_images')}"},
                {"test": "DCR, all members vs all held-out: share nearer a member", "value": rel.get("dcr_share_full"),
                 "detail": f"permutation p = {fmt(rel.get('dcr_p_value'))}; null mean {fmt(rel.get('dcr_null_mean'))}, 95th pct {fmt(rel.get('dcr_null_q95'))}; "
                           f"excess {fmt(rel.get('dcr_excess'))} (0 = chance, 1 = copies)"},
                {"test": f"re-identification rate (chance {fmt(rel.get('reid_quantile'))})", "value": rel.get("reid_rate"), "detail": f"threshold {fmt(rel.get('reid_threshold'))}"},
                {"test": "exact duplicates of a training image", "value": rel.get("exact_duplicates"), "detail": ""},
                {"test": "near duplicates (closer than any real held-out image)", "value": rel.get("near_duplicates"), "detail": f"share {fmt(rel.get('near_duplicate_share'))}"},
                {"test": "density-ratio membership attack AUC (released images only)", "value": rel.get("domias", {}).get("auc"),
                 "detail": "95% CI " + ", ".join(fmt(v) for v in rel.get("domias", {}).get("auc_ci95", []))}]
    ref, null = fid.get("reference", {}), fid.get("null", {})
    fcols = ["against", "fid", "kid", "kid_std", "precision", "recall", "density", "coverage"]
    fid_rows = [{"against": "release vs pooled held-out", **{c: fid.get(c) for c in fcols[1:]}},
                {"against": "real train vs held-out (reference: F = 100)", **{c: ref.get(c) for c in fcols[1:]}},
                {"against": "uniform noise (reference: F = 0)", **{c: null.get(c) for c in fcols[1:]}}]
    fid_rows += [{"against": f"site {s}", **v} for s, v in fid["sites"].items()]
    class_rows = [{"class": c, "release fid": (v or {}).get("fid"), "reference fid": (fid.get("per_class_reference", {}).get(c) or {}).get("fid"),
                   "noise fid": (fid.get("per_class_null", {}).get(c) or {}).get("fid"), "images": (v or {}).get("images", "missing")}
                  for c, v in fid.get("per_class", {}).items()]
    ex = fid["extractor"]
    ex_html = (f"Extractor: <b>{html.escape(ex['name'])}</b>{' (FALLBACK: ' + html.escape(ex.get('why', '')) + ')' if ex.get('fallback') else ''}, "
               f"weights SHA-256 <code>{html.escape(str(ex.get('weights_sha256', 'n/a'))[:16])}...</code>"
               + (f"; trained on {html.escape(ex['trained_on']['name'])} ({ex['trained_on']['images']} public images), recipe "
                  f"<code>{html.escape(str(ex['recipe']))}</code>" if ex.get("trained_on") else ""))
    ratio_plot = ""
    if len(util.get("ratios", [])) > 1:
        ratio_plot = "<img src='" + line_plot(
            {f"{site} {modes[0]}": (util["ratios"], [s["ratios"][str(r)][modes[0]]["gain_internal"] for r in util["ratios"]]) for site, s in util["sites"].items()},
            "Internal AUC gain against synthetic:real ratio", "synthetic images per real image", "AUC gain", {"no gain": 0.0}) + "'>"
    run = report["run"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fedsynth report: {html.escape(run['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}th{{background:#f3f3f3}}td:first-child{{text-align:left}}.pair img{{margin-right:1em}}</style></head><body>
<h1>fedsynth report: {html.escape(run['name'])}</h1>
<p>Profile <b>{html.escape(run['profile'])}</b>, seed {run['seed']}, {run['rounds']} rounds, wall time {fmt(run['wall_time_s'])} s. Config and versions are in report.json.</p>
<h2>Headline</h2>{html_table(headline_rows, ['figure', 'value'])}
<h2>FUP score: {fup['fup']:.1f} / 100</h2>
{html_table([fup], ['fidelity', 'utility', 'privacy', 'privacy_attack', 'privacy_guarantee', 'epsilon', 'fup'])}
<p>FUP is the geometric mean of the pillars; P is half the weakest release attack's score, half the (&epsilon;, &delta;) guarantee. Definitions: docs/metrics.md.</p>
<h2>Public prior</h2>{prior_html}
<h2>Samples: real (held-out) vs synthetic, per class</h2>{grids}
<h2>Training</h2><img src="{loss}"><img src="{eps}">
<h2>Fidelity</h2><p>{ex_html}. Every comparison uses the same number of images on both sides ({fid['images']} overall).
MS-SSIM within class (lower = more diverse): synthetic {fid['msssim_synthetic']:.3f}, real {fid['msssim_real']:.3f}.</p>
{html_table(fid_rows, fcols)}<h3>Per class (F is the mean of the per-class scores; a missing class scores 0)</h3>
{html_table(class_rows, ['class', 'release fid', 'reference fid', 'noise fid', 'images'])}
<h2>Utility (downstream classifier)</h2>
<p>Mean AUC gain over real-only of the headline mode ({html.escape(modes[0])}): internal {util['auc_gain_internal']:+.4f}, external {util['auc_gain_external']:+.4f}.
Every mode's real-data phase takes as many optimiser steps as real-only training (docs/metrics.md).</p>
<h3>AUC gain over real-only, per site and mode</h3>{html_table(gain_rows, gcols)}<img src="{gain_plot}">{ratio_plot}
{html_table(util_rows, ucols)}
<h2>Privacy</h2><h3>The release against the pooled training data (the same attacks for every generator)</h3>
{html_table(rel_rows, ['test', 'value', 'detail'])}<h3>Per site: accounted &epsilon; and the model's loss attack (all members and non-members)</h3>{html_table(priv_rows, pcols)}
<p>&epsilon;: accounted by the site's ledger (an upper bound). epsilon_lower: the empirical audit's 95 % lower bound
(gradient canaries, one training run; docs/privacy.md), to be read against the audit run's own accounted &epsilon;
(report.json: privacy.sites.*.audit). A lower bound above it would mean the mechanism leaks more than its ledger says.</p>
</body></html>"""
