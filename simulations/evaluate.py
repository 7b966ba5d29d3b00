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

from common.config import RunConfig
from common.data import SiteData, load_site
from common.evaluation.audit import audit_site
from common.metrics.attacks import attack_metrics, nearest_neighbour_report
from common.metrics.fidelity import build_extractor, extract, fid_kid, msssim_diversity
from common.metrics.fup import fidelity_score, fup_score, privacy_score, utility_score
from common.metrics.utility import score_classifier, train_classifier, train_with_synthetic
from common.models.generators import build_generator
from common.runtime import pick_device
from client.client_app import SENT_METRICS
from server.synthesis import load_synthetic

UNIT_NOTES = {
    "patient": "",
    "scan": "some scans carry no patient id; each such scan is its own unit (a patient with k of them: group privacy, k x epsilon)",
    "image": "no patient ids in this source; each image is treated as one person",
}
# What else a site sent besides its DP-SGD weights (and why it may): client.client_app.SENT_METRICS.
RELEASED = ["model weights (DP-SGD, accounted)", *(f"{k}: {why}" for k, why in SENT_METRICS.items())]


def _subsample(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0)


def evaluate_release(run: RunConfig, run_dir: Path) -> tuple[dict, dict]:
    """Returns (metrics for report.json, preview images per class for the HTML report)."""
    device = pick_device()
    ev = run.evaluation
    sites: dict[str, SiteData] = {s.name: load_site(run, s) for s in tqdm(run.sites, desc="loading sites")}
    train_names = [s.name for s in run.training_sites]
    ext_names = [s.name for s in run.external_sites]
    syn_x, syn_y = load_synthetic(run_dir / "synthetic" / "synthetic.npz")
    generator = build_generator(run.model)
    generator.load_state_dict(torch.load(run_dir / "global_model.pt", map_location="cpu"))
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())

    pooled_train_x = _cat([sites[n].train_x for n in train_names])
    pooled_train_y = _cat([sites[n].train_y for n in train_names])
    pooled_hold_x = _cat([sites[n].holdout_x for n in train_names])
    pooled_hold_y = _cat([sites[n].holdout_y for n in train_names])
    # An external site evaluates on all its images: none were used for training.
    external = {n: (_cat([sites[n].train_x, sites[n].holdout_x]), _cat([sites[n].train_y, sites[n].holdout_y])) for n in ext_names}

    # ------------------------------------------------------------ fidelity
    net, extractor = build_extractor(ev.fidelity)
    n = min(ev.fidelity.max_images, len(pooled_hold_x), len(syn_x), len(pooled_train_x))
    f_hold = extract(net, _subsample(pooled_hold_x, pooled_hold_y, n, run.seed)[0])
    f_syn = extract(net, _subsample(syn_x, syn_y, n, run.seed)[0])
    f_train = extract(net, _subsample(pooled_train_x, pooled_train_y, n, run.seed)[0])
    noise = torch.rand((n, 1, run.model.image_size, run.model.image_size), generator=torch.Generator().manual_seed(run.seed))
    vs_syn = fid_kid(f_hold, f_syn, ev.fidelity.kid_subset_size)
    reference = fid_kid(f_hold, f_train, ev.fidelity.kid_subset_size)
    null = fid_kid(f_hold, extract(net, noise), ev.fidelity.kid_subset_size)
    fidelity = {
        "extractor": extractor,
        "num_images": n,
        "fid": vs_syn["fid"],
        "kid": vs_syn["kid"],
        "kid_std": vs_syn["kid_std"],
        "fid_real_reference": reference["fid"],
        "kid_real_reference": reference["kid"],
        "fid_noise_reference": null["fid"],
        "msssim_synthetic": msssim_diversity(syn_x, syn_y, ev.fidelity.msssim_pairs, run.seed),
        "msssim_real": msssim_diversity(pooled_hold_x, pooled_hold_y, ev.fidelity.msssim_pairs, run.seed),
        "sites": {},
    }
    for name in train_names + ext_names:
        real = sites[name].holdout_x if name in train_names else external[name][0]
        f_site = extract(net, real[:n])
        fidelity["sites"][name] = fid_kid(f_site, f_syn[: len(f_site)], ev.fidelity.kid_subset_size)

    # ------------------------------------------------------------- utility
    k, size = run.model.num_classes, run.model.image_size
    down = ev.downstream
    progress = tqdm(total=(1 + len(down.modes)) * len(train_names) + 2, desc="downstream classifiers")

    def score(model, internal: tuple[torch.Tensor, torch.Tensor], n: int) -> dict:
        progress.update()
        out = {"train_images": n, "internal": score_classifier(model, *internal, device)}
        out["external"] = {e: score_classifier(model, ex, ey, device) for e, (ex, ey) in external.items()}
        return out

    def fit_and_score(x, y, internal, seed: int) -> dict:
        return score(train_classifier(ev.classifier, x, y, size, k, seed, device), internal, len(x))

    utility = {
        "synthetic_only": fit_and_score(syn_x, syn_y, (pooled_hold_x, pooled_hold_y), run.seed + 11),
        "pooled_real": fit_and_score(pooled_train_x, pooled_train_y, (pooled_hold_x, pooled_hold_y), run.seed + 12),
        "modes": list(down.modes),
        "ratio": down.ratio,
        "sites": {},
    }
    for i, name in enumerate(train_names):
        s = sites[name]
        internal, seed = (s.holdout_x, s.holdout_y), run.seed + 100 + i
        row = {"train_images": len(s.train_x), "real_only": fit_and_score(s.train_x, s.train_y, internal, seed)}
        for mode in down.modes:
            model, n_syn = train_with_synthetic(mode, down.ratio, ev.classifier, (s.train_x, s.train_y), (syn_x, syn_y), size, k, seed, device)
            row[mode] = {**score(model, internal, len(s.train_x) + n_syn), "synthetic_images": n_syn}
            row[f"{mode}_gain_internal"] = row[mode]["internal"]["auc"] - row["real_only"]["internal"]["auc"]
            row[f"{mode}_gain_external"] = _mean([row[mode]["external"][e]["auc"] - row["real_only"]["external"][e]["auc"] for e in ext_names])
        # The headline's "hybrid" is the first configured mode.
        row["hybrid"] = row[down.modes[0]]
        row["auc_gain_internal"] = row[f"{down.modes[0]}_gain_internal"]
        row["auc_gain_external"] = row[f"{down.modes[0]}_gain_external"]
        utility["sites"][name] = row
    progress.close()
    for mode in down.modes:
        for where in ("internal", "external"):
            utility[f"{mode}_gain_{where}"] = _mean([v[f"{mode}_gain_{where}"] for v in utility["sites"].values()])
            utility[f"{mode}_gain_{where}_min"] = min(v[f"{mode}_gain_{where}"] for v in utility["sites"].values())
    utility["auc_gain_internal"] = _mean([v["auc_gain_internal"] for v in utility["sites"].values()])
    utility["auc_gain_external"] = _mean([v["auc_gain_external"] for v in utility["sites"].values()])

    # ------------------------------------------------------------- privacy
    privacy = {"sites": {}}
    for name in tqdm(train_names, desc="privacy attacks"):
        s = sites[name]
        m_x, m_y = _subsample(s.train_x, s.train_y, ev.attack.max_images, run.seed)
        h_x, h_y = _subsample(s.holdout_x, s.holdout_y, ev.attack.max_images, run.seed)
        # Same seed for both groups: each image position gets the same noise draw.
        member = generator.membership_scores(m_x, m_y, run.seed, device)
        nonmember = generator.membership_scores(h_x, h_y, run.seed, device)
        mi = attack_metrics(member, nonmember)
        spent = ledger.get(name, {})
        site_cfg = next(c for c in run.training_sites if c.name == name)
        audit = audit_site(run, site_cfg, s, ev.audit.canaries, run.seed, device) if ev.audit.enabled else None
        privacy["sites"][name] = {
            "epsilon": spent.get("epsilon"),  # None: trained without DP
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
            "mi_auc": mi["auc"],
            "mi_tpr_at_1pct_fpr": mi["tpr_at_1pct_fpr"],
            **nearest_neighbour_report(syn_x, s.train_x, s.holdout_x, ev.attack.reid_quantile, run.seed),
        }
    per = privacy["sites"].values()
    privacy.update(
        mi_auc_max=max(p["mi_auc"] for p in per),
        reid_rate_max=max(p["reid_rate"] for p in per),
        epsilon_max=None if any(p["epsilon"] is None for p in per) else max(p["epsilon"] for p in per),
        reid_quantile=ev.attack.reid_quantile,
    )

    # ----------------------------------------------------------------- FUP
    syn_aucs = [utility["synthetic_only"]["internal"]["auc"]] + [v["auc"] for v in utility["synthetic_only"]["external"].values()]
    real_aucs = [utility["pooled_real"]["internal"]["auc"]] + [v["auc"] for v in utility["pooled_real"]["external"].values()]
    f = fidelity_score(fidelity["fid"], fidelity["fid_real_reference"], fidelity["fid_noise_reference"])
    u = utility_score(syn_aucs, real_aucs)
    p = privacy_score(privacy["mi_auc_max"], privacy["reid_rate_max"], ev.attack.reid_quantile)
    fup = {"fidelity": f, "utility": u, "privacy": p, "fup": fup_score(f, u, p, ev.fup_weights), "weights": vars(ev.fup_weights)}

    headline = {
        "fid": fidelity["fid"],
        "kid": fidelity["kid"],
        "auc_gain_internal": utility["auc_gain_internal"],
        "auc_gain_external": utility["auc_gain_external"],
        "mi_auc_max": privacy["mi_auc_max"],
        "reid_rate_max": privacy["reid_rate_max"],
        "epsilon": {n: privacy["sites"][n]["epsilon"] for n in train_names},
        "fup": fup["fup"],
    }
    previews = {
        "real": {c: pooled_hold_x[pooled_hold_y == c][:32] for c in range(k)},
        "synthetic": {c: syn_x[syn_y == c][:32] for c in range(k)},
    }
    metrics = {"headline": headline, "fidelity": fidelity, "utility": utility, "privacy": privacy, "fup": fup}
    return metrics, previews


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
