"""The node's one HTTP port: the JSON API, the node-to-node links and status.

Routes (more are added by the serving layer, e.g. ``POST /v1/chat/completions``):

- ``GET  /v1/mesh``     the mesh as this node sees it (members, leader, term, plan, readiness)
- ``GET  /v1/profile``  this node's advert and measured profile (fetched by peers on discovery)
- ``POST /v1/replan``   ask the leader for a new plan (loopback clients, or the mesh key)
- ``GET  /v1/probe``    ``?bytes=N`` (at most 1 MiB) for link measurements (members only: mesh key)
- ``GET  /v1/link``     WebSocket upgrade for an authenticated node link
- ``GET  /healthz``     liveness

A request that carries ``X-Meshllm-Challenge`` gets its answer MACed with the mesh key
(``X-Meshllm-Mac``, see ``meshllm.net.peer_http``): that is how peers know a profile, a link
measurement or the dashboard's figures came from a member. With a certificate and key
(``--tls-cert``/``--tls-key``) the port speaks HTTPS, links (``wss://``) included.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from meshllm.net.links import LINK_PATH
from meshllm.net.peer_http import (
    CHALLENGE_HEADER,
    CHALLENGE_MAX,
    MAC_HEADER,
    PROBE_TOKEN_HEADER,
    response_mac,
)

log = logging.getLogger("meshllm.net.server")

REPLAN_TOKEN_HEADER = "X-Meshllm-Token"
PROBE_MAX = 1 << 20


class NodeApi(Protocol):
    def mesh_view(self) -> dict[str, Any]: ...
    def profile_view(self) -> dict[str, Any]: ...
    def request_replan(self, reason: str) -> dict[str, Any]: ...
    def operator_token(self) -> str: ...
    def probe_token(self) -> str: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def mac_middleware(mac_key: bytes) -> Any:
    """MAC every complete answer to a request that asks for it with a challenge."""

    @web.middleware
    async def mac(request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        challenge = request.headers.get(CHALLENGE_HEADER, "")
        if (challenge and len(challenge) <= CHALLENGE_MAX and isinstance(resp, web.Response)
                and isinstance(resp.body, bytes | bytearray)):
            resp.headers[MAC_HEADER] = response_mac(mac_key, challenge, request.path_qs, resp.status,
                                                    bytes(resp.body))
        return resp

    return mac


def make_app(api: NodeApi, link_handler: Handler, mac_key: bytes = b"") -> web.Application:
    app = web.Application(client_max_size=1 << 20, middlewares=[mac_middleware(mac_key)] if mac_key else [])

    async def mesh(request: web.Request) -> web.Response:
        return web.json_response(api.mesh_view())

    async def profile(request: web.Request) -> web.Response:
        return web.json_response(api.profile_view())

    async def replan(request: web.Request) -> web.Response:
        remote = request.remote or ""
        try:
            loopback = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            loopback = False
        token = request.headers.get(REPLAN_TOKEN_HEADER, "")
        if not loopback and not hmac.compare_digest(token.encode(), api.operator_token().encode()):
            return web.json_response({"error": "replan is allowed from loopback or with the mesh key "
                                               "(meshllm replan --mesh-key-file)"}, status=403)
        return web.json_response(api.request_replan("operator request"))

    async def probe(request: web.Request) -> web.Response:
        token = request.headers.get(PROBE_TOKEN_HEADER, "")
        if not hmac.compare_digest(token.encode(), api.probe_token().encode()):
            return web.json_response({"error": "members only"}, status=403)
        try:
            n = int(request.query.get("bytes", "0"))
        except ValueError:
            n = -1
        if not 0 <= n <= PROBE_MAX:
            return web.json_response({"error": f"bytes must be in [0, {PROBE_MAX}]"}, status=400)
        return web.Response(body=bytes(n), content_type="application/octet-stream")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/v1/mesh", mesh)
    app.router.add_get("/v1/profile", profile)
    app.router.add_post("/v1/replan", replan)
    app.router.add_get(LINK_PATH, link_handler)
    app.router.add_get("/v1/probe", probe)
    app.router.add_get("/healthz", healthz)
    return app


class HttpServer:
    """Binds the port first (so port 0 works and the real port can be advertised), then serves."""

    def __init__(self, app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # HTTPS (and wss:// links) when set
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            from meshllm.errors import UserError
            raise UserError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
