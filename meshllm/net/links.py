"""Node-to-node links: two aiohttp WebSockets per peer pair, both authenticated by the mesh key.

A link is a *control* connection and a *data* connection (see ``docs/serving.md``, "Links", for
why two). Before anything else crosses either, the two ends run ``meshllm.wire.auth.Handshake``
(mutual challenge-response HMAC over both nonces, both node ids, the mesh id, the lane and the
pairing): the dialer sends ``Hello``, the listener ``HelloReply`` with its proof, the dialer
``AuthProof``. The dialer opens the control connection first, then the data connection, whose
``Hello`` names the control connection's nonce in ``pair``; the listener holds the control
connection until its data connection arrives (or gives up after ``HANDSHAKE_TIMEOUT``). The link
is up, and ``on_up`` fires, only once both are authenticated; it goes down when either closes.
A peer of another mesh, a wrong key or garbage gets the connection closed and nothing else
(refusals are logged at most once a minute per source address, with counts).

Every frame after the handshake is sealed (``meshllm.wire.seal``: AES-256-GCM, a key per lane and
direction derived from the mesh key and both handshake nonces, counter nonces): a frame that fails
to open — altered, truncated, replayed, reordered or dropped on the way — closes the link with one
log line, and nothing of it reaches the decoder. An open mesh (the public default key) sends its
frames in the clear, as sealing them with a key everyone knows would hide nothing.
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
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from meshllm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meshllm.net.base import (
    DATA_QUEUE_BYTES,
    DEFAULT_MAX_MESSAGE,
    DataQueue,
    LinkIdentity,
    RefusalLog,
    Transport,
    client_ssl,
)
from meshllm.wire.auth import NONCE_BYTES, Handshake
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId
from meshllm.wire.seal import TAG_BYTES, Opener, Sealer

log = logging.getLogger("meshllm.net.links")

LINK_PATH = "/v1/link"
HANDSHAKE_TIMEOUT = 5.0
_HANDSHAKE_MAX = 4096

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
# (our node id, peer node id, lane, the bytes handed to the WebSocket) for every frame a link sends,
# handshake included: tests record a link's traffic with it.
Tap = Callable[[str, str, str, bytes], None]


class _Lane:
    """One connection of a link with its sealing state (None on an open mesh)."""

    __slots__ = ("name", "opener", "sealer", "ws")

    def __init__(self, name: str, ws: WebSocket, hs: Handshake, sealed: bool) -> None:
        self.name, self.ws = name, ws
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        if sealed:
            k_out, k_in = hs.frame_keys()
            self.sealer, self.opener = Sealer(k_out), Opener(k_in)


class _Link:
    def __init__(self, peer: str, control: _Lane, data: _Lane, dialer: str, data_limit: int,
                 addr: tuple[str, int] | None = None) -> None:
        self.peer = peer
        self.addr = addr  # the peer's HTTP address
        self.control = control
        self.data_lane = data
        self.ws = control.ws  # control lane
        self.data_ws = data.ws  # data lane
        self.dialer = dialer  # node id of the end that opened the connections
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # control lane, unbounded
        # the control lane's write in progress: its writer is waiting for the connection to drain,
        # or a frame written at once is (frames sent meanwhile queue behind it)
        self.writing = False
        self.finishing: asyncio.Task[None] | None = None
        self.data = DataQueue(data_limit)
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()


class _Pending:
    """A control connection accepted by the listener, waiting for its data connection."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data_ws: asyncio.Future[tuple[web.WebSocketResponse, Handshake]] = loop.create_future()
        self.link: asyncio.Future[_Link | None] = loop.create_future()


class WsTransport(Transport):
    """Links over aiohttp WebSockets. Mount ``handle`` at ``LINK_PATH`` on the node's app."""

    tap: Tap | None = None

    def __init__(self, ident: LinkIdentity, *, max_message: int = DEFAULT_MAX_MESSAGE, name: str = "",
                 port: int = 0, data_queue_bytes: int = DATA_QUEUE_BYTES, now: Callable[[], float] = time.monotonic,
                 tls: bool = False) -> None:
        super().__init__()
        self.ident = ident
        self.sealed = ident.sealed
        self.tls = tls  # this node's own port speaks TLS (peers' ports are found out per address)
        self._schemes: dict[tuple[str, int], str] = {}  # address -> "http"/"https" that worked
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
        self.bad_frames = 0  # sealed frames that failed to open (each closed its link)
        self._refusals = RefusalLog(log, now)

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
        self.bytes_sent[peer] += len(data)
        if link.writing or link.finishing is not None or not link.queue.empty():
            link.queue.put_nowait(data)  # behind the frames before it
        else:
            self._write_now(link, data)
        return True

    def _write_now(self, link: _Link, data: bytes) -> None:
        """Write a control frame on the caller's turn of the loop when nothing is ahead of it:
        a decode step's frame leaves as soon as it exists, not a loop turn (and the rest of the
        caller's work) later. aiohttp writes a frame to the socket without waiting unless the
        connection has to drain; then a task finishes the write, and frames sent meanwhile
        queue behind it."""
        coro = link.ws.send_bytes(self._wire(link, link.control, data))
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            self._send_failed(link, e)
            return
        link.finishing = self._spawn(self._finish_write(link, coro, waiting))

    async def _finish_write(self, link: _Link, coro: Any, waiting: Any) -> None:
        """Drive a write ``_write_now`` started to its end: each time it waits on a future, wait
        for that future here, then resume it (what a task does with a coroutine)."""
        try:
            while True:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    await asyncio.wait([waiting])
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    return
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            self._send_failed(link, e)
        finally:
            coro.close()
            link.finishing = None

    def _send_failed(self, link: _Link, e: BaseException, what: str = "send") -> None:
        """A write to the link failed: say so and close the link (its requests fail over)."""
        log.info("link to %s: %s failed: %s", link.peer[:12], what, e)
        self._spawn(self._close_link(link))

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
        url, ws = await self._connect_any(host, port)
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
        link = _Link(peer, _Lane("control", ws, hs, self.sealed), _Lane("data", data_ws, hs_data, self.sealed),
                     dialer=self.ident.node_id, data_limit=self.data_queue_bytes, addr=(host, port))
        if not self._register(link):
            await ws.close()
            await data_ws.close()
            return peer
        link.tasks.append(self._spawn(self._read_loop(link, ws)))
        link.tasks.append(self._spawn(self._read_loop(link, data_ws)))
        return peer

    @property
    def _wire_max(self) -> int:
        """The largest WebSocket message a lane carries: the frame cap plus the seal's tag."""
        return self.max_message + (TAG_BYTES if self.sealed else 0)

    async def _connect_any(self, host: str, port: int) -> tuple[str, aiohttp.ClientWebSocketResponse]:
        """The control connection, over the scheme that worked for this address before, else
        plain HTTP first and then TLS (a peer's port speaks one of them)."""
        known = self._schemes.get((host, port))
        schemes = [known] if known else (["https", "http"] if self.tls else ["http", "https"])
        err: BaseException | None = None
        for scheme in schemes:
            url = f"{'wss' if scheme == 'https' else 'ws'}://{host}:{port}{LINK_PATH}"
            try:
                ws = await self._connect(url)
            except (aiohttp.ClientError, OSError) as e:
                err = err or e
                continue
            self._schemes[(host, port)] = scheme
            return url, ws
        assert err is not None
        raise err

    async def _connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        # aiohttp refuses a message of max_msg_size bytes or more; ours is "more than the cap".
        # TLS to a peer is not verified: the link's handshake and seal are what authenticate it.
        return await self._session.ws_connect(url, compress=0, max_msg_size=self._wire_max + 1,
                                              autoping=True, heartbeat=None,
                                              ssl=client_ssl() if url.startswith("wss:") else True,
                                              timeout=aiohttp.ClientWSTimeout(ws_close=2.0))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The server end of a link connection, control or data (aiohttp route handler)."""
        ws = web.WebSocketResponse(compress=False, max_msg_size=self._wire_max + 1, autoping=True)
        await ws.prepare(request)
        if self._closing:
            await ws.close()
            return ws
        try:
            hs = await asyncio.wait_for(self._server_handshake(ws), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ProtocolError) as e:
            self.rejected += 1
            self._refusals.refused(request.remote or "?", f"refused link from {request.remote}: {e}")
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return ws
        assert hs.peer is not None and hs.initiator_nonce is not None
        if hs.lane == "data":
            await self._serve_data(ws, hs, request.remote)
            return ws
        key = (hs.peer, hs.initiator_nonce)
        pending = self._pending[key] = _Pending()
        try:
            data_ws, hs_data = await asyncio.wait_for(asyncio.shield(pending.data_ws), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            self.rejected += 1
            self._refusals.refused(request.remote or "?", f"refused link from {request.remote}: no data "
                                   f"connection within {HANDSHAKE_TIMEOUT:.0f} s")
            pending.link.set_result(None)
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return ws
        finally:
            self._pending.pop(key, None)
        peer_port = int(hs.peer_port)
        addr = (request.remote, peer_port) if request.remote and 0 < peer_port < 65536 else None
        link = _Link(hs.peer, _Lane("control", ws, hs, self.sealed), _Lane("data", data_ws, hs_data, self.sealed),
                     dialer=hs.peer, data_limit=self.data_queue_bytes, addr=addr)
        registered = self._register(link)
        pending.link.set_result(link if registered else None)
        if registered:
            await self._read_loop(link, ws)
        else:
            await ws.close()
        return ws

    async def _serve_data(self, ws: web.WebSocketResponse, hs: Handshake, remote: str | None) -> None:
        assert hs.peer is not None
        pending = self._pending.get((hs.peer, hs.pair))
        if pending is None or pending.data_ws.done():
            self.rejected += 1
            self._refusals.refused(remote or "?", f"refused a data connection from {remote}: no control "
                                   "connection to pair it with")
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            return
        pending.data_ws.set_result((ws, hs))
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

    def _tapped(self, peer: str | None, lane: str, data: bytes) -> bytes:
        tap = self.tap
        if tap is not None:
            tap(self.ident.node_id, peer or "", lane, data)
        return data

    async def _server_handshake(self, ws: web.WebSocketResponse) -> Handshake:
        hs = self._handshake(initiator=False)
        for m in hs.receive(await self._recv(ws)):
            await ws.send_bytes(self._tapped(hs.peer, hs.lane, self._codec.encode(m)))
        hs.receive(await self._recv(ws))
        assert hs.done and hs.peer is not None
        return hs

    async def _client_handshake(self, ws: aiohttp.ClientWebSocketResponse, lane: str, pair: bytes) -> Handshake:
        hs = self._handshake(initiator=True, lane=lane, pair=pair)
        await ws.send_bytes(self._tapped(None, lane, self._codec.encode(hs.start())))
        for m in hs.receive(await self._recv(ws)):
            await ws.send_bytes(self._tapped(hs.peer, lane, self._codec.encode(m)))
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
                link.writing = True
                try:
                    if link.finishing is not None:  # a frame written at once is still going out
                        await asyncio.wait([link.finishing])
                    await link.ws.send_bytes(self._wire(link, link.control, data))
                finally:
                    link.writing = False
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            self._send_failed(link, e)

    async def _data_write_loop(self, link: _Link) -> None:
        try:
            while True:
                data = await link.data.get()
                if data is None:
                    return
                try:
                    # Returns once aiohttp's buffer has drained below its high-water mark, so the
                    # bound on the lane also bounds what piles up in the connection.
                    await link.data_ws.send_bytes(self._wire(link, link.data_lane, data))
                finally:
                    link.data.done(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            self._send_failed(link, e, "data send")

    def _wire(self, link: _Link, lane: _Lane, data: bytes) -> bytes:
        """What goes on the connection for a frame: sealed (keyed mesh) or the frame itself."""
        out = lane.sealer.seal(data) if lane.sealer is not None else data
        tap = self.tap
        if tap is not None:
            tap(self.ident.node_id, link.peer, lane.name, out)
        return out

    async def _read_loop(self, link: _Link, ws: WebSocket) -> None:
        lane = link.control if ws is link.ws else link.data_lane
        opener = lane.opener
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    # aiohttp hands over the message as bytes already: passed on without a copy
                    # (opening a sealed frame makes the one copy, the plaintext).
                    if opener is None:
                        self._on_message(link.peer, msg.data)
                        continue
                    try:
                        frame = opener.open(msg.data)
                    except RemoteProtocolError as e:
                        self.bad_frames += 1
                        log.warning("link to %s closed: %s lane: %s", link.peer[:12], lane.name, e)
                        break
                    self._on_message(link.peer, frame)
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
