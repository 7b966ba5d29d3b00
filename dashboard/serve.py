"""Start the dashboard or a reader study with uvicorn (access lines off: tokens are in URLs)."""

from __future__ import annotations

import logging
import os


def _run(app, host: str, port: int) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("fedsynth").warning(
            "Listening on %s: put a TLS reverse proxy in front (docs/dashboard.md); this server speaks plain HTTP.", host)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def serve_dashboard(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8050, public_key: str | None = None,
                    allowed_hosts: list[str] | None = None) -> None:
    from .app import create_app

    print(f"fedsynth dashboard: {os.path.abspath(root)} at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    _run(create_app(root, public_key, allowed_hosts), host, port)


def serve_reader_study(study: str | os.PathLike, host: str = "127.0.0.1", port: int = 8060,
                       allowed_hosts: list[str] | None = None) -> None:
    from .reader import create_reader_app

    app = create_reader_app(study, allowed_hosts)
    print(f"fedsynth reader study: {study} at http://{host}:{port}/r/<token> (Ctrl-C to stop)", flush=True)
    _run(app, host, port)
