"""The server's view of each site's privacy spend, built from what clients report.

The client's own ledger is authoritative (it enforces the budget); this copy
lets the coordinator and the report show ε per site per round, and catches a
site whose reports do not add up: an ε that goes down, or a budget or δ that
changes between rounds. Any such anomaly withholds the release
(:meth:`ServerLedger.anomalies`) until an operator has looked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

from flwr.common import log

from common.runtime import write_json


@dataclass
class ServerLedger:
    path: Path
    sites: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path.exists():  # a restarted server continues its ledger
            self.sites = {s: v["history"] for s, v in json.loads(self.path.read_text()).items()}

    def record(self, site: str, server_round: int, metrics: dict[str, float], reason: str = "", rejected: bool = False,
               privacy_unit: str | None = None) -> None:
        entry = {
            "round": server_round,
            # No epsilon reported = trained without DP (a simulated baseline): no guarantee.
            "epsilon": float(metrics["epsilon"]) if "epsilon" in metrics else None,
            "epsilon_budget": float(metrics["epsilon-budget"]) if "epsilon-budget" in metrics else None,
            "delta": float(metrics["delta"]) if "delta" in metrics else None,
            "declined": bool(metrics.get("declined", 0)),
            "rejected": rejected,
        }
        if privacy_unit:
            entry["privacy_unit"] = privacy_unit
        if reason:
            entry["reason"] = reason
        if (anomaly := self._anomaly(self.sites.get(site, []), entry)):
            entry["anomaly"] = anomaly
            log(WARNING, "Privacy ledger anomaly at site %s, round %d: %s; the release will be withheld", site, server_round, anomaly)
        self.sites.setdefault(site, []).append(entry)
        write_json(self.path, self.summary())

    @staticmethod
    def _anomaly(previous: list[dict], entry: dict) -> str:
        problems = []
        units = [e["privacy_unit"] for e in previous if e.get("privacy_unit")]
        if units and entry.get("privacy_unit") and entry["privacy_unit"] != units[-1]:
            problems.append(f"privacy unit changed from {units[-1]} to {entry['privacy_unit']}")
        reported = [e for e in previous if e["epsilon"] is not None]
        if reported and entry["epsilon"] is None:
            problems.append("the site stopped reporting its epsilon")
        if not reported or entry["epsilon"] is None:
            return "; ".join(problems)
        last = reported[-1]
        if entry["epsilon"] < last["epsilon"] - 1e-9:
            problems.append(f"epsilon went down from {last['epsilon']:.4f} to {entry['epsilon']:.4f}")
        for key in ("epsilon_budget", "delta"):
            if entry[key] != last[key]:
                problems.append(f"{key} changed from {last[key]!r} to {entry[key]!r}")
        return "; ".join(problems)

    def anomalies(self) -> dict[str, list[str]]:
        """Per site, every anomaly seen; empty when the reports add up."""
        return {s: p["anomalies"] for s, p in self.summary().items() if p["anomalies"]}

    def summary(self) -> dict:
        return {
            site: {
                "epsilon": entries[-1]["epsilon"],
                "delta": entries[-1]["delta"],
                "epsilon_budget": entries[-1]["epsilon_budget"],
                "privacy_unit": next((e["privacy_unit"] for e in reversed(entries) if e.get("privacy_unit")), None),
                "rounds_trained": sum(not e["declined"] and not e["rejected"] for e in entries),
                "rejected_rounds": [e["round"] for e in entries if e["rejected"]],
                "declined_rounds": [e["round"] for e in entries if e["declined"]],
                "anomalies": [f"round {e['round']}: {e['anomaly']}" for e in entries if e.get("anomaly")],
                "history": entries,
            }
            for site, entries in self.sites.items()
        }
