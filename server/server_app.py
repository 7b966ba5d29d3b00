"""fedsynth ServerApp (Flower Message API): thin; the work is in :mod:`server.federation`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.appconfig import run_dir_from_context, run_from_context
from common.config import RunConfig

from .federation import federate


def make_server_app(get_run: Callable[[Context], RunConfig], get_run_dir: Callable[[Context, RunConfig], Path]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = get_run(context)
        federate(grid, run, get_run_dir(context, run), context)

    return app


# Entry point for `flwr run .`: the YAML path and run directory come from the run config.
app = make_server_app(run_from_context, run_dir_from_context)
