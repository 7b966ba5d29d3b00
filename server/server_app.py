"""fedsynth ServerApp (Flower Message API): thin; the work is in :mod:`server.federation`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.appconfig import registry_from_context, run_dir_from_context, run_from_context
from common.config import RunConfig

from .federation import federate


def make_server_app(get_run: Callable[[Context], RunConfig], get_run_dir: Callable[[Context, RunConfig], Path],
                    get_registry: Callable[[Context], dict[int, str]] | None = None) -> ServerApp:
    """``get_registry``: a deployment's node id -> site binding; None only in a simulation, whose
    nodes are this process's own partitions."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = get_run(context)
        registry = get_registry(context) if get_registry else None
        federate(grid, run, get_run_dir(context, run), context, registry)

    return app


# Entry point for `flwr run` on a SuperLink (a deployment): the run, its folder and the node
# registry come from the run config that `fedsynth launch` sets.
app = make_server_app(run_from_context, run_dir_from_context, registry_from_context)
