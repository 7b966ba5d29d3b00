"""The only door the hospitals see: a TLS gateway that forwards Flower's Fleet API and nothing else.

In flwr 1.41 the SuperLink serves its Fleet (nodes), Control (register nodes, start runs) and
Runtime (the ServerApp's) APIs on one host and port. Published as it is, anyone who can reach
that port can register or evict nodes and run their own app on the hospitals' nodes. So the
SuperLink listens on loopback only, where the coordinator's own ``flwr`` commands and SuperExec
reach it, and this gateway publishes ``/v1/fleet/...`` alone: any other path, and any path that
is not already in normal form (``..``, ``//``, encoded dots or slashes), gets a plain 403.

Node authentication is unchanged: requests are forwarded byte for byte with their signed
headers, and the SuperLink checks them as if the node had connected directly.

Run it with ``fedsynth server`` (it starts both), or alone::

    python -m server.fleet_gateway --listen 0.0.0.0:8000 --upstream 127.0.0.1:8001 --certs certs/
"""

from __future__ import annotations

import argparse
import contextlib
import posixpath
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop headers (RFC 9110 section 7.6.1), those httpx/uvicorn set themselves, and proxy
# headers: the SuperLink trusts them from 127.0.0.1, which is where the gateway connects from.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "host", "forwarded", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip"}
# Requests are read whole before the SuperLink authenticates them: cap their size (a model's
# weights are a few MB to a few hundred) and the number served at once.
MAX_BODY_MB, MAX_CONCURRENT = 1024, 256


def fleet_path(raw_path: str) -> bool:
    """True only for a Fleet API path already in normal form: nothing a proxy or server could
    re-interpret into another API (``/v1/fleet/../control``, ``%2e%2e``, ``//``)."""
    if "%" in raw_path or "\\" in raw_path or "//" in raw_path:
        return False
    return raw_path.startswith(FLEET_PREFIX) and posixpath.normpath(raw_path) == raw_path.rstrip("/")


def make_gateway(upstream: str, ca_cert: Path | None, max_body_mb: int = MAX_BODY_MB) -> Starlette:
    """An ASGI app forwarding Fleet API requests to the SuperLink at ``upstream`` (host:port)."""
    scheme = "http" if ca_cert is None else "https"
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=str(ca_cert) if ca_cert else False,
                               timeout=httpx.Timeout(600.0), follow_redirects=False)

    async def forward(request: Request) -> Response:
        raw = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1").split("?", 1)[0]
        if not fleet_path(raw):
            return PlainTextResponse("403 Forbidden: this address serves the Fleet API only\n", status_code=403)
        limit = max_body_mb * 2**20
        if int(request.headers.get("content-length", "0") or 0) > limit:
            return PlainTextResponse("413 Request too large\n", status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return PlainTextResponse("413 Request too large\n", status_code=413)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _HOP]
        try:
            reply = await client.request(request.method, raw + (f"?{request.url.query}" if request.url.query else ""),
                                         headers=headers, content=bytes(body))
        except httpx.TimeoutException:
            return PlainTextResponse("504 Gateway Timeout\n", status_code=504)
        except httpx.TransportError:  # the SuperLink is down or restarting: nodes retry on 502 as on a refused connection
            return PlainTextResponse("502 Bad Gateway\n", status_code=502)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve(listen: str, upstream: str, certs: Path | None) -> None:
    """Serve the gateway on ``listen`` (host:port) with the SuperLink's certificate (TLS unless ``certs`` is None)."""
    host, _, port = listen.rpartition(":")
    tls = {} if certs is None else {"ssl_certfile": str(Path(certs) / "superlink.crt"), "ssl_keyfile": str(Path(certs) / "superlink.key")}
    app = make_gateway(upstream, None if certs is None else Path(certs) / "ca.crt")
    uvicorn.run(app, host=host.strip("[]"), port=int(port), log_level="warning", access_log=False,
                limit_concurrency=MAX_CONCURRENT, proxy_headers=False, **tls)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT the hospitals connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certs", default=None, help="folder made by `fedsynth certs` (omit only with --insecure)")
    p.add_argument("--insecure", action="store_true")
    args = p.parse_args(argv)
    if not args.insecure and not args.certs:
        p.error("--certs is required unless --insecure")
    serve(args.listen, args.upstream, None if args.insecure else Path(args.certs))


if __name__ == "__main__":
    main()
