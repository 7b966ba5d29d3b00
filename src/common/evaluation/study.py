"""``fedsynth study``: a federation and its evaluation over seeds x patient-disjoint folds.

The protocol of the first reference paper (means over seeds x folds, paired tests, effect
sizes, a synthetic:real ratio ablation, internal and external validation), as one command:

* a *cell* is one (arm, seed, fold): the run config with ``seed`` and ``partition.fold`` set
  (each site's held-out set is one of ``study.folds`` label-stratified groups of its units,
  patients where known), federated and evaluated into ``cells/<arm>/seed<s>-fold<f>/``;
  ``cell.json`` is written last and atomically, so a rerun with ``--resume`` keeps every
  finished cell and continues an unfinished federation from its last checkpoint;
* real-only vs hybrid, per downstream mode and ratio, is paired on the unit
  (arm, seed, fold, site): the same real images, the same real-data optimiser steps;
* generator vs generator is paired on (seed, fold) for release figures and on
  (seed, fold, site) for downstream gains.

Tests: paired t-test and Wilcoxon signed-rank (scipy), Cohen's d_z = mean(diff) / SD(diff);
intervals: Student-t on the mean. Sites of one cell share the release, so site-level pairs
are not fully independent; the cell-level test (sites averaged) is reported beside it.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from scipy import stats

from ..config import RunConfig, StudyArm, load_run
from ..runtime import versions, write_json

RELEASE_FIGURES = ["fup", "fidelity_F", "utility_U", "privacy_P", "fid", "coverage", "precision", "recall",
                   "synthetic_auc_internal", "synthetic_auc_external", "dcr_share_closer_to_train", "dcr_excess", "domias_auc", "mi_auc_max"]


# ---------------------------------------------------------------------- statistics
def describe(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, SD and the Student-t confidence interval of the mean."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    out = {"n": int(len(a)), "mean": float(a.mean()) if len(a) else float("nan"), "sd": float(a.std(ddof=1)) if len(a) > 1 else float("nan")}
    if len(a) > 1 and out["sd"] > 0:
        lo, hi = stats.t.interval(confidence, len(a) - 1, loc=out["mean"], scale=out["sd"] / math.sqrt(len(a)))
        out["ci"] = [float(lo), float(hi)]
    else:
        out["ci"] = [out["mean"], out["mean"]]
    return out


def paired(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """b - a: paired t-test, Wilcoxon signed-rank, Cohen's d_z and the interval of the mean difference."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    d = y - x
    out = {"n": int(len(d)), "mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": describe(d.tolist(), confidence)}
    if len(d) < 2 or np.allclose(d, d[0]):
        return {**out, "t": None, "t_p": None, "wilcoxon_p": None, "cohens_d": None, "note": "fewer than two pairs, or no variation"}
    t = stats.ttest_rel(y, x)
    w = stats.wilcoxon(y, x) if np.any(d != 0) else None
    return {**out, "t": float(t.statistic), "t_p": float(t.pvalue), "wilcoxon_p": None if w is None else float(w.pvalue),
            "cohens_d": float(d.mean() / d.std(ddof=1))}


# ---------------------------------------------------------------------------- cells
def cell_summary(metrics: dict, run: RunConfig) -> dict:
    """What the study keeps of one cell's evaluation."""
    u, f, p, fup = metrics["utility"], metrics["fidelity"], metrics["privacy"], metrics["fup"]
    ext = lambda r: float(np.mean([v["auc"] for v in r["external"].values()])) if r["external"] else float("nan")  # noqa: E731
    release = {
        "fup": fup["fup"], "fidelity_F": fup["fidelity"], "utility_U": fup["utility"], "privacy_P": fup["privacy"],
        "fid": f["fid"], "coverage": f["coverage"], "precision": f["precision"], "recall": f["recall"],
        "synthetic_auc_internal": u["synthetic_only"]["internal"]["auc"], "synthetic_auc_external": ext(u["synthetic_only"]),
        "dcr_share_closer_to_train": p["release"]["dcr_share_closer_to_train"], "dcr_excess": p["release"]["dcr_excess"], "domias_auc": p["release"]["domias"]["auc"],
        "mi_auc_max": p["mi_auc_max"], "epsilon_max": p["epsilon_max"],
    }
    sites = {}
    for name, s in u["sites"].items():
        row = {"real_only": {"internal": s["real_only"]["internal"]["auc"], "external": ext(s["real_only"])}, "arms": {}}
        for ratio, modes in s["ratios"].items():
            for mode, arm in modes.items():
                base = s[arm["baseline"]]  # the real-only classifier with the arm's number of optimiser steps
                row["arms"][f"{mode}@{ratio}"] = {"internal": arm["internal"]["auc"], "external": ext(arm),
                                                  "baseline_internal": base["internal"]["auc"], "baseline_external": ext(base)}
        sites[name] = row
    return {"release": release, "sites": sites, "seed": run.seed, "fold": run.partition.fold}


def run_cell(run: RunConfig, cell_dir: Path, ratios: list[float]) -> dict:
    """Federate (or continue) and evaluate one cell; cell.json is written last."""
    from server.synthesis import release_dir
    from simulations.evaluate import evaluate_release
    from simulations.simulate import run_federation

    done = cell_dir / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json(cell_dir / "config.json", run.to_dict())
    start = time.time()
    if not (release_dir(cell_dir) / "synthetic.npz").exists():
        run_federation(run, cell_dir)  # continues from the last checkpoint after an interruption
    metrics, _ = evaluate_release(run, cell_dir, ratios)
    write_json(cell_dir / "metrics.json", metrics)
    from .gate import check

    summary = {**cell_summary(metrics, run), "gate": check(metrics["privacy"]["release"], run.evaluation.gate)["failed"],
               "wall_time_s": time.time() - start}
    write_json(done, summary)  # atomic (write_json): a cell is either finished or redone
    return summary


# ---------------------------------------------------------------------- aggregation
def analyse(cells: dict[str, dict[tuple[int, int], dict]], run: RunConfig) -> dict:
    cfg, conf = run.study, run.study.confidence
    modes = list(run.evaluation.downstream.modes)
    ratio = str(float(run.evaluation.downstream.ratio))
    out: dict = {"conditions": {}, "real_vs_hybrid": {}, "ratio_ablation": {}, "generators": {}}
    for arm, grid in cells.items():
        keys = sorted(grid)
        out["conditions"][arm] = {fig: describe([grid[k]["release"][fig] for k in keys], conf) for fig in RELEASE_FIGURES}
        units = [(k, site) for k in keys for site in sorted(grid[k]["sites"])]
        arm_tests, ablation = {}, {}
        for mode in modes:
            for where in ("internal", "external"):
                def arm_of(k, s, key):
                    return grid[k]["sites"][s]["arms"][key]

                for r in cfg.ratios if mode == modes[0] else []:  # the ablation runs on the headline mode
                    key = f"{mode}@{float(r)}"
                    gains = [arm_of(k, s, key)[where] - arm_of(k, s, key)[f"baseline_{where}"] for k, s in units]
                    ablation.setdefault(mode, {}).setdefault(where, {})[str(float(r))] = describe(gains, conf)
                key = f"{mode}@{ratio}"
                real = [arm_of(k, s, key)[f"baseline_{where}"] for k, s in units]  # equal optimiser steps
                hyb = [arm_of(k, s, key)[where] for k, s in units]
                # Cell level: sites averaged, one pair per (seed, fold).
                cell_real = [np.mean([arm_of(k, s, key)[f"baseline_{where}"] for s in grid[k]["sites"]]) for k in keys]
                cell_hyb = [np.mean([arm_of(k, s, key)[where] for s in grid[k]["sites"]]) for k in keys]
                arm_tests[f"{mode}_{where}"] = {"unit": "seed x fold x site", "ratio": float(ratio), **paired(real, hyb, conf),
                                                "cell_level": paired(cell_real, cell_hyb, conf)}
        out["real_vs_hybrid"][arm], out["ratio_ablation"][arm] = arm_tests, ablation
    for a, b in itertools.combinations(cells, 2):
        common = sorted(set(cells[a]) & set(cells[b]))
        out["generators"][f"{b} - {a}"] = {
            fig: paired([cells[a][k]["release"][fig] for k in common], [cells[b][k]["release"][fig] for k in common], conf)
            for fig in RELEASE_FIGURES if all(cells[x][k]["release"][fig] is not None for x in (a, b) for k in common)
        }
    return out


def headline_table(analysis: dict) -> list[dict]:
    rows = []
    for arm, figs in analysis["conditions"].items():
        for fig in ("fup", "fidelity_F", "utility_U", "privacy_P", "fid", "synthetic_auc_internal", "synthetic_auc_external"):
            d = figs[fig]
            rows.append({"arm": arm, "figure": fig, "mean": d["mean"], "sd": d["sd"], "ci95": d["ci"], "n": d["n"]})
        for test, t in analysis["real_vs_hybrid"][arm].items():
            rows.append({"arm": arm, "figure": f"AUC gain {test}", "mean": t["diff"]["mean"], "sd": t["diff"]["sd"], "ci95": t["diff"]["ci"],
                         "n": t["n"], "t_p": t["t_p"], "wilcoxon_p": t["wilcoxon_p"], "cohens_d": t["cohens_d"]})
    return rows


# ------------------------------------------------------------------------------ run
def study_runs(config: str, profile: str, output_dir: str | None) -> tuple[RunConfig, dict[str, list[RunConfig]]]:
    base_over = {"output_dir": output_dir} if output_dir else {}
    base = load_run(config, profile, overrides=base_over)
    arms = base.study.arms or [StudyArm(label=base.model.name)]
    runs: dict[str, list[RunConfig]] = {}
    for arm in arms:
        for seed in base.study.seeds:
            for fold in range(base.study.folds):
                over = {**arm.overrides, **base_over, "seed": seed, "name": f"{base.name}-{arm.label}",
                        # The same hospitals (and public share) in every cell: the base run's partition.
                        "partition": {**arm.overrides.get("partition", {}), "folds": base.study.folds, "fold": fold,
                                      "seed": base.partition.seed if base.partition.seed is not None else base.seed},
                        # The canary audit is a separate, long experiment (fedsynth audit); a study repeats the release scoring.
                        "evaluation": {**arm.overrides.get("evaluation", {}), "audit": {"enabled": False}}}
                if base.public_prior is not None:  # one public checkpoint for every cell (its seed: the base run's)
                    over["public_prior"] = {**arm.overrides.get("public_prior", {}), "seed": base.public_prior.seed_for(base.seed)}
                runs.setdefault(arm.label, []).append(load_run(config, profile, overrides=over))
    return base, runs


def run_study(config: str, profile: str = "quick", output_dir: str | None = None, resume: str | None = None) -> Path:
    from rich.console import Console

    from .study_report import write_study_report

    console = Console(stderr=True)
    base, runs = study_runs(config, profile, output_dir)
    root = Path(base.output_dir).expanduser().resolve()
    out = Path(resume).resolve() if resume else root / f"study-{base.name}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    spec = {"config": str(Path(config).resolve()), "profile": profile, "study": base.to_dict()["study"],
            "run": json.loads(json.dumps(base.to_dict(), default=str)), "versions": versions()}
    if resume and (out / "study_spec.json").exists():
        old = json.loads((out / "study_spec.json").read_text())
        if old["run"] != spec["run"] or old["profile"] != profile:
            raise ValueError(f"{out}: --resume: the configuration or profile changed since this study started; "
                             "finished cells would not be comparable with new ones")
    write_json(out / "study_spec.json", spec)
    start = time.time()
    total = sum(len(v) for v in runs.values())
    cells: dict[str, dict[tuple[int, int], dict]] = {}
    i = 0
    for label, arm_runs in runs.items():
        for run in arm_runs:
            i += 1
            cell_dir = out / "cells" / label.replace("/", "_") / f"seed{run.seed}-fold{run.partition.fold}"
            state = "kept" if (cell_dir / "cell.json").exists() else "running"
            console.rule(f"[bold]study[/] cell {i}/{total}: {label}, seed {run.seed}, fold {run.partition.fold} ({state}; "
                         f"{time.time() - start:.0f} s so far)")
            cells.setdefault(label, {})[(run.seed, run.partition.fold)] = run_cell(run, cell_dir, base.study.ratios)
    analysis = analyse(cells, base)
    result = {"name": base.name, "profile": profile, "protocol": spec["study"], "cells": {
        arm: {f"seed{s}-fold{f}": c for (s, f), c in grid.items()} for arm, grid in cells.items()},
        "analysis": analysis, "headline": headline_table(analysis), "wall_time_s": time.time() - start, "versions": versions()}
    write_json(out / "study.json", result)
    write_study_report(result, out)
    console.print(f"Study finished in {time.time() - start:.0f} s: {out / 'study.html'}")
    return out
