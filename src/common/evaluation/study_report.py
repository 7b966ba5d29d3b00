"""study.html: the study's tables (mean ± SD, 95% CI, paired tests, effect sizes) and its plots."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..reporting.figures import to_data_uri  # noqa: E402
from ..reporting.report import fmt, html_table  # noqa: E402


def ratio_plot(ablation: dict, arm: str) -> str:
    """Mean AUC gain over real-only against the synthetic:real ratio, with its 95% CI, per mode and test set."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for mode, by_where in ablation.items():
        for where, by_ratio in by_where.items():
            rs = sorted(by_ratio, key=float)
            xs = [float(r) for r in rs]
            means = [by_ratio[r]["mean"] for r in rs]
            err = [[m - by_ratio[r]["ci"][0] for m, r in zip(means, rs)], [by_ratio[r]["ci"][1] - m for m, r in zip(means, rs)]]
            ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, label=f"{mode}, {where}")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("synthetic images per real image")
    ax.set_ylabel("AUC gain over real-only")
    ax.set_title(f"{arm}: synthetic:real ratio ablation (mean, 95% CI)", fontsize=9)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def _ci(d: dict) -> str:
    return f"[{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]"


def write_study_report(result: dict, out: Path) -> Path:
    a = result["analysis"]
    parts = []
    for arm, figs in a["conditions"].items():
        rows = [{"figure": f, "mean": d["mean"], "SD": d["sd"], "95% CI": _ci(d), "n": d["n"]} for f, d in figs.items()]
        parts.append(f"<h2>{html.escape(arm)}: release figures over seeds x folds</h2>{html_table(rows, ['figure', 'mean', 'SD', '95% CI', 'n'])}")
        trows = []
        for test, t in a["real_vs_hybrid"][arm].items():
            for level, tt in (("seed x fold x site", t), ("cell (sites averaged)", t["cell_level"])):
                trows.append({"comparison": f"{test} (ratio {t['ratio']})", "unit": level, "real-only": tt["mean_a"], "hybrid": tt["mean_b"],
                              "gain": tt["diff"]["mean"], "95% CI": _ci(tt["diff"]), "t-test p": tt["t_p"], "Wilcoxon p": tt["wilcoxon_p"],
                              "Cohen's d": tt["cohens_d"], "n": tt["n"]})
        parts.append("<h3>Real-only vs hybrid (same real images, same real-data optimiser steps)</h3>"
                     + html_table(trows, ["comparison", "unit", "real-only", "hybrid", "gain", "95% CI", "t-test p", "Wilcoxon p", "Cohen's d", "n"]))
        parts.append(f"<h3>Synthetic:real ratio ablation</h3><img src='{ratio_plot(a['ratio_ablation'][arm], arm)}'>")
        arows = [{"mode": m, "test set": w, "ratio": r, "gain": d["mean"], "SD": d["sd"], "95% CI": _ci(d), "n": d["n"]}
                 for m, bw in a["ratio_ablation"][arm].items() for w, br in bw.items() for r, d in sorted(br.items(), key=lambda kv: float(kv[0]))]
        parts.append(html_table(arows, ["mode", "test set", "ratio", "gain", "SD", "95% CI", "n"]))
    for pair, figs in a["generators"].items():
        rows = [{"figure": f, "first": t["mean_a"], "second": t["mean_b"], "difference": t["diff"]["mean"], "95% CI": _ci(t["diff"]),
                 "t-test p": t["t_p"], "Wilcoxon p": t["wilcoxon_p"], "Cohen's d": t["cohens_d"], "n": t["n"]} for f, t in figs.items()]
        parts.append(f"<h2>Generators: {html.escape(pair)} (paired on seed x fold)</h2>"
                     + html_table(rows, ["figure", "first", "second", "difference", "95% CI", "t-test p", "Wilcoxon p", "Cohen's d", "n"]))
    proto = result["protocol"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedsynth study: {html.escape(result['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}th{{background:#f3f3f3}}td:first-child{{text-align:left}}</style></head><body>
<h1>fedsynth study: {html.escape(result['name'])} ({html.escape(result['profile'])})</h1>
<p>Seeds {proto['seeds']} x {proto['folds']} patient-disjoint folds per arm; ratios {proto['ratios']}; wall time {result['wall_time_s']:.0f} s.
Intervals: Student-t on the mean. Tests: paired t-test and Wilcoxon signed-rank; Cohen's d_z = mean difference / SD of differences.
With few cells, p-values are coarse (a Wilcoxon test on n pairs cannot go below 2/2^n); read the intervals. Definitions: docs/metrics.md.</p>
{''.join(parts)}</body></html>"""
    path = out / "study.html"
    path.write_text(page, encoding="utf-8")
    return path
