"""Read a run folder as it is on disk: what it is, how far it got, and its figures.

One reader for every view of a run (the terminal's live progress, the web dashboard), so
neither keeps a second copy of results. Nothing here trusts a file to be complete: a run that
is still writing, or was killed mid-write, gives ``problems`` instead of an exception.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import write_json

STATUS = "run_status.json"  # written by `fedsynth simulate` / `deploy-local` at each phase (simulations/simulate.py)


def write_status(run_dir: Path, state: str, **extra) -> None:
    """Record the run's phase (running, evaluating, paused, finished, failed) with who runs it.
    ``mode`` (simulate, deploy-local), once given, is kept by later calls."""
    previous, _ = read_json(Path(run_dir) / STATUS)
    mode = (previous or {}).get("mode") if isinstance(previous, dict) else None
    write_json(Path(run_dir) / STATUS, {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                                        "updated": time.time(), **({"mode": mode} if mode else {}), **extra})


def read_json(path: Path) -> tuple[dict | list | None, str | None]:
    """The file's JSON, or (None, a one-line reason) when it is missing or half-written."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} is unreadable or half-written ({type(exc).__name__})"


def _alive(status: dict) -> bool:
    if status.get("host") != socket.gethostname():
        return True  # another machine's process: trust its last word
    try:
        os.kill(int(status["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunFolder:
    """What one folder under ``runs/`` holds."""

    path: Path
    kind: str  # simulation | deployment | study | comparison | curve | unknown
    state: str  # running | evaluating | paused | finished | interrupted | failed | incomplete
    config: dict | None = None
    report: dict | None = None
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    key: str = ""  # its name relative to the runs folder (a nested run: "compare-x/ddpm")

    def __post_init__(self):
        self.key = self.key or self.path.name

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def started(self) -> float:
        return (self.path / "config.json").stat().st_mtime if (self.path / "config.json").exists() else self.path.stat().st_mtime

    @property
    def generator(self) -> str | None:
        model = (self.config or {}).get("model")
        return model.get("name") if isinstance(model, dict) else None

    @property
    def sites(self) -> list[str]:
        sites = (self.config or {}).get("sites")
        return [str(s.get("name", "?")) for s in sites if isinstance(s, dict)] if isinstance(sites, list) else []

    @property
    def rounds_total(self) -> int | None:
        training = (self.config or {}).get("training")
        rounds = training.get("rounds") if isinstance(training, dict) else None
        return rounds if isinstance(rounds, int) else None

    @property
    def headline(self) -> dict:
        headline = (self.report or {}).get("headline")
        return headline if isinstance(headline, dict) else {}

    @property
    def real_images_allowed(self) -> bool:
        """Real thumbnails only where the coordinator holds the sites' data: a simulation."""
        return self.kind == "simulation"

    def history(self) -> dict:
        history, _ = read_json(self.path / "history.json")
        return history if isinstance(history, dict) else {"train": [], "evaluate": []}

    def ledger(self) -> dict:
        ledger, _ = read_json(self.path / "privacy_ledger.json")
        return ledger if isinstance(ledger, dict) else {}

    def local_logs(self) -> dict[str, list[dict]]:
        """The sites' own logs (losses): only a simulation's coordinator holds them."""
        if self.kind != "simulation":
            return {}
        logs = {}
        for p in sorted((self.path / "clients").glob("*/local_log.json")):
            entries, _ = read_json(p)
            if isinstance(entries, list):
                logs[p.parent.name] = entries
        return logs

    def progress(self) -> dict:
        """Rounds done and, per site and round, ε against its budget, declines and (simulations) loss."""
        ledger = self.ledger()
        sites: dict[str, dict] = {}
        for site, entry in ledger.items():
            if not isinstance(entry, dict):
                continue
            hist = [h for h in entry.get("history", []) if isinstance(h, dict)]
            sites[site] = {
                "epsilon": _num_or_none(entry.get("epsilon")), "epsilon_budget": _num_or_none(entry.get("epsilon_budget")),
                "rounds_trained": entry.get("rounds_trained", 0) if is_number(entry.get("rounds_trained", 0)) else 0,
                "declined_rounds": _list(entry.get("declined_rounds")), "rejected_rounds": _list(entry.get("rejected_rounds")),
                "epsilon_by_round": [(h["round"], h["epsilon"]) for h in hist if is_number(h.get("round")) and is_number(h.get("epsilon"))
                                     and not h.get("declined") and not h.get("rejected")],
            }
        for site, entries in self.local_logs().items():
            s = sites.setdefault(site, {"epsilon_by_round": []})
            s["train_loss_by_round"] = [(e["round"], e["train_loss"]) for e in entries if isinstance(e, dict)
                                        and e.get("kind") == "train" and is_number(e.get("round")) and is_number(e.get("train_loss"))]
            s["heldout_loss_by_round"] = [(e["round"], e["heldout_loss"]) for e in entries if isinstance(e, dict)
                                          and e.get("kind") == "evaluate" and is_number(e.get("round")) and is_number(e.get("heldout_loss"))]
        done = max((r for s in sites.values() for r, _ in s["epsilon_by_round"]), default=0)
        saved = [p.stem.removeprefix("round_") for p in (self.path / "checkpoints").glob("round_*.pt")]
        done = max(done, max((int(r) for r in saved if r.isdigit()), default=0))
        return {"rounds_done": done, "rounds_total": self.rounds_total, "sites": sites}

    def children(self) -> list[RunFolder]:
        """The run folders inside a comparison (its arms), a curve (its conditions) or a study (its cells)."""
        if self.kind not in ("comparison", "curve", "study"):
            return []
        found = [p.parent for depth in ("*", "*/*", "*/*/*") for p in self.path.glob(f"{depth}/config.json")]
        return [_read_or_flag(p) for p in sorted(set(found)) if not any(part.startswith(".") for part in p.relative_to(self.path).parts)]

    def summary(self) -> dict:
        h = self.headline
        return {
            "name": self.name, "key": self.key, "kind": self.kind, "state": self.state, "error": self.error, "problems": self.problems,
            "started": self.started, "generator": self.generator, "sites": self.sites,
            "rounds_total": self.rounds_total,
            "epsilon": h["epsilon"] if isinstance(h.get("epsilon"), dict) else
                       {s: v["epsilon"] for s, v in self.progress()["sites"].items() if is_number(v.get("epsilon"))},
            **{k: h.get(k) if is_number(h.get(k)) else None for k in ("fup", "fidelity_F", "utility_U", "privacy_P")},
        }


def is_number(v) -> bool:
    """A finite int or float (not a bool): a figure that can be shown and compared."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num_or_none(v):
    return v if is_number(v) else None


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _kind(path: Path) -> str:
    if (path / "study.json").exists() or (path / "study_spec.json").exists():
        return "study"
    config, _ = read_json(path / "config.json")
    if (path / "curve.json").exists() or (isinstance(config, dict) and "epsilons" in config and "base" in config):
        return "curve"  # a privacy curve, finished or still running its conditions
    if (path / "config.json").exists() or (path / "history.json").exists():
        # A simulation only when fedsynth simulated it: its coordinator holds every site's data.
        # Anything else that trained (deploy-local, a launched deployment) is a deployment.
        status, _ = read_json(path / STATUS)
        mode = status.get("mode") if isinstance(status, dict) else None
        simulated = mode == "simulate" or (mode is None and (path / "clients").is_dir())
        return "simulation" if simulated and not (path / "deployment").is_dir() else "deployment"
    if (path / "report.json").exists():
        return "comparison"
    return "unknown"


def read_run(path: str | os.PathLike) -> RunFolder:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run folder at {path}")
    kind = _kind(path)
    run = RunFolder(path, kind, "incomplete")
    if kind in ("simulation", "deployment"):
        run.config, problem = read_json(path / "config.json")
        if problem:
            run.problems.append(problem)
        if not isinstance(run.config, dict):
            run.config = None
    if (path / "report.json").exists():
        run.report, problem = read_json(path / "report.json")
        if problem:
            run.problems.append(problem)
        if not isinstance(run.report, dict):
            run.report = None
    status, _ = read_json(path / STATUS)
    status = status if isinstance(status, dict) else {}
    if status.get("state") == "failed":
        run.state, run.error = "failed", status.get("error")
    elif run.report is not None and status.get("state") in (None, "finished"):
        run.state = "finished"
    elif status.get("state") == "paused":
        run.state = "paused"  # stopped on purpose after federation.stop_after_round; resumable
    elif status.get("state") in ("running", "evaluating"):
        run.state = status["state"] if _alive(status) else "interrupted"
    elif kind in ("study", "curve", "comparison") and ((path / "study.json").exists() or (path / "curve.json").exists() or run.report):
        run.state = "finished"
    elif (path / "history.json").exists():
        run.state = "interrupted"
    if kind == "unknown":
        run.problems.append("not a fedsynth run folder (no config.json, report.json, study.json or curve.json)")
    return run


def list_runs(root: str | os.PathLike) -> list[RunFolder]:
    """Every run folder directly under ``root``, newest first (hidden caches skipped)."""
    root = Path(root)
    runs = [_read_or_flag(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    return sorted(runs, key=lambda r: r.started, reverse=True)


def _read_or_flag(path: Path) -> RunFolder:
    """One damaged folder must not hide the others: it is listed with what is wrong."""
    try:
        run = read_run(path)
        run.summary()
        return run
    except Exception as exc:  # noqa: BLE001 (any damage to any file)
        return RunFolder(path, "unknown", "incomplete", problems=[f"unreadable ({type(exc).__name__}: {exc})"])
