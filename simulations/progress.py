"""What the terminal shows while a run is in progress, read from the run folder as it is written.

The server writes ``privacy_ledger.json`` on each reply and ``history.json`` each round, the
simulated sites ``clients/<site>/local_log.json``: one live display (round r/R; per site rounds,
loss, ε against its budget) follows them once a second, whatever runs the federation (Flower's
simulation engine or real processes), and a site declining a round, an update rejected or a
ledger anomaly is printed once above it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressBar, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import RunConfig
from common.reporting.run_folder import read_run

from .terminal import console, warn

MAX_ROWS = 12  # a federation of 100 sites lists its 12 most recently active ones
WEAK_EPSILON = 10.0  # above this a budget promises little (common.privacy.accounting warns the same)


def config_warnings(run: RunConfig) -> list[str]:
    """What the configuration alone says the user must know before training starts."""
    if not run.training.dp:
        return ["training.dp is false: the sites train WITHOUT differential privacy; the release carries no privacy guarantee"]
    return [f"site {s.name}: epsilon budget {s.privacy.epsilon:g} is a weak privacy guarantee (> {WEAK_EPSILON:g})"
            for s in run.training_sites if s.privacy and s.privacy.epsilon > WEAK_EPSILON]


def ledger_warnings(ledger: dict) -> Iterator[tuple[tuple, str]]:
    """(key, message) for each decline, rejected update and anomaly in a privacy ledger."""
    for site, entry in ledger.items():
        for h in entry.get("history", []) if isinstance(entry, dict) else []:
            r, why = h.get("round"), f": {h['reason']}" if h.get("reason") else ""
            if h.get("declined"):
                yield (site, r, "declined"), f"site {site} declined round {r}{why}"
            elif h.get("rejected"):
                yield (site, r, "rejected"), f"site {site}: round {r} update rejected{why}"
            if h.get("anomaly"):
                yield (site, r, "anomaly"), f"site {site}, round {r}: privacy ledger anomaly ({h['anomaly']}); the release will be withheld"


class FederationProgress:
    """The live display during the federation; use as a context manager around it."""

    def __init__(self, run: RunConfig, run_dir: Path, interval: float = 1.0):
        self.run_dir, self.interval = Path(run_dir), interval
        self.sites = {s.name: s.privacy.epsilon if s.privacy else None for s in run.training_sites}
        self.rounds, self.dp = run.training.rounds, run.training.dp
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
        self.task = self.bar.add_task("Federated training: starting", total=self.rounds)
        self.seen: set[tuple] = set()
        self.progress: dict = {"sites": {}}
        # The library output already goes to the run's log: Live must not pull it back onto the terminal.
        self.live = Live(self.render(), console=console, redirect_stdout=False, redirect_stderr=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="fedsynth-progress", daemon=True)

    def poll(self) -> None:
        """Read the run folder once: update the display, print new declines and rejections."""
        try:
            folder = read_run(self.run_dir)
            self.progress, ledger = folder.progress(), folder.ledger()
        except (OSError, ValueError, KeyError, TypeError):
            return  # a file mid-write: the next poll reads it whole
        for key, message in ledger_warnings(ledger):
            if key not in self.seen:
                self.seen.add(key)
                warn(message)
        done = self.progress.get("rounds_done", 0)
        what = f"training round {done + 1}" if done < self.rounds else "sampling the synthetic release"
        self.bar.update(self.task, completed=done, description=f"Federated training: {what}")
        self.live.update(self.render())

    def render(self) -> Group:
        table = Table(box=None, padding=(0, 1), pad_edge=False)
        for name, justify in (("site", "left"), ("rounds", "right"), ("loss", "right"), ("ε / budget", "right"), ("", "left"), ("", "left")):
            table.add_column(name, justify=justify, header_style="bold")
        shown, hidden = self.rows()
        for site in shown:
            configured = self.sites[site]
            s = self.progress["sites"].get(site, {})
            trained, eps, budget = s.get("rounds_trained", 0), s.get("epsilon"), s.get("epsilon_budget") or configured
            losses = s.get("train_loss_by_round") or []
            if not self.dp or (trained and eps is None):
                privacy, bar = "[yellow]no DP[/]", ""
            elif budget:
                privacy, bar = f"{eps or 0:.2f} / {budget:g}", ProgressBar(total=budget, completed=min(eps or 0, budget), width=16)
            else:
                privacy, bar = "-", ""
            notes = [f"{what} {s[key]}" for what, key in (("declined", "declined_rounds"), ("rejected", "rejected_rounds")) if s.get(key)]
            table.add_row(site, f"{trained}/{self.rounds}", f"{losses[-1][1]:.4f}" if losses else "-", privacy, bar,
                          f"[yellow]{', '.join(notes)}[/]")
        if hidden:
            trained = sum(1 for h in hidden if self.progress["sites"].get(h, {}).get("rounds_trained"))
            table.add_row(f"[dim]+ {len(hidden)} more[/]", f"[dim]{trained} trained[/]", "", "", "", "")
        return Group(self.bar, table)

    def rows(self) -> tuple[list[str], list[str]]:
        """Sites to list, and the rest (summed in one line): with many sites, the ones that
        have trained, the latest first, and those with a decline or rejection."""
        if len(self.sites) <= MAX_ROWS:
            return list(self.sites), []
        sites = self.progress["sites"]

        def latest(name: str) -> tuple:
            s = sites.get(name, {})
            rounds = [r for r, _ in s.get("train_loss_by_round") or []]
            flagged = bool(s.get("declined_rounds") or s.get("rejected_rounds"))
            return (flagged, max(rounds, default=0), s.get("rounds_trained", 0))

        order = sorted(self.sites, key=latest, reverse=True)
        return order[:MAX_ROWS], order[MAX_ROWS:]

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> FederationProgress:
        self.live.start()
        self._thread.start()
        return self

    def __exit__(self, kind, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last round and any late warning
        self.bar.update(self.task, description="Federated training" + (": stopped" if kind else ""))
        self.live.stop()
        if not console.is_terminal:
            console.line()  # Live ends its last frame without one when the output is a file or a pipe


@contextmanager
def phase(description: str) -> Iterator[None]:
    """A spinner with the time elapsed for a long step whose output goes to the run's log."""
    if not console.is_terminal:  # a file or a pipe: a transient spinner would leave only a blank line
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
        bar.add_task(description, total=None)
        yield
