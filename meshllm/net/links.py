"""Node-to-node links: one aiohttp WebSocket per peer pair, authenticated by the mesh key.

Before anything else crosses a link, the two ends run ``meshllm.wire.auth.Handshake`` (mutual
challenge-response HMAC over both nonces, both node ids and the mesh id): the dialer sends
``Hello``, the listener ``HelloReply`` with its proof, the dialer ``AuthProof``. A peer of another
mesh, a wrong key or garbage gets the connection closed and nothing else. Compression is off
(activations do not compress, and compression costs CPU the layers need); a frame above the size
cap closes the link.

When both ends dial each other at once there are briefly two links; both ends keep the one
dialed by the smaller node id, so they agree without talking about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from meshllm.errors import ProtocolError, RemoteProtocolError
from meshllm.net.base import DEFAULT_MAX_MESSAGE, LinkIdentity, Transport
from meshllm.wire.auth import NONCE_BYTES, Handshake
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId

log = logging.getLogger("meshllm.net.links")

LINK_PATH = "/v1/link"
HANDSHAKE_TIMEOUT = 5.0
_HANDSHAKE_MAX = 4096


class _Link:
    def __init__(self, peer: str, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 dialer: str, addr: tuple[str, int] | None = None) -> None:
        self.peer = peer
        self.addr = addr  # the peer's HTTP address
        self.ws = ws
        self.dialer = dialer  # node id of the end that opened the connection
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()


class WsTransport(Transport):
    """Links over aiohttp WebSockets. Mount ``handle`` at ``LINK_PATH`` on the node's app."""

    def __init__(self, ident: LinkIdentity, *, max_message: int = DEFAULT_MAX_MESSAGE, name: str = "",
                 port: int = 0) -> None:
        super().__init__()
        self.ident = ident
        self.name = name
        self.port = port  # our HTTP port, told to peers in the handshake
        self._codec = Codec(max_message_bytes=_HANDSHAKE_MAX)
        self.max_message = max_message
        self._links: dict[str, _Link] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.rejected = 0  # handshakes refused (wrong key, wrong mesh, garbage): for tests and status

    # --- public -------------------------------------------------------------------------------
    def peers(self) -> list[str]:
        return sorted(self._links)

    def peer_addr(self, peer: str) -> tuple[str, int] | None:
        link = self._links.get(peer)
        return link.addr if link is not None else None

    def dialer_of(self, peer: str) -> str | None:
        """Which end opened the current link to ``peer`` (None: no link)."""
        link = self._links.get(peer)
        return link.dialer if link is not None else None

    def send(self, peer: str, data: bytes) -> bool:
        link = self._links.get(peer)
        if link is None or link.closed.is_set():
            return False
        link.queue.put_nowait(data)
        return True

    async def dial(self, host: str, port: int) -> str:
        if self._closing:
            raise ProtocolError("transport is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"http://{host}:{port}{LINK_PATH}"
        ws = await self._session.ws_connect(url, compress=0, max_msg_size=self.max_message,
                                            autoping=True, heartbeat=None,
                                            timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        try:
            peer = await asyncio.wait_for(self._client_handshake(ws), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ProtocolError, aiohttp.ClientError):
            await ws.close()
            raise
        link = _Link(peer, ws, dialer=self.ident.node_id, addr=(host, port))
        if not self._register(link):
            await ws.close()
            return peer
        self._spawn(self._read_loop(link))
        return peer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The server end of a link (aiohttp route handler)."""
        ws = web.WebSocketResponse(compress=False, max_msg_size=self.max_message, autoping=True)
        await ws.prepare(request)
        if self._closing:
            await ws.close()
            return ws
        try:
            peer, peer_port = await asyncio.wait_for(self._server_handshake(ws), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ProtocolError) as e:
            self.rejected += 1
            log.warning("refused link from %s: %s", request.remote, e)
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return ws
        addr = (request.remote, peer_port) if request.remote and 0 < peer_port < 65536 else None
        link = _Link(peer, ws, dialer=peer, addr=addr)
        if self._register(link):
            await self._read_loop(link)
        else:
            await ws.close()
        return ws

    async def disconnect(self, peer: str) -> None:
        link = self._links.get(peer)
        if link is not None:
            await self._close_link(link)

    async def close(self) -> None:
        self._closing = True
        for link in list(self._links.values()):
            await self._close_link(link)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- handshake ----------------------------------------------------------------------------
    def _handshake(self, initiator: bool) -> Handshake:
        return Handshake(key=self.ident.key, node_id=NodeId(self.ident.node_id), mesh_id=self.ident.mesh_id,
                         nonce=os.urandom(NONCE_BYTES), initiator=initiator, name=self.name, port=self.port)

    async def _recv(self, ws: Any) -> Any:
        msg = await ws.receive()
        if msg.type != WSMsgType.BINARY:
            raise RemoteProtocolError("peer closed the link during the handshake "
                                      "(wrong mesh key, another mesh, or ourselves)")
        data = bytes(msg.data)
        if len(data) > _HANDSHAKE_MAX:
            raise RemoteProtocolError(f"handshake frame of {len(data)} bytes")
        return self._codec.decode(data)

    async def _server_handshake(self, ws: web.WebSocketResponse) -> tuple[str, int]:
        hs = self._handshake(initiator=False)
        for m in hs.receive(await self._recv(ws)):
            await ws.send_bytes(self._codec.encode(m))
        hs.receive(await self._recv(ws))
        assert hs.done and hs.peer is not None
        return hs.peer, int(hs.peer_port)

    async def _client_handshake(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        hs = self._handshake(initiator=True)
        await ws.send_bytes(self._codec.encode(hs.start()))
        for m in hs.receive(await self._recv(ws)):
            await ws.send_bytes(self._codec.encode(m))
        assert hs.done and hs.peer is not None
        return hs.peer

    # --- link lifecycle -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _register(self, link: _Link) -> bool:
        """Install an authenticated link; False when an existing link to the peer wins."""
        if self._closing:
            return False
        old = self._links.get(link.peer)
        if old is not None:
            preferred = min(self.ident.node_id, link.peer)
            # Same dialer on both: the peer reconnected, the old one is stale.
            if old.dialer == link.dialer or link.dialer == preferred:
                self._links[link.peer] = link
                # Frames queued on the loser but not yet written move over; frames already in
                # flight on it may be lost, which the control plane tolerates (it retries).
                while not old.queue.empty():
                    data = old.queue.get_nowait()
                    if data is not None:
                        link.queue.put_nowait(data)
                link.writer = self._spawn(self._write_loop(link))
                self._spawn(self._close_link(old, replaced=True))
                return True
            return False
        self._links[link.peer] = link
        link.writer = self._spawn(self._write_loop(link))
        log.info("link up: %s (dialed by %s)", link.peer[:12], link.dialer[:12])
        self._on_up(link.peer)
        return True

    async def _write_loop(self, link: _Link) -> None:
        try:
            while True:
                data = await link.queue.get()
                if data is None:
                    return
                await link.ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            log.info("link to %s: send failed: %s", link.peer[:12], e)
            self._spawn(self._close_link(link))

    async def _read_loop(self, link: _Link) -> None:
        try:
            async for msg in link.ws:
                if msg.type == WSMsgType.BINARY:
                    self._on_message(link.peer, bytes(msg.data))
                elif msg.type == WSMsgType.ERROR:
                    log.warning("link to %s closed: %s", link.peer[:12], link.ws.exception())
                    break
                else:
                    log.warning("link to %s: unexpected %s frame; closing", link.peer[:12], msg.type.name)
                    break
        finally:
            if link.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                log.warning("link to %s closed: a frame exceeded %d bytes", link.peer[:12], self.max_message)
            await self._close_link(link)

    async def _close_link(self, link: _Link, replaced: bool = False) -> None:
        if link.closed.is_set():
            return
        link.closed.set()
        link.queue.put_nowait(None)
        current = self._links.get(link.peer) is link
        if current:
            del self._links[link.peer]
        with contextlib.suppress(Exception):
            await link.ws.close()
        if current and not replaced:
            log.info("link down: %s", link.peer[:12])
            self._on_down(link.peer)
