"""Where a run's output goes: fedsynth's own lines on the terminal, library noise in the run's log.

Flower's INFO lines, Ray's forwarded worker output, Python warnings from Opacus and torch and
anything written to fd 1 or 2 from C go to ``<run_dir>/run.log`` while a run is in progress;
:data:`console` keeps printing on the real terminal, and :func:`warn` puts a warning that matters
to the user there (and in the log).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from rich.console import Console
from rich.markup import escape

LOG = "run.log"

# The one console for the user. While output goes to a log, its file is a copy of the terminal's fd.
console = Console(stderr=True)
_log = logging.getLogger("fedsynth.terminal")  # fedsynth's own lines in the run log
_redirected = False


def warn(message: str) -> None:
    """A warning the user must see: on the terminal, and in the run's log when there is one."""
    console.print(f"[bold yellow]Warning:[/] {escape(message)}", soft_wrap=True)
    if _redirected:  # otherwise logging's last-resort handler would print it a second time
        _log.warning(message)


# fedsynth's own packages: a warning raised by their code is meant for the user.
OURS = tuple(str(Path(importlib.import_module(m).__file__).parent) + os.sep for m in ("common", "server", "client", "simulations"))
# Already on the terminal from the privacy ledger (simulations.progress), whatever process runs the server.
FROM_LEDGER = re.compile(r"^(Site \S+ declined round|Rejected round \d+ update)")


class _ToTerminal(logging.Handler):
    """Records that must also reach the terminal, by their first line (the rest stays in the log):
    an ERROR from anywhere (the simulation engine or a site's app crashed), and a WARNING raised by
    fedsynth's own code (a Python warning or a log line), e.g. an insecure SuperLink, δ ≥ 1/N, a
    fidelity score of 0, a reply refused for an unregistered node."""

    def __init__(self, log: Path):
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        first = (record.getMessage().strip().splitlines() or [""])[0]
        if record.name == _log.name or first.startswith("Traceback"):
            return
        if record.levelno >= logging.ERROR:
            console.print(f"[bold red]Error:[/] {escape(first)} (details in {self.log})", soft_wrap=True)
        elif record.name == "py.warnings":  # "file:line: Category: message"
            file, _, rest = first.partition(":")
            if file.startswith(OURS):
                console.print(f"[bold yellow]Warning:[/] {escape(rest.split(': ', 1)[-1])}", soft_wrap=True)
        elif record.pathname.startswith(OURS) and not FROM_LEDGER.match(first):
            console.print(f"[bold yellow]Warning:[/] {escape(first)}", soft_wrap=True)


@contextmanager
def output_to_log(path: Path) -> Iterator[Path]:
    """For the block, send fds 1 and 2, ``sys.stdout``/``sys.stderr``, Python logging (root and
    Flower) and warnings to ``path`` (appended); :data:`console` stays on the terminal. Inside an
    outer block nothing changes: the outer log keeps everything. Restored on the way out,
    exceptions included (logged with their traceback, then raised for the caller to report)."""
    global _redirected
    if _redirected:
        yield path
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", errors="replace", buffering=1) as log_file, ExitStack() as undo:
        sys.stdout.flush()
        sys.stderr.flush()
        # The terminal, as a file of its own, before fd 2 is pointed at the log.
        terminal = undo.enter_context(os.fdopen(os.dup(2), "w", encoding=sys.stderr.encoding or "utf-8", errors="replace", buffering=1))
        for fd in (1, 2):  # C libraries and child processes (Ray's) write to the fds themselves
            undo.callback(os.close, saved := os.dup(fd))
            undo.callback(os.dup2, saved, fd)
            os.dup2(log_file.fileno(), fd)
        undo.callback(_flush, sys.stdout, sys.stderr)  # anything still buffered for the log, before fds 1, 2 come back
        # Python-level writers (Ray's forwarded worker lines, tqdm) may hold other objects than fds 1 and 2.
        undo.enter_context(redirect_stdout(log_file))
        undo.enter_context(redirect_stderr(log_file))
        _route_logging(path, log_file, undo)
        console.file, _redirected = terminal, True
        try:
            yield path
        except BaseException:
            _log.exception("the run stopped")
            raise
        finally:
            console.file, _redirected = None, False


def _flush(*streams) -> None:
    for stream in streams:
        stream.flush()


def _route_logging(path: Path, log_file, undo: ExitStack) -> None:
    """Root and Flower loggers, and Python warnings through them, to the log; errors also to the terminal."""
    importlib.import_module("flwr.common.logger")  # Flower adds its console handler on import: before the swap, not inside it

    handler = logging.StreamHandler(log_file)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flower, root = logging.getLogger("flwr"), logging.getLogger()
    before = root.handlers[:], flower.handlers[:], flower.propagate
    # Flower's own handler writes coloured lines to stderr: the file handler replaces it.
    errors = _ToTerminal(path)
    root.handlers, flower.handlers, flower.propagate = [handler, errors], [handler, errors], False

    def restore() -> None:
        root.handlers, flower.handlers, flower.propagate = before

    undo.callback(restore)
    captured = logging._warnings_showwarning is not None  # no public getter for captureWarnings' state
    logging.captureWarnings(True)
    undo.callback(logging.captureWarnings, captured)
