"""Score a synthetic release on Fidelity, Utility and Privacy, against real images.

In a simulation the researcher holds every site's data, so this runs in one
process; each per-site block uses only that site's images, as a site's own
evaluation would. Pooled-real training (d) is the simulation-only upper bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.config import RunConfig, site_state_dir
from common.data import SiteData, load_site
from common.evaluation.audit import audit_site
from common.evaluation.release import Pool, ReleaseScorer
from common.metrics.attacks import attack_metrics
from common.metrics.fidelity import msssim_diversity
from common.metrics.utility import real_steps, train_classifier, train_with_synthetic
from common.models.generators import build_generator
from common.privacy import PrivacyLedger
from common.reporting.run_folder import STATUS, read_json
from common.runtime import pick_device, sha256_file
from client.client_app import SENT_METRICS
from server.synthesis import load_synthetic, release_dir

UNIT_NOTES = {
    "patient": "",
    "scan": "some scans carry no patient id; each such scan is its own unit (a patient with k of them: group privacy, k x epsilon)",
    "image": "no patient ids in this source; each image is treated as one person",
}
# What else a site sent besides its DP-SGD weights (and why it may): client.client_app.SENT_METRICS.
RELEASED = ["model weights (DP-SGD, accounted)", *(f"{k}: {why}" for k, why in SENT_METRICS.items())]


def _subsample(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def known_spend(run: RunConfig, run_dir: Path, ledger: dict, site, simulated: bool) -> dict:
    """What the report may say ``site`` spent: never less than it did.

    The coordinator's ledger holds what replies said; a site whose reply was lost after it
    committed (a timeout, a straggler, a crash) spent more. In a simulation this machine holds
    every site's own sealed ledger: the report takes the larger figure, and a site with no ledger
    never trained (its ledger is written before its first step). In a deployment a site that
    never replied is reported at its budget, which its own ledger enforces
    (``epsilon_upper_bound_only``). None: trained without DP."""
    entry = dict(ledger.get(site.name, {}))
    if not run.training.dp:
        return {**entry, "epsilon": None, "delta": None}
    entry.setdefault("epsilon_budget", site.privacy.epsilon)
    entry.setdefault("delta", site.privacy.delta)
    folder = site_state_dir(site) if site.state_dir else run_dir / "clients" / site.name
    if simulated:
        own = folder / "privacy_ledger.json"
        spent = PrivacyLedger(own, site.privacy.epsilon, site.privacy.delta, run.training.accountant).spent if own.exists() else 0.0
        entry["epsilon"] = max(spent, entry.get("epsilon") or 0.0)
    elif entry.get("epsilon") is None:
        entry.update(epsilon=site.privacy.epsilon, epsilon_upper_bound_only=True)
    return entry


def worst_site_budget(spent: list[dict]) -> tuple[float | None, float | None]:
    """(epsilon, delta) of the site with the largest epsilon; (None, None) when any site trained without DP."""
    if not spent or any(p.get("epsilon") is None for p in spent):
        return None, None
    worst = max(spent, key=lambda p: p["epsilon"])
    return worst["epsilon"], worst["delta"]


def downstream(scorer: ReleaseScorer, sites: dict[str, SiteData], train_names: list[str], syn: tuple[torch.Tensor, torch.Tensor],
               ratios: list[float], progress: tqdm | None = None) -> dict:
    """Per site: real-only, then each ``evaluation.downstream`` mode at ``ratios`` synthetic per real image.
    Every arm gets the real-only arm's optimiser steps on real data (utility.real_steps)."""
    run, device = scorer.run, scorer.device
    ev, k, size = run.evaluation, run.model.num_classes, run.model.image_size
    out = {}
    for i, name in enumerate(train_names):
        s, seed = sites[name], run.seed + 100 + i
        row = {"train_images": len(s.train_x), "real_only": scorer.fit_and_score(s.train_x, s.train_y, seed), "ratios": {}}
        for ratio in ratios:
            # Every mode at the configured ratio; the ablation's other ratios on the headline mode.
            for mode in ev.downstream.modes if ratio == ev.downstream.ratio else ev.downstream.modes[:1]:
                model, n_syn = train_with_synthetic(mode, ratio, ev.classifier, (s.train_x, s.train_y), syn, size, k, seed, device)
                steps = real_steps(ev.classifier, len(s.train_x)) + (real_steps(ev.classifier, n_syn) if mode == "pretrain_finetune" else 0)
                arm = {"train_images": len(s.train_x) + n_syn, "synthetic_images": n_syn, "steps": steps, **scorer.classifier_scores(model)}
                # The baseline takes as many optimiser steps as the arm (pretraining steps included),
                # all on the real images: a gain is the data's, not extra training.
                key = f"real_only_{steps}_steps"
                if steps == real_steps(ev.classifier, len(s.train_x)):
                    base = row["real_only"]
                else:
                    if key not in row:
                        model = train_classifier(ev.classifier, s.train_x, s.train_y, size, k, seed, device, steps)
                        row[key] = {"train_images": len(s.train_x), "steps": steps, **scorer.classifier_scores(model)}
                    base = row[key]
                arm["baseline"] = "real_only" if base is row["real_only"] else key
                arm["gain_internal"] = arm["internal"]["auc"] - base["internal"]["auc"]
                arm["gain_external"] = _mean([arm["external"][e]["auc"] - base["external"][e]["auc"] for e in arm["external"]])
                row["ratios"].setdefault(str(ratio), {})[mode] = arm
                if progress is not None:
                    progress.update()
        out[name] = row
    return out


def evaluate_release(run: RunConfig, run_dir: Path, ratios: list[float] | None = None) -> tuple[dict, dict]:
    """Returns (metrics for report.json, preview images per class for the HTML report).
    ``ratios``: synthetic:real ratios of the downstream ablation (default: ``downstream.ratio`` only)."""
    device = pick_device()
    ev = run.evaluation
    sites: dict[str, SiteData] = {s.name: load_site(run, s) for s in tqdm(run.sites, desc="loading sites")}
    train_names = [s.name for s in run.training_sites]
    ext_names = [s.name for s in run.external_sites]
    syn_x, syn_y = load_synthetic(release_dir(run_dir) / "synthetic.npz")
    generator = build_generator(run.model)
    generator.load_state_dict(torch.load(run_dir / "global_model.pt", map_location="cpu"))
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    pool = Pool.from_sites(sites, train_names, ext_names)
    scorer = ReleaseScorer(run, pool, device)
    status, _ = read_json(run_dir / STATUS)
    simulated = isinstance(status, dict) and status.get("mode") == "simulate"  # the sites' own folders are in this run folder
    spends = {s.name: known_spend(run, run_dir, ledger, s, simulated) for s in run.training_sites}
    epsilon, delta = worst_site_budget(list(spends.values()))
    scored = scorer.score(syn_x, syn_y, epsilon, delta)

    # ------------------------------------------------------------ fidelity
    fidelity = {
        **scored["fidelity"],
        "msssim_synthetic": msssim_diversity(syn_x, syn_y, ev.fidelity.msssim_pairs, run.seed),
        "msssim_real": msssim_diversity(pool.hold_x, pool.hold_y, ev.fidelity.msssim_pairs, run.seed),
        "sites": {name: scorer.site_fid(sites[name].holdout_x if name in train_names else pool.external[name][0], scored["features"])
                  for name in train_names + ext_names},
    }

    # ------------------------------------------------------------- utility
    down = ev.downstream
    ratios = sorted(set(ratios or [down.ratio]) | {down.ratio})
    progress = tqdm(total=(len(ratios) - 1 + len(down.modes)) * len(train_names), desc="downstream classifiers")
    per_site = downstream(scorer, sites, train_names, (syn_x, syn_y), ratios, progress)
    progress.close()
    utility = {**scored["utility"], "modes": list(down.modes), "ratio": down.ratio, "ratios": ratios, "sites": {}}
    for name, row in per_site.items():
        base = row["ratios"][str(down.ratio)]
        flat = {k: v for k, v in row.items() if k.startswith("real_only")} | {"train_images": row["train_images"], "ratios": row["ratios"]}
        for mode in down.modes:
            flat[mode] = base[mode]
            flat[f"{mode}_gain_internal"] = base[mode]["gain_internal"]
            flat[f"{mode}_gain_external"] = base[mode]["gain_external"]
        # The headline's "hybrid" is the first configured mode at the configured ratio.
        flat["hybrid"] = flat[down.modes[0]]
        flat["auc_gain_internal"] = flat[f"{down.modes[0]}_gain_internal"]
        flat["auc_gain_external"] = flat[f"{down.modes[0]}_gain_external"]
        utility["sites"][name] = flat
    for mode in down.modes:
        for where in ("internal", "external"):
            utility[f"{mode}_gain_{where}"] = _mean([v[f"{mode}_gain_{where}"] for v in utility["sites"].values()])
            utility[f"{mode}_gain_{where}_min"] = min(v[f"{mode}_gain_{where}"] for v in utility["sites"].values())
    utility["auc_gain_internal"] = _mean([v["auc_gain_internal"] for v in utility["sites"].values()])
    utility["auc_gain_external"] = _mean([v["auc_gain_external"] for v in utility["sites"].values()])

    # ------------------------------------------------------------- privacy
    # Ties these figures to the exact file scored: the export gate refuses a report of another release.
    privacy = {"release": {**scored["release_privacy"], "release_sha256": sha256_file(release_dir(run_dir) / "synthetic.npz")}, "sites": {}}
    for name in tqdm(train_names, desc="privacy attacks"):
        s = sites[name]
        m_x, m_y = _subsample(s.train_x, s.train_y, ev.attack.max_images, run.seed)
        h_x, h_y = _subsample(s.holdout_x, s.holdout_y, ev.attack.max_images, run.seed)
        # Same seed for both groups: each image position gets the same noise draw.
        member = generator.membership_scores(m_x, m_y, run.seed, device)
        nonmember = generator.membership_scores(h_x, h_y, run.seed, device)
        mi = attack_metrics(member, nonmember, resamples=ev.attack.bootstrap, seed=run.seed)
        spent = spends[name]
        site_cfg = next(c for c in run.training_sites if c.name == name)
        # A site that never trained (not sampled, dropped out, declined) released nothing to audit.
        audit = audit_site(run, site_cfg, s, ev.audit.canaries, run.seed, device) if ev.audit.enabled and spent.get("rounds_trained") else None
        privacy["sites"][name] = {
            # None: trained without DP. A site that never trained here shows its own ledger's figure.
            "epsilon": spent.get("epsilon"),
            "epsilon_upper_bound_only": bool(spent.get("epsilon_upper_bound_only")),
            "delta": spent.get("delta"),
            "epsilon_budget": spent.get("epsilon_budget"),
            "accountant": run.training.accountant if run.training.dp else None,
            # The unit of privacy: a patient where the source knows patients, else an image
            # (MedMNIST has no patient ids: one patient's several images would be several units).
            "privacy_unit": s.privacy_unit,
            "privacy_unit_note": UNIT_NOTES[s.privacy_unit],
            # The public count of units that set q (the true count, revealed by ε, when the site declares none).
            "unit_count_declared": bool(site_cfg.privacy and site_cfg.privacy.units),
            "max_records_per_unit": s.max_records_per_unit,
            # The audit's own run (the site's mechanism plus canaries) has its own accounted ε:
            # ε_lower is to be read against that (audit.epsilon_accounted), which is close to the budget.
            "epsilon_lower": None if audit is None else audit["epsilon_lower"],
            "audit": audit,
            "released": RELEASED,
            "rounds_trained": spent.get("rounds_trained", 0),
            "declined_rounds": spent.get("declined_rounds", []),
            # The model's own loss: a different score per generator family, so not in P.
            "mi_auc": mi["auc"],
            "mi_auc_ci95": mi["auc_ci95"],
            "mi_members": mi["members"],
            "mi_nonmembers": mi["nonmembers"],
            "mi_tpr_at_1pct_fpr": mi["tpr_at_1pct_fpr"],
            "mi_false_positives_at_1pct_fpr": mi["false_positives_at_1pct_fpr"],  # what that TPR rests on
        }
    per = privacy["sites"].values()
    rel = scored["release_privacy"]
    privacy.update(
        mi_auc_max=max(p["mi_auc"] for p in per),
        epsilon_max=epsilon,
        delta_at_epsilon_max=delta,
        reid_rate=rel["reid_rate"],
        reid_quantile=ev.attack.reid_quantile,
    )
    fup = scored["fup"]

    headline = {
        "fid": fidelity["fid"],
        "fid_real_reference": fidelity["reference"]["fid"],
        "coverage": fidelity["coverage"],
        "auc_gain_internal": utility["auc_gain_internal"],
        "auc_gain_external": utility["auc_gain_external"],
        "dcr_share_closer_to_train": rel["dcr_share_closer_to_train"],
        "dcr_excess": rel["dcr_excess"],
        "dcr_p_value": rel["dcr_p_value"],
        "domias_auc": rel["domias"]["auc"],
        "mi_auc_max": privacy["mi_auc_max"],
        "reid_rate": rel["reid_rate"],
        "epsilon": {n: privacy["sites"][n]["epsilon"] for n in train_names},
        "fidelity_F": fup["fidelity"],
        "utility_U": fup["utility"],
        "privacy_P": fup["privacy"],
        "fup": fup["fup"],
    }
    k = run.model.num_classes
    previews = {
        "real": {c: pool.hold_x[pool.hold_y == c][:32] for c in range(k)},
        "synthetic": {c: syn_x[syn_y == c][:32] for c in range(k)},
    }
    metrics = {"headline": headline, "fidelity": fidelity, "utility": utility, "privacy": privacy, "fup": fup}
    return metrics, previews


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
