"""Quality versus privacy: one federation at several ε, against references at the same compute.

``fedsynth curve simulations/demo.yaml --epsilons 1 4 8 inf`` runs, in one folder:

* ``federated ε = e``: the configured federation with every site's budget set to e
  (``inf``: the same federation without DP);
* ``public prior alone``: the round-0 model released as it is (ε = 0 for every site):
  what the sites add is measured against it, or the gain belongs to the public data;
* ``central non-DP`` and ``central DP (ε = max)``: one model trained on the union of the
  training sites' images, from the same prior, for as many steps as all sites together.

Every condition is scored by the same release evaluation (fidelity, synthetic-only AUC,
gain per downstream mode); the privacy audit is skipped (it measures ε, not quality).
Writes ``curve.json``, ``curve.html`` (table and plots) and one run folder per condition.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from common.config import RunConfig, load_run
from common.data import SiteData, load_site
from common.models.generators import build_generator
from common.reporting.figures import line_plot
from common.runtime import pick_device, versions, write_json

console = Console(stderr=True)


def _with_budget(run: RunConfig, epsilon: float) -> RunConfig:
    if math.isinf(epsilon):
        return dataclasses.replace(run, training=dataclasses.replace(run.training, dp=False))
    sites = [s if s.role != "train" else dataclasses.replace(s, privacy=dataclasses.replace(s.privacy, epsilon=epsilon)) for s in run.sites]
    return dataclasses.replace(run, sites=sites)


def _no_audit(run: RunConfig) -> RunConfig:
    ev = run.evaluation
    return dataclasses.replace(run, evaluation=dataclasses.replace(ev, audit=dataclasses.replace(ev.audit, enabled=False)))


def summarise(metrics: dict) -> dict:
    """The curve's figures from one release evaluation."""
    u, f = metrics["utility"], metrics["fidelity"]
    out = {
        "fid": f["fid"],
        "fidelity_score": metrics["fup"]["fidelity"],
        "msssim_synthetic": f["msssim_synthetic"],
        "msssim_real": f["msssim_real"],
        "synthetic_auc_internal": u["synthetic_only"]["internal"]["auc"],
        "synthetic_auc_external": sum(v["auc"] for v in u["synthetic_only"]["external"].values()) / max(1, len(u["synthetic_only"]["external"])),
    }
    for mode in u.get("modes", []):
        for where in ("internal", "external"):
            out[f"{mode}_gain_{where}"] = u[f"{mode}_gain_{where}"]
            out[f"{mode}_gain_{where}_min"] = u[f"{mode}_gain_{where}_min"]
    return out


def _release(run: RunConfig, weights: dict, run_dir: Path, provenance: dict) -> dict:
    """Write a release from ``weights`` the way the server does (manifest: ``provenance``), and score it."""
    from server.synthesis import STAGING, synthesize
    from simulations.evaluate import evaluate_release

    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(weights, run_dir / "global_model.pt")
    write_json(run_dir / "privacy_ledger.json", {})
    synthesize(run, weights, run_dir / STAGING, provenance)  # scored, never released: no gate, no signature
    metrics, _ = evaluate_release(run, run_dir)
    return metrics


def central_weights(run: RunConfig, prior: dict, dp: bool, epsilon: float, state_dir: Path) -> tuple[dict, float | None]:
    """One model on the union of the training sites' images, as many steps as the federation's sites together."""
    from client.trainer import train_round

    sites = [load_site(run, s) for s in run.training_sites]
    # Patients stay the unit where the sites know them (prefixed: two sites' pseudonyms never merge).
    units = None if any(d.train_units is None for d in sites) else [f"{d.name}/{u}" for d in sites for u in d.train_units]
    pooled = SiteData("central", torch.cat([d.train_x for d in sites]), torch.cat([d.train_y for d in sites]),
                      torch.cat([d.holdout_x for d in sites]), torch.cat([d.holdout_y for d in sites]), train_units=units)
    first = run.training_sites[0]
    site = dataclasses.replace(first, name="central", privacy=dataclasses.replace(first.privacy, epsilon=epsilon, units=None))
    training = dataclasses.replace(run.training, dp=dp, local_steps=run.training.local_steps * len(sites),
                                   threads_per_client=max(1, torch.get_num_threads()))
    central = dataclasses.replace(run, training=training)
    weights, spent = prior, None
    for r in range(1, run.training.rounds + 1):
        res = train_round(central, site, pooled, weights, r, state_dir, pick_device())
        weights, spent = res.weights, res.metrics.get("epsilon")
    return weights, spent


def privacy_curve(config: str, epsilons: list[float], profile: str = "quick", output_dir: str | None = None,
                  central: bool = True) -> Path:
    from server.public_prior import public_prior
    from simulations.simulate import new_run_dir, simulate_run

    base = _no_audit(load_run(config, profile, overrides={"output_dir": output_dir} if output_dir else None))
    out = new_run_dir(dataclasses.replace(base, name=f"{base.name}-curve"))
    out.mkdir(parents=True)
    write_json(out / "config.json", {"base": base.to_dict(), "epsilons": epsilons, "central": central, "versions": versions()})
    rows: list[dict] = []

    def record(name: str, epsilon: float | None, metrics: dict, started: float, **extra) -> None:
        rows.append({"condition": name, "epsilon": epsilon, **summarise(metrics), "wall_s": time.time() - started, **extra})
        write_json(out / "curve.json", {"rows": rows})
        console.print(f"[bold]{name}[/]: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)))

    prior, card = None, None
    if base.public_prior is not None:
        t = time.time()
        prior, card = public_prior(base)
        record("public prior alone", 0.0, _release(base, prior, out / "prior_only", {"public_prior": card, "sites": {}}), t, prior=card["name"])
    for eps in epsilons:
        t = time.time()
        run = _with_budget(base, eps)
        report = simulate_run(run, out / f"federated_eps_{eps:g}")
        record(f"federated, eps = {eps:g}", eps, report, t)
    if central:
        start = prior if prior is not None else build_generator(base.model, seed=base.seed).state_dict()
        dp_eps = max((e for e in epsilons if math.isfinite(e)), default=8.0)  # the curve's largest finite budget
        for dp, eps in ((False, math.inf), (True, dp_eps)):
            t = time.time()
            with tempfile.TemporaryDirectory() as state:
                weights, spent = central_weights(base, start, dp, dp_eps, Path(state))
            name = f"central DP, eps = {eps:g}" if dp else "central non-DP"
            provenance = {"public_prior": card, "central": {"dp": dp, "epsilon": spent, "delta": base.training_sites[0].privacy.delta}}
            record(name, eps if dp else math.inf, _release(base, weights, out / name.replace(" ", "_").replace(",", "").replace("=", ""), provenance), t,
                   epsilon_spent=spent)
    write_json(out / "curve.json", {"rows": rows})
    (out / "curve.html").write_text(render(rows, base), encoding="utf-8")
    console.print(f"wrote {out / 'curve.json'} and {out / 'curve.html'}")
    return out


def render(rows: list[dict], run: RunConfig) -> str:
    from common.reporting.report import html_table

    fed = [r for r in rows if r["condition"].startswith("federated") and not math.isinf(r["epsilon"])]
    xs = [r["epsilon"] for r in fed]
    refs = {r["condition"]: r for r in rows if not r["condition"].startswith("federated") or math.isinf(r["epsilon"])}
    plots = []
    for key, title in (("fidelity_score", "Fidelity F (0-100)"), ("synthetic_auc_internal", "Synthetic-only AUC, internal"),
                       ("synthetic_auc_external", "Synthetic-only AUC, external")):
        hlines = {name: r[key] for name, r in refs.items()}
        plots.append(line_plot({"federated DP": (xs, [r[key] for r in fed])}, title, "ε per site", key, hlines))
    cols = [c for c in rows[0] if c not in ("wall_s",)] + ["wall_s"]
    imgs = "".join(f"<img src='{p}'>" for p in plots)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>quality vs privacy: {run.name}</title>"
            "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>"
            f"<h1>Quality versus privacy: {run.name}</h1><p>Same compute for every condition; audit skipped. "
            f"Horizontal lines: references (prior alone, no DP, central).</p>{html_table(rows, cols)}{imgs}</body></html>")
