"""The memorisation gate and the synthetic data card (datasheet) of a release.

The gate reads the release attacks that :class:`common.evaluation.release.ReleaseScorer`
measured against the pooled training data (``report["privacy"]["release"]``) and refuses a
release whose DCR test, duplicate counts or re-identification rate cross
``evaluation.gate``. The card (Gebru et al. 2021, "Datasheets for datasets", shaped for a
synthetic release) says where the release comes from, what protects it and what it is for.
"""

from __future__ import annotations

from ..config import GateConfig, RunConfig


class ReleaseRefused(RuntimeError):
    """The memorisation gate refused to sign a release (the message names the tests and figures)."""


def check(release: dict, cfg: GateConfig) -> dict:
    """Every test of the gate on ``release`` (the report's ``privacy.release``): figures, limits, verdicts."""
    share, p, excess = release["dcr_share_full"], release["dcr_p_value"], release["dcr_excess"]
    tests = [
        {"test": "dcr", "passed": not (p < cfg.dcr_alpha and excess > cfg.dcr_excess_max),
         "figures": {"share_closer_to_train": share, "permutation_p": p, "null_q95": release["dcr_null_q95"],
                     "excess": excess, "images": release["dcr_images"]},
         "limit": f"refused when permutation p < {cfg.dcr_alpha} and excess over the null's 95th percentile > {cfg.dcr_excess_max}"},
        {"test": "exact_duplicates", "passed": release["exact_duplicates"] <= cfg.exact_duplicates_max,
         "figures": {"count": release["exact_duplicates"]}, "limit": f"at most {cfg.exact_duplicates_max}"},
        {"test": "near_duplicates", "passed": release["near_duplicate_share"] <= cfg.near_duplicate_share_max,
         "figures": {"count": release["near_duplicates"], "share": release["near_duplicate_share"]},
         "limit": f"share at most {cfg.near_duplicate_share_max}"},
        {"test": "reidentification", "passed": release["reid_rate"] <= cfg.reid_rate_max,
         "figures": {"rate": release["reid_rate"], "chance": release["reid_quantile"]}, "limit": f"rate at most {cfg.reid_rate_max}"},
    ]
    failed = [t for t in tests if not t["passed"]]
    return {"passed": not failed, "enabled": cfg.enabled, "tests": tests, "thresholds": vars(cfg),
            "failed": [t["test"] for t in failed]}


def refusal_message(result: dict) -> str:
    parts = [f"{t['test']} ({', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in t['figures'].items())}; {t['limit']})"
             for t in result["tests"] if not t["passed"]]
    return "memorisation gate refused the release: " + "; ".join(parts)


def data_card(run: RunConfig, report: dict, gate: dict, manifest: dict) -> dict:
    """The synthetic data card that travels with the release (also rendered as DATASHEET.md)."""
    h, priv, fup = report["headline"], report["privacy"], report["fup"]
    sites = {s.name: {"role": s.role, "description": s.description,
                      "source": {"kind": s.source.kind, "dataset": s.source.dataset, "splits": list(s.source.splits)},
                      "epsilon": priv["sites"].get(s.name, {}).get("epsilon"), "delta": priv["sites"].get(s.name, {}).get("delta"),
                      "privacy_unit": priv["sites"].get(s.name, {}).get("privacy_unit")}
             for s in run.sites if s.role == "train"}
    return {
        "title": f"fedsynth synthetic release: {run.name}",
        "generator": {"name": run.model.name, "model_sha256": manifest.get("model_sha256"), "sampler": manifest.get("sampler"),
                      "public_prior": (manifest.get("public_prior") or {}).get("name")},
        "composition": {"images": manifest.get("num_images"), "class_counts": manifest.get("class_counts"),
                        "image_size": run.model.image_size, "channels": run.model.in_channels},
        "sources_by_site": sites,
        "external_validation_sites": [s.name for s in run.external_sites],
        "privacy": {"accountant": run.training.accountant if run.training.dp else None, "dp": run.training.dp,
                    "what_epsilon_covers": "each site's training records (per privacy unit) through DP-SGD; see docs/privacy.md",
                    "epsilon_max": priv.get("epsilon_max")},
        "headline": h,
        "fup": {k: fup[k] for k in ("fidelity", "utility", "privacy", "privacy_attack", "privacy_guarantee", "fup")},
        "study": report.get("study"),  # the study's headline table, when the release came out of `fedsynth study`
        "memorisation_gate": gate,
        "intended_uses": ["augmenting or pretraining downstream classifiers, validated on real data",
                          "method development and teaching where real scans cannot be shared"],
        "out_of_scope_uses": ["clinical decisions or diagnosis about any person",
                              "validating a model's clinical performance (test on real data only)",
                              "claims about individual patients or re-identification attempts",
                              "populations, modalities or scanners unlike the contributing sites"],
        "known_limitations": ["images are 28x28 upsampled to the model size; fine detail is not represented",
                              "the privacy attacks only lower-bound leakage; epsilon is the guarantee"],
    }


def datasheet_markdown(card: dict) -> str:
    def row(k, v):
        return f"| {k} | {v} |"

    lines = [f"# {card['title']}", "", "## Composition", "", "| field | value |", "|---|---|",
             row("generator", card["generator"]["name"]), row("images", card["composition"]["images"]),
             row("class counts", card["composition"]["class_counts"]), "", "## Sources and privacy per site", "",
             "| site | role | source | epsilon | delta | privacy unit |", "|---|---|---|---|---|---|"]
    for name, s in card["sources_by_site"].items():
        lines.append(f"| {name} | {s['role']} | {s['source']['dataset'] or s['source']['kind']} | {s['epsilon']} | {s['delta']} | {s['privacy_unit']} |")
    g = card["memorisation_gate"]
    lines += ["", "## Scores", "", "| figure | value |", "|---|---|", *(row(k, v) for k, v in card["fup"].items()), "",
              "## Memorisation gate", "", f"Passed: {g['passed']}" + (f" (OVERRIDDEN: {g['override']['reason']})" if g.get("override") else ""), "",
              *(f"- {t['test']}: {'pass' if t['passed'] else 'FAIL'} {t['figures']} ({t['limit']})" for t in g["tests"]), "",
              "## Intended uses", "", *(f"- {u}" for u in card["intended_uses"]), "", "## Out of scope", "",
              *(f"- {u}" for u in card["out_of_scope_uses"]), "", "## Known limitations", "", *(f"- {u}" for u in card["known_limitations"])]
    if card.get("study"):
        lines += ["", "## Study", "", "See study.json beside the release's study folder for the full tables."]
    return "\n".join(lines) + "\n"
