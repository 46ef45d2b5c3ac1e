"""An in-memory network and discovery for many nodes in one event loop (tests, simulations).

``MemoryNetwork`` connects ``MemoryTransport`` endpoints by address. It can drop frames, delay
them, and partition the network into groups; a partition also breaks links across it, as a real
cable pull would. Authentication is modelled by comparing mesh id and key; frames above the size
cap close the link, as the WebSocket transport does. Randomness is a seeded generator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import numpy as np

from meshllm.errors import ProtocolError, RemoteProtocolError
from meshllm.net.base import (
    DEFAULT_MAX_MESSAGE,
    Advert,
    Discovery,
    LinkIdentity,
    OnFound,
    OnLost,
    Transport,
)

log = logging.getLogger("meshllm.net.memory")


class MemoryNetwork:
    def __init__(self, *, seed: int = 0, drop: float = 0.0, delay: float = 0.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.drop = drop
        self.delay = delay  # seconds added to every frame (constant, so order is kept per link)
        self.endpoints: dict[str, MemoryTransport] = {}  # addr -> endpoint
        self._groups: dict[str, int] | None = None  # node id -> partition group

    def addr_of(self, node_id: str) -> str | None:
        for a, ep in self.endpoints.items():
            if ep.ident.node_id == node_id:
                return a
        return None

    def reachable(self, a: str, b: str) -> bool:
        if self._groups is None:
            return True
        return self._groups.get(a, -1) == self._groups.get(b, -1)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split by node id; nodes not named form their own group. Links across are cut."""
        self._groups = {n: i for i, g in enumerate(groups) for n in g}
        for ep in list(self.endpoints.values()):
            for peer in ep.peers():
                if not self.reachable(ep.ident.node_id, peer):
                    ep._drop_link(peer)

    def heal(self) -> None:
        self._groups = None


class MemoryTransport(Transport):
    def __init__(self, net: MemoryNetwork, ident: LinkIdentity, addr: str, *,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        super().__init__()
        self.net = net
        self.ident = ident
        self.addr = addr
        self.max_message = max_message
        self._links: dict[str, MemoryTransport] = {}
        self.closed = False
        net.endpoints[addr] = self

    def peers(self) -> list[str]:
        return sorted(self._links)

    async def dial(self, host: str, port: int) -> str:
        await asyncio.sleep(0)  # a real dial yields; keep the same interleavings
        if self.closed:
            raise ProtocolError("transport is closed")
        other = self.net.endpoints.get(f"{host}:{port}")
        if other is None or other.closed:
            raise ConnectionRefusedError(f"nothing listens on {host}:{port}")
        me, peer = self.ident.node_id, other.ident.node_id
        if not self.net.reachable(me, peer):
            raise TimeoutError(f"{host}:{port} unreachable (partition)")
        if other.ident.key != self.ident.key or other.ident.mesh_id != self.ident.mesh_id:
            raise RemoteProtocolError("peer refused the link (wrong mesh key, another mesh, or ourselves)")
        if peer == me:
            raise RemoteProtocolError("link to ourselves")
        if peer not in self._links:
            self._links[peer] = other
            other._links[me] = self
            self._on_up(peer)
            other._on_up(me)
        return peer

    def peer_addr(self, peer: str) -> tuple[str, int] | None:
        other = self._links.get(peer)
        if other is None:
            return None
        host, _, port = other.addr.rpartition(":")
        return host, int(port)

    def send(self, peer: str, data: bytes) -> bool:
        other = self._links.get(peer)
        if other is None:
            return False
        if self.net.drop and self.net.rng.random() < self.net.drop:
            return True
        me = self.ident.node_id
        loop = asyncio.get_running_loop()
        if self.net.delay:
            loop.call_later(self.net.delay, other._deliver, me, data)
        else:
            loop.call_soon(other._deliver, me, data)
        return True

    def _deliver(self, peer: str, data: bytes) -> None:
        if peer not in self._links or self.closed:
            return
        if len(data) > self.max_message:
            log.warning("link to %s closed: a frame exceeded %d bytes", peer[:12], self.max_message)
            self._drop_link(peer)
            return
        self._on_message(peer, data)

    def _drop_link(self, peer: str) -> None:
        other = self._links.pop(peer, None)
        if other is None:
            return
        other._links.pop(self.ident.node_id, None)
        self._on_down(peer)
        other._on_down(self.ident.node_id)

    async def disconnect(self, peer: str) -> None:
        self._drop_link(peer)

    async def close(self) -> None:
        self.closed = True
        for peer in list(self._links):
            self._drop_link(peer)
        self.net.endpoints.pop(self.addr, None)


class MemoryDiscoveryHub:
    """Every ``MemoryDiscovery`` on a hub sees the adverts of the others (of its mesh)."""

    def __init__(self) -> None:
        self.members: list[MemoryDiscovery] = []


class MemoryDiscovery(Discovery):
    def __init__(self, hub: MemoryDiscoveryHub) -> None:
        self.hub = hub
        self.advert: Advert | None = None
        self._on_found: OnFound | None = None
        self._on_lost: OnLost | None = None

    async def start(self, advert: Advert, on_found: OnFound, on_lost: OnLost) -> None:
        self.advert, self._on_found, self._on_lost = advert, on_found, on_lost
        loop = asyncio.get_running_loop()
        for other in self.hub.members:
            assert other.advert is not None
            if other.advert.mesh_id == advert.mesh_id:
                loop.call_soon(on_found, other.advert)
                if other._on_found is not None:
                    loop.call_soon(other._on_found, advert)
        self.hub.members.append(self)

    async def close(self) -> None:
        if self in self.hub.members:
            self.hub.members.remove(self)
            assert self.advert is not None
            for other in self.hub.members:
                if other._on_lost is not None and other.advert and other.advert.mesh_id == self.advert.mesh_id:
                    other._on_lost(self.advert.node_id)
