"""The two seams of the network shell: a message transport between nodes and a discovery service.

Both have a real implementation (aiohttp WebSockets, zeroconf) and an in-memory one (``memory.py``)
so that many nodes can run in one event loop in tests. The node (``meshllm/node.py``) only sees
these interfaces; it decodes and encodes messages itself with ``meshllm.wire``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

PROTOCOL_VERSION = 1
SERVICE_TYPE = "_meshllm._tcp.local."
# The largest frame a link accepts. KV is sent per layer and chunked below this, so anything
# larger is a broken or hostile peer.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

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


class Transport(abc.ABC):
    """Authenticated message links to peers, at most one per peer pair.

    ``send`` never blocks: frames are queued per link and written by the link's own task, so a
    state machine's outputs can be performed from synchronous code. Callbacks run on the loop.
    """

    def __init__(self) -> None:
        self._on_message: OnMessage = lambda peer, data: None
        self._on_up: OnPeer = lambda peer: None
        self._on_down: OnPeer = lambda peer: None

    def set_handlers(self, on_message: OnMessage, on_up: OnPeer, on_down: OnPeer) -> None:
        self._on_message, self._on_up, self._on_down = on_message, on_up, on_down

    @abc.abstractmethod
    async def dial(self, host: str, port: int) -> str:
        """Connect and authenticate; return the peer's node id. Raises ``ProtocolError``/``OSError``."""

    @abc.abstractmethod
    def send(self, peer: str, data: bytes) -> bool:
        """Queue a frame to ``peer``; False when there is no link to it."""

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
