"""The site's authoritative privacy ledger: what it has released, on disk, tamper-evident.

ε is a function of the history ``[(noise_multiplier, sample_rate, steps), ...]``
alone, so the history is the ledger. The rules that make the budget binding:

* **Exclusive.** :meth:`PrivacyLedger.session` holds an OS lock (``flock``) on
  ``<ledger>.lock`` from the check to the save: two runs sharing a ledger are
  serialised, each sees the other's spend.
* **Reserve first.** A round's steps are written to the history *before* its
  first step (:meth:`reserve`); a crash mid-round leaves them counted.
* **Tamper-evident.** Every save carries an HMAC-SHA256 of its content under a
  key kept beside it (``<ledger>.key``, mode 0600). An edited ledger, a ledger
  without its key, or a key without its ledger (a deleted ledger) is refused
  until an operator acts (:func:`reseal`). Deleting the whole state folder
  cannot be detected from inside it; docs/privacy.md says so.
* **Upper bounds only.** The accountant is RDP or PRV (:mod:`.accounting`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from .accounting import AccountantError, epsilon_for, noise_for_budget, require_upper_bound

LEDGER_VERSION = 2
# The site's own log of its rounds (client.trainer writes it): a ledger reset while it shows
# DP rounds is refused.
LOCAL_LOG = "local_log.json"


class PrivacyRefusal(RuntimeError):
    """The site will not train: the reason is one line, safe to send to the coordinator."""


class BudgetExceeded(PrivacyRefusal):
    """Training the requested steps would take the site past its ε budget."""


class LedgerError(PrivacyRefusal):
    """The ledger is unreadable, edited, deleted or locked: an operator must act."""


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _history(doc: dict) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in doc["history"]]


class PrivacyLedger:
    """A site's ledger at ``path`` (its key at ``path.with_suffix('.key')``)."""

    def __init__(self, path: str | os.PathLike, epsilon_budget: float, delta: float, accountant: str = "rdp",
                 lock_timeout_s: float = 3600.0):
        try:
            require_upper_bound(accountant)
        except AccountantError as exc:
            raise LedgerError(str(exc)) from None
        if not (0 < epsilon_budget < float("inf")) or not (0 < delta < 1):
            raise LedgerError(f"privacy budget must be finite: epsilon={epsilon_budget!r}, delta={delta!r}")
        self._open(path, lock_timeout_s)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.mechanism = accountant
        # Read under a shared lock: a run writing its first round creates the key just before the ledger,
        # and an unlocked reader in between would take that for a deleted ledger.
        if self.path.parent.is_dir() and os.access(self.path.parent, os.W_OK):
            with self._flock(fcntl.LOCK_SH):
                self.load()
        else:  # nobody can be writing a ledger in a folder that is missing or read-only
            self.load()

    def _open(self, path: str | os.PathLike, lock_timeout_s: float) -> None:
        self.path = Path(path)
        self.key_path = self.path.with_suffix(".key")
        self.lock_path = self.path.with_suffix(".lock")
        self.lock_timeout_s = lock_timeout_s
        self.history: list[tuple[float, float, int]] = []
        self.rounds: list[dict] = []
        self.events: list[dict] = []
        self._locked = 0

    # ------------------------------------------------------------- queries
    @property
    def spent(self) -> float:
        return epsilon_for(self.history, self.delta, self.mechanism)

    def projected(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after ``steps`` more steps, without recording them."""
        return epsilon_for([*self.history, (noise_multiplier, sample_rate, steps)], self.delta, self.mechanism)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise :class:`BudgetExceeded` unless the steps fit; returns the projected ε."""
        after = self.projected(noise_multiplier, sample_rate, steps)
        if after > self.epsilon_budget * (1 + 1e-6):
            raise BudgetExceeded(
                f"training {steps} more steps would raise epsilon from {self.spent:.3f} to "
                f"{after:.3f}, over this site's budget of {self.epsilon_budget:g} (delta={self.delta:g})"
            )
        return after

    def noise_for_remaining(self, sample_rate: float, steps_per_round: int, rounds_left: int) -> float:
        """σ so that what is already spent plus ``rounds_left`` rounds fit the budget (not the whole budget)."""
        try:
            return noise_for_budget(self.epsilon_budget, self.delta, sample_rate, steps_per_round * rounds_left,
                                    self.mechanism, self.history)
        except ValueError:
            raise BudgetExceeded(
                f"epsilon {self.spent:.3f} of this site's budget {self.epsilon_budget:g} is spent; "
                f"{rounds_left} more round(s) of {steps_per_round} steps cannot fit (delta={self.delta:g})"
            ) from None

    # ------------------------------------------------------------ updates
    @contextlib.contextmanager
    def _flock(self, kind: int) -> Iterator[None]:
        """Hold the ledger's lock file in ``kind`` (shared or exclusive) mode, waiting up to the lock timeout."""
        with open(self.lock_path, "a") as lock:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(lock, kind | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LedgerError(f"{self.path.name}: still locked by another run after {self.lock_timeout_s:.0f} s") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def session(self, reload: bool = True) -> Iterator["PrivacyLedger"]:
        """Hold the ledger's exclusive lock and work on its freshest state (``reload``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._flock(fcntl.LOCK_EX):
            self._locked += 1
            try:
                if reload:
                    self.load()
                yield self
            finally:
                self._locked -= 1

    def reserve(self, server_round: int, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Check and write a round's steps to the ledger before its first step; returns ε after it."""
        self._require_lock()
        after = self.check(noise_multiplier, sample_rate, steps)
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        self.rounds.append({"round": server_round, "steps": steps, "noise_multiplier": noise_multiplier,
                            "sample_rate": sample_rate, "epsilon": after, "status": "reserved"})
        self.save()
        return after

    def commit(self, server_round: int) -> None:
        """Mark the reserved round as finished (its spend was already counted)."""
        self._require_lock()
        for entry in reversed(self.rounds):
            if entry["round"] == server_round and entry["status"] == "reserved":
                entry["status"] = "done"
                break
        self.save()

    def save(self) -> None:
        body = {
            "version": LEDGER_VERSION,
            "accountant": self.mechanism,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "history": [list(h) for h in self.history],
            "rounds": self.rounds,
            "events": self.events,
            "epsilon_spent": self.spent,
        }
        key = self._key(create=True)
        doc = {**body, "hmac_sha256": hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()}
        tmp = self.path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self) -> None:
        """Read and verify the ledger; a fresh site (no ledger, no key, no trace of training) starts empty."""
        has_ledger, has_key = self.path.exists(), self.key_path.exists()
        if not has_ledger and not has_key:
            if self._trained_before():
                raise LedgerError(f"{self.path.name} and its key are gone but this state folder's local log shows "
                                  "DP rounds: restore both from backup")
            self.history, self.rounds, self.events = [], [], []
            return
        if not has_ledger:
            raise LedgerError(f"{self.path.name} is missing but its key exists: the ledger was deleted; restore it from backup")
        if not has_key:
            raise LedgerError(f"{self.key_path.name} is missing: the ledger cannot be verified; restore the key from backup")
        try:
            doc = json.loads(self.path.read_text())
            given = doc.pop("hmac_sha256")
            history = _history(doc)
            key = self.key_path.read_bytes()
            want = hmac.new(key, _canonical(doc), hashlib.sha256).hexdigest()
            intact = isinstance(given, str) and hmac.compare_digest(given, want)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(f"{self.path.name} is unreadable ({type(exc).__name__}); restore it from backup") from None
        if not intact:
            raise LedgerError(f"{self.path.name} fails its integrity check (edited?); restore it from backup, or review it "
                              "and run `fedsynth ledger reseal`")
        if doc.get("accountant") != self.mechanism:
            raise LedgerError(f"{self.path.name} uses accountant {doc.get('accountant')!r}, the run asks {self.mechanism!r}")
        # A budget or δ may only change through an operator's recorded reseal, never by editing a YAML.
        if (doc.get("epsilon_budget"), doc.get("delta")) != (self.epsilon_budget, self.delta):
            raise LedgerError(f"{self.path.name} holds budget epsilon={doc.get('epsilon_budget')}, delta={doc.get('delta')}; "
                              f"the site config asks epsilon={self.epsilon_budget:g}, delta={self.delta:g}: "
                              "an operator must `fedsynth ledger reseal --epsilon-budget/--delta` to change it")
        self.history, self.rounds, self.events = history, doc.get("rounds", []), doc.get("events", [])

    def _trained_before(self) -> bool:
        log = self.path.parent / LOCAL_LOG
        try:
            return any(e.get("kind") == "train" and "epsilon" in e for e in json.loads(log.read_text()))
        except (OSError, ValueError, AttributeError, TypeError):
            return log.exists()

    # ------------------------------------------------------------ private
    def _require_lock(self) -> None:
        if not self._locked:
            raise RuntimeError("ledger updates need `with ledger.session():`")

    def _key(self, create: bool) -> bytes:
        if not self.key_path.exists():
            if not create:
                raise LedgerError(f"{self.key_path.name} is missing")
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return self.key_path.read_bytes()


def reseal(path: str | os.PathLike, reason: str, epsilon_budget: float | None = None, delta: float | None = None) -> dict:
    """Operator override: accept the ledger file as it is now (optionally with a new budget or δ)
    and sign it again. The file must still parse; the override, its reason, any change and the ε
    it then shows are appended to the ledger's ``events``. The operator owns that decision.
    """
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"{path.name} does not exist: restore it from backup (a deleted ledger cannot be resealed)")
    ledger = PrivacyLedger.__new__(PrivacyLedger)  # not verified: that is what the operator overrides
    ledger._open(path, lock_timeout_s=60.0)
    with ledger.session(reload=False):
        try:
            doc = json.loads(path.read_text())
            ledger.mechanism, ledger.epsilon_budget, ledger.delta = doc["accountant"], doc["epsilon_budget"], doc["delta"]
            ledger.history, ledger.rounds, ledger.events = _history(doc), doc.get("rounds", []), doc.get("events", [])
        except (ValueError, KeyError, TypeError):
            raise LedgerError(f"{path.name} is not a readable ledger: restore it from backup") from None
        event = {"event": "operator_reseal", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason}
        for name, new in (("epsilon_budget", epsilon_budget), ("delta", delta)):
            if new is not None and new != getattr(ledger, name):
                event[name] = {"from": getattr(ledger, name), "to": float(new)}
                setattr(ledger, name, float(new))
        event["epsilon_spent"] = ledger.spent
        ledger.events.append(event)
        ledger.save()
    return event
