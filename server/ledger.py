"""The server's view of each site's privacy spend, built from what clients report.

The client's own ledger is authoritative (it enforces the budget); this copy
lets the coordinator and the report show ε per site per round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.runtime import write_json


@dataclass
class ServerLedger:
    path: Path
    sites: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path.exists():  # a restarted server continues its ledger
            self.sites = {s: v["history"] for s, v in json.loads(self.path.read_text()).items()}

    def record(self, site: str, server_round: int, metrics: dict[str, float], reason: str = "", rejected: bool = False) -> None:
        entry = {
            "round": server_round,
            # No epsilon reported = trained without DP (a simulated baseline): no guarantee.
            "epsilon": float(metrics["epsilon"]) if "epsilon" in metrics else None,
            "epsilon_budget": float(metrics["epsilon-budget"]) if "epsilon-budget" in metrics else None,
            "delta": float(metrics["delta"]) if "delta" in metrics else None,
            "declined": bool(metrics.get("declined", 0)),
            "rejected": rejected,
        }
        if reason:
            entry["reason"] = reason
        self.sites.setdefault(site, []).append(entry)
        write_json(self.path, self.summary())

    def summary(self) -> dict:
        return {
            site: {
                "epsilon": entries[-1]["epsilon"],
                "delta": entries[-1]["delta"],
                "epsilon_budget": entries[-1]["epsilon_budget"],
                "rounds_trained": sum(not e["declined"] and not e["rejected"] for e in entries),
                "rejected_rounds": [e["round"] for e in entries if e["rejected"]],
                "declined_rounds": [e["round"] for e in entries if e["declined"]],
                "history": entries,
            }
            for site, entries in self.sites.items()
        }
