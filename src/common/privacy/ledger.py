"""The client's authoritative privacy ledger: an Opacus accountant persisted on disk.

The accountant's history ``[(noise_multiplier, sample_rate, steps), ...]`` is all
that defines ε, so it is written after every round and reloaded on start; a
restarted client continues from what it has already spent.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from opacus.accountants import create_accountant

from ..runtime import write_json


class BudgetExceeded(RuntimeError):
    """Training the requested steps would take the site past its ε budget."""


class PrivacyLedger:
    def __init__(self, path: str | os.PathLike, epsilon_budget: float, delta: float, accountant: str = "rdp"):
        self.path = Path(path)
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.mechanism = accountant
        self.accountant = create_accountant(mechanism=accountant)
        self.rounds: list[dict] = []
        if self.path.exists():
            self._load()

    # ------------------------------------------------------------- queries
    @property
    def spent(self) -> float:
        return self._epsilon(self.accountant)

    def projected(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after ``steps`` more steps, without recording them."""
        trial = copy.deepcopy(self.accountant)
        trial.history.append((noise_multiplier, sample_rate, steps))
        return self._epsilon(trial)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise :class:`BudgetExceeded` unless the steps fit; returns the projected ε."""
        after = self.projected(noise_multiplier, sample_rate, steps)
        if after > self.epsilon_budget * (1 + 1e-6):
            raise BudgetExceeded(
                f"training {steps} more steps would raise epsilon from {self.spent:.3f} to "
                f"{after:.3f}, over this site's budget of {self.epsilon_budget:g} (delta={self.delta:g})"
            )
        return after

    # ------------------------------------------------------------ updates
    def record_round(self, server_round: int, steps: int) -> None:
        """Log a finished round (the accountant itself was stepped by Opacus) and persist."""
        self.rounds.append({"round": server_round, "steps": steps, "epsilon": self.spent})
        self.save()

    def save(self) -> None:
        write_json(
            self.path,
            {
                "accountant": self.mechanism,
                "epsilon_budget": self.epsilon_budget,
                "delta": self.delta,
                "history": [list(h) for h in self.accountant.history],
                "rounds": self.rounds,
                "epsilon_spent": self.spent,
            },
        )

    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        if data.get("accountant") != self.mechanism:
            raise ValueError(f"{self.path}: ledger uses accountant {data.get('accountant')!r}, config asks {self.mechanism!r}")
        self.accountant.history = [tuple(h) for h in data["history"]]
        self.rounds = data.get("rounds", [])

    def _epsilon(self, accountant) -> float:
        if not accountant.history:
            return 0.0
        return float(accountant.get_epsilon(delta=self.delta))
