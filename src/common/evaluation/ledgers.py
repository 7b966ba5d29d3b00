"""Do a simulation's privacy ledgers hold? One check for the scaling benchmark and the tests.

For every training site: its own ledger opens (HMAC intact), ε recomputed from its history is
within its budget, it never trained more rounds than the run had, and what the coordinator
recorded never exceeds what the site spent (a site may have spent more: a reply lost to a
dropout or a timeout after the site committed its round).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import RunConfig
from common.privacy import LOCAL_LOG, PrivacyLedger


def audit_ledgers(run: RunConfig, run_dir: Path) -> dict:
    """Per site: ``epsilon`` (the site's ledger), ``budget``, ``server_epsilon``, ``rounds``
    (trained, from the ledger), ``dropped`` (simulated dropouts) and ``problems``; plus ``ok``."""
    run_dir = Path(run_dir)
    server = json.loads((run_dir / "privacy_ledger.json").read_text()) if (run_dir / "privacy_ledger.json").exists() else {}
    sites: dict[str, dict] = {}
    for site in run.training_sites:
        folder = run_dir / "clients" / site.name
        row: dict = {"budget": site.privacy.epsilon, "epsilon": 0.0, "server_epsilon": None, "rounds": [], "dropped": [], "problems": []}
        if (folder / "privacy_ledger.json").exists():
            try:
                ledger = PrivacyLedger(folder / "privacy_ledger.json", site.privacy.epsilon, site.privacy.delta, run.training.accountant)
                row["epsilon"] = ledger.spent
                row["rounds"] = [r["round"] for r in ledger.rounds]
            except Exception as exc:  # noqa: BLE001 - an unreadable ledger is itself the finding
                row["problems"].append(f"ledger does not open: {exc}")
        if (folder / LOCAL_LOG).exists():
            row["dropped"] = [e["round"] for e in json.loads((folder / LOCAL_LOG).read_text()) if e.get("kind") == "simulated_dropout"]
        if site.name in server:
            row["server_epsilon"] = server[site.name]["epsilon"]
        if row["epsilon"] > row["budget"] * (1 + 1e-6):
            row["problems"].append(f"epsilon {row['epsilon']:.4f} over the budget {row['budget']:g}")
        if row["server_epsilon"] is not None and row["server_epsilon"] > row["epsilon"] + 1e-9:
            row["problems"].append(f"the coordinator recorded {row['server_epsilon']:.4f}, more than the site's ledger {row['epsilon']:.4f}")
        if len(row["rounds"]) != len(set(row["rounds"])) or any(r > run.training.rounds for r in row["rounds"]):
            row["problems"].append(f"rounds {row['rounds']} repeat or exceed the run's {run.training.rounds}")
        if set(row["rounds"]) & set(row["dropped"]):
            row["problems"].append(f"spent in rounds it dropped out of: {sorted(set(row['rounds']) & set(row['dropped']))}")
        sites[site.name] = row
    return {"ok": not any(r["problems"] for r in sites.values()), "sites": sites}
