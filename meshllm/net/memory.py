"""An in-memory network and discovery for many nodes in one event loop (tests, simulations).

``MemoryNetwork`` connects ``MemoryTransport`` endpoints by address. It can drop frames, delay
them, and partition the network into groups; a partition also breaks links across it, as a real
cable pull would. Authentication is modelled by comparing mesh id and key; frames above the size
cap close the link, as the WebSocket transport does. Randomness is a seeded generator.

Links have the two lanes of ``Transport``. Control frames are delivered on the next loop turn.
Data frames wait in the sender's bounded ``DataQueue`` and are delivered one per loop turn, so a
control frame sent behind a data backlog overtakes all of it but the frame being delivered, and a
sender that outpaces delivery waits (backpressure). ``stall(node)`` models a receiver that stops
reading its data lanes (their frames pile up at the senders, control still flows) until
``unstall(node)``. Dropping applies to control frames only: the data lane, like TCP, is reliable
while the link is up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import numpy as np

from meshllm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meshllm.net.base import (
    DATA_QUEUE_BYTES,
    DEFAULT_MAX_MESSAGE,
    Advert,
    DataQueue,
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
        self.stalled: set[str] = set()  # node ids not reading their data lanes

    def stall(self, node_id: str) -> None:
        """``node_id`` stops reading its data lanes (a slow or stuck consumer)."""
        self.stalled.add(node_id)

    def unstall(self, node_id: str) -> None:
        self.stalled.discard(node_id)
        for ep in list(self.endpoints.values()):
            if node_id in ep._data:
                ep._kick(node_id)

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
                 max_message: int = DEFAULT_MAX_MESSAGE, data_queue_bytes: int = DATA_QUEUE_BYTES) -> None:
        super().__init__()
        self.net = net
        self.ident = ident
        self.addr = addr
        self.max_message = max_message
        self.data_queue_bytes = data_queue_bytes
        self._links: dict[str, MemoryTransport] = {}
        self._data: dict[str, DataQueue] = {}  # peer -> our data lane to it
        self._pumping: set[str] = set()  # peers whose data lane has a delivery scheduled
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
            self._link(peer, other)
            other._link(me, self)
            self._on_up(peer)
            other._on_up(me)
        return peer

    def _link(self, peer: str, other: MemoryTransport) -> None:
        self._links[peer] = other
        self._data[peer] = DataQueue(self.data_queue_bytes, on_push=lambda: self._kick(peer))

    def peer_addr(self, peer: str) -> tuple[str, int] | None:
        other = self._links.get(peer)
        if other is None:
            return None
        host, _, port = other.addr.rpartition(":")
        return host, int(port)

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.max_message:
            raise LocalProtocolError(f"a frame of {len(data)} bytes is over the "
                                     f"{self.max_message}-byte cap; send it in chunks")

    def send(self, peer: str, data: bytes) -> bool:
        self._check_size(data)
        other = self._links.get(peer)
        if other is None:
            return False
        self.bytes_sent[peer] += len(data)
        if self.net.drop and self.net.rng.random() < self.net.drop:
            return True
        me = self.ident.node_id
        loop = asyncio.get_running_loop()
        if self.net.delay:
            loop.call_later(self.net.delay, other._deliver, me, data)
        else:
            loop.call_soon(other._deliver, me, data)
        return True

    async def send_data(self, peer: str, data: bytes) -> bool:
        self._check_size(data)
        lane = self._data.get(peer)
        if lane is None:
            return False
        if not await lane.put(data):
            return False
        self.bytes_sent[peer] += len(data)
        return True

    def data_backlog(self, peer: str) -> int:
        lane = self._data.get(peer)
        return lane.backlog if lane is not None else 0

    def _kick(self, peer: str) -> None:
        """Schedule the next delivery on our data lane to ``peer`` (one frame per loop turn)."""
        if peer in self._pumping or peer not in self._data:
            return
        self._pumping.add(peer)
        asyncio.get_running_loop().call_soon(self._pump, peer)

    def _pump(self, peer: str) -> None:
        self._pumping.discard(peer)
        lane, other = self._data.get(peer), self._links.get(peer)
        if lane is None or other is None or peer in self.net.stalled:
            return
        data = lane.take()
        if data is None:
            return
        me = self.ident.node_id
        try:
            if self.net.delay:
                asyncio.get_running_loop().call_later(self.net.delay, other._deliver, me, data)
            else:
                other._deliver(me, data)
        finally:  # a failing receiver must not leave the frame counted against the lane for ever
            lane.done(data)  # may admit a waiting sender, which kicks the pump again
            if lane.frames:
                self._kick(peer)

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
        me = self.ident.node_id
        other._links.pop(me, None)
        for ep, p in ((self, peer), (other, me)):
            lane = ep._data.pop(p, None)
            if lane is not None:
                lane.close()  # waiting senders get False
        self._on_down(peer)
        other._on_down(me)

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
