"""The two seams of the network shell: a message transport between nodes and a discovery service.

Both have a real implementation (aiohttp WebSockets, zeroconf) and an in-memory one (``memory.py``)
so that many nodes can run in one event loop in tests. The node (``meshllm/node.py``) only sees
these interfaces; it decodes and encodes messages itself with ``meshllm.wire``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import ssl
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from meshllm.wire.limits import DATA_CHUNK_BYTES, MAX_MESSAGE_BYTES
from meshllm.wire.messages import PROTOCOL_VERSION

SERVICE_TYPE = "_meshllm._tcp.local."
# The largest frame a link accepts: the wire's one cap. KV is sent per layer and chunked far
# below it, so anything larger is a broken or hostile peer (the link closes).
DEFAULT_MAX_MESSAGE = MAX_MESSAGE_BYTES
# Bytes a link's data lane queues before ``send_data`` waits: a few chunks, enough to keep the
# connection busy while the sender computes the next one, small enough that a stalled peer holds
# little of our memory.
DATA_QUEUE_BYTES = 4 * DATA_CHUNK_BYTES



def split_host_port(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` too) as ``(host, port)``; ValueError when it is not one."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


OnMessage = Callable[[str, bytes], None]  # (peer node id, frame)
OnPeer = Callable[[str], None]  # (peer node id)


@dataclass(frozen=True, slots=True)
class Advert:
    """What a node says about itself on discovery: a hint, never identity (links authenticate)."""

    node_id: str
    host: str
    port: int
    mesh_id: str
    proto: int = PROTOCOL_VERSION

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class LinkIdentity:
    """Who we are on a link handshake: our id, our mesh and the shared key that proves it."""

    node_id: str
    mesh_id: str
    key: bytes

    @property
    def sealed(self) -> bool:
        """Whether link frames are sealed: yes with a mesh key of our own, no on an open mesh (the
        default key is public, so sealing with it would hide nothing)."""
        return self.key != DEFAULT_MESH_KEY


class Transport(abc.ABC):
    """Authenticated message links to peers, at most one per peer pair. A link has two lanes:

    - control (``send``): never blocks and never waits behind data; for control-plane frames and
      small latency-critical data-plane frames (tokens, a decode step's activations);
    - data (``send_data``): bounded per link; the sender awaits room (backpressure); for bulk
      frames (KV chunks, a prompt's activations).

    Frames of each lane arrive in order, all through one ``on_message(peer, frame)`` callback; a
    control frame may overtake data frames sent before it. A frame over ``max_message`` bytes
    closes the link at the receiver; sending one raises ``LocalProtocolError``. Callbacks run
    on the loop.
    """

    def __init__(self) -> None:
        self._on_message: OnMessage = lambda peer, data: None
        self._on_up: OnPeer = lambda peer: None
        self._on_down: OnPeer = lambda peer: None
        # frame bytes per peer over the life of the transport (links that went down included): the
        # node's /metrics reads them
        self.bytes_sent: Counter[str] = Counter()
        self.bytes_received: Counter[str] = Counter()

    def set_handlers(self, on_message: OnMessage, on_up: OnPeer, on_down: OnPeer) -> None:
        received = self.bytes_received

        def counted(peer: str, data: bytes) -> None:
            received[peer] += len(data)
            on_message(peer, data)

        self._on_message, self._on_up, self._on_down = counted, on_up, on_down

    @abc.abstractmethod
    async def dial(self, host: str, port: int) -> str:
        """Connect and authenticate; return the peer's node id. Raises ``ProtocolError``/``OSError``."""

    @abc.abstractmethod
    def send(self, peer: str, data: bytes) -> bool:
        """Queue a frame on the control lane to ``peer`` (never blocks, goes ahead of queued data);
        False when there is no link to it."""

    @abc.abstractmethod
    async def send_data(self, peer: str, data: bytes) -> bool:
        """Queue a frame on the data lane to ``peer``, first waiting while the lane holds
        ``data_queue_bytes`` (a frame always fits an empty lane). True once queued; False when
        there is no link, or the link closes while waiting. Waiting senders go in call order."""

    @abc.abstractmethod
    def data_backlog(self, peer: str) -> int:
        """Bytes queued on the data lane to ``peer`` and not yet written (0: none or no link)."""

    @abc.abstractmethod
    def peers(self) -> list[str]:
        """Node ids with an authenticated link up."""

    def peer_addr(self, peer: str) -> tuple[str, int] | None:
        """Where ``peer``'s HTTP port is, as learned from the link (None if unknown)."""
        return None

    @abc.abstractmethod
    async def disconnect(self, peer: str) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


OnFound = Callable[[Advert], None]
OnLost = Callable[[str], None]


class Discovery(abc.ABC):
    """Announces this node and reports others of the same mesh (adverts of other meshes are dropped)."""

    @abc.abstractmethod
    async def start(self, advert: Advert, on_found: OnFound, on_lost: OnLost) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Withdraw our advert (goodbye packets) and stop browsing."""


class DataQueue:
    """A link's data lane on the sending side: a FIFO of frames bounded in bytes.

    ``put`` queues at once when the frame fits (an empty lane takes any frame) and nobody is
    waiting; otherwise it waits its turn, in call order, so a large frame is not starved by small
    ones. A frame counts against the bound until the writer reports it written (``done``), so
    the bound covers what sits in the connection's write path too. ``close`` answers every
    waiter False. Both transports use it; ``on_push`` lets a transport without a writer task
    (the in-memory one) react to new frames.
    """

    def __init__(self, limit: int, on_push: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.frames: deque[bytes] = deque()
        self.queued = 0  # bytes in ``frames``
        self.in_flight = 0  # bytes taken by the writer and not yet written
        self.closed = False
        self._waiters: deque[tuple[asyncio.Future[bool], bytes]] = deque()
        self._nonempty = asyncio.Event()
        self._on_push = on_push

    @property
    def backlog(self) -> int:
        return self.queued + self.in_flight

    @property
    def waiting(self) -> int:
        """Senders waiting for room."""
        return sum(1 for f, _ in self._waiters if not f.done())

    def _fits(self, n: int) -> bool:
        return self.backlog == 0 or self.backlog + n <= self.limit

    async def put(self, data: bytes) -> bool:
        if self.closed:
            return False
        if not self._waiters and self._fits(len(data)):
            self._push(data)
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, data))
        return await fut  # a cancelled sender's future is skipped by _admit

    def _push(self, data: bytes) -> None:
        self.frames.append(data)
        self.queued += len(data)
        self._nonempty.set()
        if self._on_push is not None:
            self._on_push()

    def _admit(self) -> None:
        while self._waiters and not self.closed:
            fut, data = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._fits(len(data)):
                return
            self._waiters.popleft()
            self._push(data)
            fut.set_result(True)

    def take(self) -> bytes | None:
        """The next frame for the writer (None: empty). Call ``done`` once it is written."""
        if not self.frames:
            return None
        data = self.frames.popleft()
        self.queued -= len(data)
        self.in_flight += len(data)
        if not self.frames:
            self._nonempty.clear()
        return data

    def done(self, data: bytes) -> None:
        self.in_flight -= len(data)
        self._admit()

    async def get(self) -> bytes | None:
        """Wait for the next frame (None once closed)."""
        while not self.frames:
            if self.closed:
                return None
            await self._nonempty.wait()
        return self.take()

    def close(self) -> None:
        self.closed = True
        for fut, _ in self._waiters:
            if not fut.done():
                fut.set_result(False)
        self._waiters.clear()
        self._nonempty.set()

    def move_to(self, other: DataQueue) -> None:
        """Hand queued frames and waiting senders to ``other`` (a link replaced by its twin)."""
        for data in self.frames:
            other._push(data)
        self.frames.clear()
        self.queued = 0
        other._waiters.extend(self._waiters)
        self._waiters.clear()
        other._admit()


# The key a node uses without --mesh-key-file: known to everyone, so such a mesh is open (a node
# says so loudly in its log and in /v1/mesh).
DEFAULT_MESH_KEY = b"meshllm-default-mesh-key"


def client_ssl() -> ssl.SSLContext:
    """TLS for connections to a peer's port: encrypted, certificate not verified. What authenticates
    a peer is the mesh key (the link handshake and its sealed frames, MACs on peer HTTP answers);
    peers' certificates are usually self-signed, and a mesh has no CA of its own."""
    global _CLIENT_SSL
    if _CLIENT_SSL is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _CLIENT_SSL = ctx
    return _CLIENT_SSL


_CLIENT_SSL: ssl.SSLContext | None = None


def server_ssl(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The TLS context of a node's HTTP port (``--tls-cert``/``--tls-key``, PEM)."""
    from meshllm.errors import UserError

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot load the TLS certificate {cert_file} with key {key_file}: {e}") from None
    return ctx


class RefusalLog:
    """Refusals (handshakes, adverts, dials) logged without letting the LAN flood the log: the first
    refusal from a source in ``window_s`` is logged, later ones from it are counted and reported on
    its next logged line; at most ``lines_per_window`` lines in all per window (the rest counted
    too). At most ``max_sources`` sources are remembered. ``now`` is a clock in seconds."""

    def __init__(self, logger: logging.Logger, now: Callable[[], float], *, window_s: float = 60.0,
                 lines_per_window: int = 5, max_sources: int = 1024, level: int = logging.WARNING) -> None:
        self.log, self.now, self.window_s = logger, now, window_s
        self.lines_per_window, self.max_sources, self.level = lines_per_window, max_sources, level
        self._last: dict[str, float] = {}  # source -> when its last line was logged
        self._held: Counter[str] = Counter()  # source -> refusals not yet reported
        self._window_start = -float("inf")
        self._lines = 0
        self._held_all = 0  # refusals not logged because of the overall limit
        self.total = 0

    def refused(self, source: str, message: str) -> bool:
        """Count one refusal; True when a line was logged for it."""
        self.total += 1
        t = self.now()
        if t - self._window_start >= self.window_s:
            self._window_start, self._lines = t, 0
            for s, when in list(self._last.items()):
                if t - when >= self.window_s and not self._held.get(s):
                    del self._last[s]
        last = self._last.get(source)
        if (last is not None and t - last < self.window_s) or self._lines >= self.lines_per_window:
            if source in self._last or len(self._last) < self.max_sources:
                self._held[source] += 1
                self._last.setdefault(source, -float("inf"))
            else:
                self._held_all += 1
            return False
        more = self._held.pop(source, 0)
        self._last[source] = t
        self._lines += 1
        extra = []
        if more:
            extra.append(f"{more} more from {source} since its last line")
        elsewhere = self._held_all + sum(self._held.values())
        if elsewhere:
            extra.append(f"{elsewhere} more from other sources not logged")
            self._held_all = 0
            self._held.clear()
        self.log.log(self.level, "%s%s", message, f" ({'; '.join(extra)})" if extra else "")
        return True
