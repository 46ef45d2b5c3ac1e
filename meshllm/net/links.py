"""Node-to-node links: two aiohttp WebSockets per peer pair, both authenticated by the mesh key.

A link is a *control* connection and a *data* connection (see ``docs/serving.md``, "Links", for
why two). Before anything else crosses either, the two ends run ``meshllm.wire.auth.Handshake``
(mutual challenge-response HMAC over both nonces, both node ids, the mesh id, the lane and the
pairing): the dialer sends ``Hello``, the listener ``HelloReply`` with its proof, the dialer
``AuthProof``. The dialer opens the control connection first, then the data connection, whose
``Hello`` names the control connection's nonce in ``pair``; the listener holds the control
connection until its data connection arrives (or gives up after ``HANDSHAKE_TIMEOUT``). The link
is up, and ``on_up`` fires, only once both are authenticated; it goes down when either closes.
A peer of another mesh, a wrong key or garbage gets the connection closed and nothing else.
Compression is off (activations do not compress, and compression costs CPU the layers need); a
frame above the size cap closes the link.

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

from meshllm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meshllm.net.base import DATA_QUEUE_BYTES, DEFAULT_MAX_MESSAGE, DataQueue, LinkIdentity, Transport
from meshllm.wire.auth import NONCE_BYTES, Handshake
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId

log = logging.getLogger("meshllm.net.links")

LINK_PATH = "/v1/link"
HANDSHAKE_TIMEOUT = 5.0
_HANDSHAKE_MAX = 4096

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class _Link:
    def __init__(self, peer: str, ws: WebSocket, data_ws: WebSocket, dialer: str, data_limit: int,
                 addr: tuple[str, int] | None = None) -> None:
        self.peer = peer
        self.addr = addr  # the peer's HTTP address
        self.ws = ws  # control lane
        self.data_ws = data_ws  # data lane
        self.dialer = dialer  # node id of the end that opened the connections
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # control lane, unbounded
        self.data = DataQueue(data_limit)
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()


class _Pending:
    """A control connection accepted by the listener, waiting for its data connection."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data_ws: asyncio.Future[web.WebSocketResponse] = loop.create_future()
        self.link: asyncio.Future[_Link | None] = loop.create_future()


class WsTransport(Transport):
    """Links over aiohttp WebSockets. Mount ``handle`` at ``LINK_PATH`` on the node's app."""

    def __init__(self, ident: LinkIdentity, *, max_message: int = DEFAULT_MAX_MESSAGE, name: str = "",
                 port: int = 0, data_queue_bytes: int = DATA_QUEUE_BYTES) -> None:
        super().__init__()
        self.ident = ident
        self.name = name
        self.port = port  # our HTTP port, told to peers in the handshake
        self._codec = Codec(max_message_bytes=_HANDSHAKE_MAX)
        self.max_message = max_message
        self.data_queue_bytes = data_queue_bytes
        self._links: dict[str, _Link] = {}
        self._pending: dict[tuple[str, bytes], _Pending] = {}
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

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.max_message:
            raise LocalProtocolError(f"a frame of {len(data)} bytes is over the "
                                     f"{self.max_message}-byte cap; send it in chunks")

    def send(self, peer: str, data: bytes) -> bool:
        self._check_size(data)
        link = self._links.get(peer)
        if link is None or link.closed.is_set():
            return False
        link.queue.put_nowait(data)
        self.bytes_sent[peer] += len(data)
        return True

    async def send_data(self, peer: str, data: bytes) -> bool:
        self._check_size(data)
        while True:
            link = self._links.get(peer)
            if link is None or link.closed.is_set():
                return False
            if await link.data.put(data):
                self.bytes_sent[peer] += len(data)
                return True
            # The lane closed while we waited: the link went down, or was replaced by its twin
            # (whose queue took over the other waiters); look again.

    def data_backlog(self, peer: str) -> int:
        link = self._links.get(peer)
        return link.data.backlog if link is not None else 0

    async def dial(self, host: str, port: int) -> str:
        if self._closing:
            raise ProtocolError("transport is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"http://{host}:{port}{LINK_PATH}"
        ws = await self._connect(url)
        data_ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            hs = await asyncio.wait_for(self._client_handshake(ws, "control", b""), HANDSHAKE_TIMEOUT)
            peer, pair = hs.peer, hs.initiator_nonce
            assert peer is not None and pair is not None
            data_ws = await self._connect(url)
            hs_data = await asyncio.wait_for(self._client_handshake(data_ws, "data", pair), HANDSHAKE_TIMEOUT)
            if hs_data.peer != peer:
                raise RemoteProtocolError(f"data connection answered by {hs_data.peer!r}, not {peer!r}")
        except (TimeoutError, ProtocolError, aiohttp.ClientError, OSError):
            await ws.close()
            if data_ws is not None:
                await data_ws.close()
            raise
        link = _Link(peer, ws, data_ws, dialer=self.ident.node_id, data_limit=self.data_queue_bytes,
                     addr=(host, port))
        if not self._register(link):
            await ws.close()
            await data_ws.close()
            return peer
        link.tasks.append(self._spawn(self._read_loop(link, ws)))
        link.tasks.append(self._spawn(self._read_loop(link, data_ws)))
        return peer

    async def _connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        # aiohttp refuses a message of max_msg_size bytes or more; ours is "more than the cap".
        return await self._session.ws_connect(url, compress=0, max_msg_size=self.max_message + 1,
                                              autoping=True, heartbeat=None,
                                              timeout=aiohttp.ClientWSTimeout(ws_close=2.0))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The server end of a link connection, control or data (aiohttp route handler)."""
        ws = web.WebSocketResponse(compress=False, max_msg_size=self.max_message + 1, autoping=True)
        await ws.prepare(request)
        if self._closing:
            await ws.close()
            return ws
        try:
            hs = await asyncio.wait_for(self._server_handshake(ws), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ProtocolError) as e:
            self.rejected += 1
            log.warning("refused link from %s: %s", request.remote, e)
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return ws
        assert hs.peer is not None and hs.initiator_nonce is not None
        if hs.lane == "data":
            await self._serve_data(ws, hs.peer, hs.pair, request.remote)
            return ws
        key = (hs.peer, hs.initiator_nonce)
        pending = self._pending[key] = _Pending()
        try:
            data_ws = await asyncio.wait_for(asyncio.shield(pending.data_ws), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            self.rejected += 1
            log.warning("refused link from %s: no data connection within %.0f s", request.remote,
                        HANDSHAKE_TIMEOUT)
            pending.link.set_result(None)
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return ws
        finally:
            self._pending.pop(key, None)
        peer_port = int(hs.peer_port)
        addr = (request.remote, peer_port) if request.remote and 0 < peer_port < 65536 else None
        link = _Link(hs.peer, ws, data_ws, dialer=hs.peer, data_limit=self.data_queue_bytes, addr=addr)
        registered = self._register(link)
        pending.link.set_result(link if registered else None)
        if registered:
            await self._read_loop(link, ws)
        else:
            await ws.close()
        return ws

    async def _serve_data(self, ws: web.WebSocketResponse, peer: str, pair: bytes, remote: str | None) -> None:
        pending = self._pending.get((peer, pair))
        if pending is None or pending.data_ws.done():
            self.rejected += 1
            log.warning("refused a data connection from %s: no control connection to pair it with", remote)
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return
        pending.data_ws.set_result(ws)
        link = await pending.link
        if link is None:
            await ws.close()
            return
        await self._read_loop(link, ws)

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
    def _handshake(self, initiator: bool, lane: str = "control", pair: bytes = b"") -> Handshake:
        return Handshake(key=self.ident.key, node_id=NodeId(self.ident.node_id), mesh_id=self.ident.mesh_id,
                         nonce=os.urandom(NONCE_BYTES), initiator=initiator, name=self.name, port=self.port,
                         lane=lane, pair=pair)

    async def _recv(self, ws: Any) -> Any:
        msg = await ws.receive()
        if msg.type != WSMsgType.BINARY:
            raise RemoteProtocolError("peer closed the link during the handshake "
                                      "(wrong mesh key, another mesh, or ourselves)")
        data = msg.data
        if len(data) > _HANDSHAKE_MAX:
            raise RemoteProtocolError(f"handshake frame of {len(data)} bytes")
        return self._codec.decode(data)

    async def _server_handshake(self, ws: web.WebSocketResponse) -> Handshake:
        hs = self._handshake(initiator=False)
        for m in hs.receive(await self._recv(ws)):
            await ws.send_bytes(self._codec.encode(m))
        hs.receive(await self._recv(ws))
        assert hs.done and hs.peer is not None
        return hs

    async def _client_handshake(self, ws: aiohttp.ClientWebSocketResponse, lane: str, pair: bytes) -> Handshake:
        hs = self._handshake(initiator=True, lane=lane, pair=pair)
        await ws.send_bytes(self._codec.encode(hs.start()))
        for m in hs.receive(await self._recv(ws)):
            await ws.send_bytes(self._codec.encode(m))
        assert hs.done and hs.peer is not None
        return hs

    # --- link lifecycle -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _start_writers(self, link: _Link) -> None:
        link.tasks.append(self._spawn(self._write_loop(link)))
        link.tasks.append(self._spawn(self._data_write_loop(link)))

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
                # Frames queued on the loser but not yet written move over, and its waiting data
                # senders with them; frames already in flight on it may be lost, which the
                # control plane tolerates (it retries).
                while not old.queue.empty():
                    data = old.queue.get_nowait()
                    if data is not None:
                        link.queue.put_nowait(data)
                old.data.move_to(link.data)
                self._start_writers(link)
                self._spawn(self._close_link(old, replaced=True))
                return True
            return False
        self._links[link.peer] = link
        self._start_writers(link)
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

    async def _data_write_loop(self, link: _Link) -> None:
        try:
            while True:
                data = await link.data.get()
                if data is None:
                    return
                try:
                    # Returns once aiohttp's buffer has drained below its high-water mark, so the
                    # bound on the lane also bounds what piles up in the connection.
                    await link.data_ws.send_bytes(data)
                finally:
                    link.data.done(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            log.info("link to %s: data send failed: %s", link.peer[:12], e)
            self._spawn(self._close_link(link))

    async def _read_loop(self, link: _Link, ws: WebSocket) -> None:
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    # aiohttp hands over the message as bytes already: passed on without a copy.
                    self._on_message(link.peer, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    log.warning("link to %s closed: %s", link.peer[:12], ws.exception())
                    break
                else:
                    log.warning("link to %s: unexpected %s frame; closing", link.peer[:12], msg.type.name)
                    break
        finally:
            log.debug("link to %s: %s connection ended (close code %s)", link.peer[:12],
                      "control" if ws is link.ws else "data", ws.close_code)
            if ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                log.warning("link to %s closed: a frame exceeded %d bytes", link.peer[:12], self.max_message)
            await self._close_link(link)

    async def _close_link(self, link: _Link, replaced: bool = False) -> None:
        if link.closed.is_set():
            return
        link.closed.set()
        link.queue.put_nowait(None)
        link.data.close()
        current = self._links.get(link.peer) is link
        if current:
            del self._links[link.peer]
        # Both at once: a peer that went silent costs one close timeout, not two.
        await asyncio.gather(link.ws.close(), link.data_ws.close(), return_exceptions=True)
        if current and not replaced:
            log.info("link down: %s", link.peer[:12])
            self._on_down(link.peer)
