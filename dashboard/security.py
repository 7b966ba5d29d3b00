"""What both web apps send and accept whatever the page: loopback host names only (plus the
reverse proxy's), nothing cached, no Referer (a reader's token is in the URL), no framing."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.middleware.trustedhost import TrustedHostMiddleware

LOOPBACK = ["127.0.0.1", "localhost", "[::1]", "::1"]
HEADERS = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Frame-Options": "DENY",
           "X-Content-Type-Options": "nosniff"}


def guard(app: FastAPI, allowed_hosts: list[str] | None = None) -> None:
    """A request naming another host is refused (400): a page on another site cannot reach this
    server through DNS rebinding. ``allowed_hosts`` adds the reverse proxy's public name."""

    @app.middleware("http")
    async def private(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK + list(allowed_hosts or []))
