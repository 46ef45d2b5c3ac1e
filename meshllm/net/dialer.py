"""Keeping links to the mesh up: who the peers are and where, dialling them, redialling seeds and
known peers, fetching their profiles and measuring the links to them.

One ``Dialer`` per node. Discovery (``on_found``/``on_lost``) and the transport (``on_link_up``)
feed it; ``run()`` is its maintenance loop (every second, or at once when woken). One link per
pair: the smaller node id dials at once, the other waits a little, so both rarely dial together
(and when they do, the transport keeps one link).

What the LAN says is a hint and is treated as one: an advert never moves a peer that has a live
link (its address is where the link authenticated), the peer table holds at most ``MAX_PEERS``
entries, an entry that never authenticates expires after ``UNAUTHENTICATED_TTL_S``, a peer that
keeps failing is redialled less and less often, and refusals are logged at most once a minute
per source, with counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshllm.errors import ProtocolError
from meshllm.net.base import Advert, RefusalLog, Transport, split_host_port
from meshllm.net.peer_http import PeerHttp

log = logging.getLogger("meshllm.net.dialer")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass(slots=True)
class PeerInfo:
    addr: tuple[str, int] | None = None
    profile: dict[str, Any] | None = None  # the peer's /v1/profile document (MAC-checked: peer_http)
    fetched_at: float = 0.0
    found_at: float = 0.0  # when the entry was made
    authenticated: bool = False  # a link to it has come up at least once
    failures: int = 0  # dials in a row that failed
    next_dial: float = 0.0  # not redialled before this time


# The peer table's bound: a LAN host can advertise any number of node ids.
MAX_PEERS = 256
# An entry that no link ever authenticated is forgotten after this long.
UNAUTHENTICATED_TTL_S = 120.0
# Redialling a peer that keeps failing backs off up to this.
MAX_REDIAL_S = 30.0


# How often a linked peer is asked whom it is linked to (``/v1/profile``'s ``peers``): static
# peers are not relayed by mDNS, so this is how a node seeded with one peer finds the rest.
PEER_EXCHANGE_S = 5.0


class Dialer:
    """``spawn`` runs a coroutine as one of the node's tasks (cancelled when the node stops);
    ``closed`` says whether the node is stopping. Set ``transport`` before ``run()``."""

    def __init__(self, node_id: str, mesh_id: str, peer_http: PeerHttp, seeds: tuple[tuple[str, int], ...],
                 *, spawn: Spawn, closed: Callable[[], bool], redial_delay: float = 1.0,
                 now: Callable[[], float] | None = None, max_peers: int = MAX_PEERS) -> None:
        self.node_id = node_id
        self.mesh_id = mesh_id
        self.peer_http = peer_http
        self.transport: Transport | None = None
        self.peers: dict[str, PeerInfo] = {}
        self.link_stats: dict[str, dict[str, float]] = {}  # peer -> {mbps, rtt_ms} we measured
        self.seed_peers: dict[tuple[str, int], str | None] = {a: None for a in seeds}
        self.redial_delay = redial_delay
        self._spawn = spawn
        self._closed = closed
        self._dialing: set[tuple[str, int]] = set()
        self._warned: set[tuple[str, int]] = set()  # seeds already reported as refusing us
        self._wake = asyncio.Event()
        self.max_peers = max_peers
        self._now = now
        self.refused_adverts = 0  # adverts not taken (table full, or naming a linked peer elsewhere)
        self._refusals = RefusalLog(log, self.now)

    def now(self) -> float:
        return self._now() if self._now is not None else asyncio.get_running_loop().time()

    def _linked(self) -> set[str]:
        return set(self.transport.peers()) if self.transport is not None else set()

    def _entry(self, node_id: str, authenticated: bool = False) -> PeerInfo | None:
        """The table's entry for ``node_id``, made if there is room (an authenticated peer always
        gets one, in place of the oldest entry that never authenticated); None when full."""
        info = self.peers.get(node_id)
        if info is not None:
            return info
        if len(self.peers) >= self.max_peers:
            linked = self._linked()
            victims = [n for n, i in self.peers.items() if not i.authenticated and n not in linked]
            if not authenticated or not victims:
                return None
            del self.peers[min(victims, key=lambda n: self.peers[n].found_at)]
        info = self.peers[node_id] = PeerInfo(found_at=self.now())
        return info

    def expire(self) -> None:
        """Forget entries that never authenticated within ``UNAUTHENTICATED_TTL_S``."""
        t, linked = self.now(), self._linked()
        for nid, info in list(self.peers.items()):
            if not info.authenticated and nid not in linked and t - info.found_at >= UNAUTHENTICATED_TTL_S:
                del self.peers[nid]

    def wake(self) -> None:
        self._wake.set()

    # --- discovery ------------------------------------------------------------------------------
    def on_found(self, ad: Advert) -> None:
        if ad.node_id == self.node_id or self._closed():
            return
        addr = (ad.host, ad.port)
        if ad.node_id in self._linked():
            # Linked: its address is where the link authenticated; an advert does not move it.
            info = self.peers.get(ad.node_id)
            if info is not None and info.addr != addr:
                self.refused_adverts += 1
                self._refusals.refused(ad.host, f"ignored an advert placing linked peer {ad.node_id[:12]} "
                                                f"at {ad.addr} (its link is up elsewhere)")
            return
        info = self._entry(ad.node_id)
        if info is None:
            self.refused_adverts += 1
            self._refusals.refused(ad.host, f"peer table full ({self.max_peers} entries): ignored the "
                                            f"advert of {ad.node_id[:12]} at {ad.addr}")
            return
        if info.addr != addr:  # a new address starts afresh; a repeated advert does not
            info.addr, info.failures, info.next_dial = addr, 0, 0.0
        if self.now() < info.next_dial:
            return
        self._wake.set()
        delay = 0.0 if self.node_id < ad.node_id else self.redial_delay
        self._spawn(self._dial_later(ad.node_id, ad.host, ad.port, delay))

    def on_lost(self, node_id: str) -> None:
        info = self.peers.get(node_id)
        if info is not None:
            info.addr = None

    def on_link_up(self, peer: str) -> None:
        info = self._entry(peer, authenticated=True)
        if info is None:  # a table full of live links: nothing to evict
            return
        info.authenticated, info.failures, info.next_dial = True, 0, 0.0
        if self.transport is not None:
            # Where the link authenticated: the address we dialled, or for a peer that dialled us,
            # its address on the connection and the HTTP port it told us in the handshake. Not an
            # advert's, which anyone can send.
            info.addr = self.transport.peer_addr(peer) or info.addr
        self._wake.set()

    # --- dialling -------------------------------------------------------------------------------
    async def _dial_later(self, node_id: str | None, host: str, port: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self.dial(node_id, host, port)

    async def dial(self, node_id: str | None, host: str, port: int) -> None:
        assert self.transport is not None
        if self._closed() or (node_id is not None and node_id in self.transport.peers()):
            return
        if (host, port) in self._dialing:
            return
        self._dialing.add((host, port))
        try:
            peer = await self.transport.dial(host, port)
            if (host, port) in self.seed_peers:
                self.seed_peers[(host, port)] = peer
            info = self._entry(peer, authenticated=True)
            if info is not None:
                info.addr, info.authenticated = (host, port), True
            return
        except ProtocolError as e:
            # Refused by the handshake: worth saying for a seed the operator named.
            warn = (host, port) in self.seed_peers and (host, port) not in self._warned
            self._warned.add((host, port))
            log.log(logging.WARNING if warn else logging.DEBUG, "link to %s:%d refused: %s", host, port, e)
        except (OSError, TimeoutError) as e:
            log.debug("dial %s:%d failed: %s", host, port, e)
        except Exception as e:  # aiohttp raises its own ClientError family here
            log.debug("dial %s:%d failed: %r", host, port, e)
        finally:
            self._dialing.discard((host, port))
        info = self.peers.get(node_id) if node_id is not None else None
        if info is not None and info.addr == (host, port):
            info.failures += 1
            info.next_dial = self.now() + min(MAX_REDIAL_S, self.redial_delay * 2 ** min(info.failures, 8))

    # --- maintenance ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Redial seeds and known peers, fetch peers' profiles and measure links (every second)."""
        while True:
            self._wake.clear()
            assert self.transport is not None
            loop = asyncio.get_running_loop()
            linked = set(self.transport.peers())
            self.expire()
            for (host, port), nid in list(self.seed_peers.items()):
                if nid is None or nid not in linked:
                    self._spawn(self.dial(nid, host, port))
            now = self.now()
            for nid, info in list(self.peers.items()):
                if info.addr is None:
                    continue
                if nid not in linked and self.node_id < nid and now >= info.next_dial:
                    self._spawn(self.dial(nid, *info.addr))
                if nid in linked and (info.profile is None or info.profile.get("profile") is None
                                      or loop.time() - info.fetched_at >= PEER_EXCHANGE_S):
                    self._spawn(self._refresh_peer(nid, info))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _refresh_peer(self, nid: str, info: PeerInfo) -> None:
        loop = asyncio.get_running_loop()
        if info.addr is None or loop.time() - info.fetched_at < 1.0:
            return
        info.fetched_at = loop.time()
        doc = await self.peer_http.fetch_profile(*info.addr)
        if not doc or doc.get("node_id") != nid or doc.get("mesh_id") != self.mesh_id:
            return
        info.profile = doc
        self._learn_peers(doc.get("peers"))
        if nid not in self.link_stats:
            m = await self.peer_http.probe(*info.addr)
            if m is not None:
                self.link_stats[nid] = {"mbps": round(m[0], 3), "rtt_ms": round(m[1], 3)}
                log.info("link to %s: %.1f Mb/s, rtt %.2f ms", nid[:12], m[0], m[1])

    def _learn_peers(self, peers: Any) -> None:
        """Addresses of members a linked peer is linked to, for the ones we have none of. Only a
        hint: dialling one still has to pass the handshake."""
        if not isinstance(peers, dict):
            return
        for nid, addr in peers.items():
            if not isinstance(nid, str) or nid == self.node_id or not isinstance(addr, str):
                continue
            try:
                host_port = split_host_port(addr)
            except ValueError:
                continue
            info = self._entry(nid)
            if info is not None and info.addr is None:
                info.addr = host_port
                self._wake.set()

    def linked_addresses(self) -> dict[str, str]:
        """``node id -> "host:port"`` of the peers linked now whose address we know."""
        linked = set(self.transport.peers()) if self.transport is not None else set()
        return {nid: f"{info.addr[0]}:{info.addr[1]}" for nid, info in self.peers.items()
                if nid in linked and info.addr is not None}

    async def gather_links(self, members: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """Every member's own link measurements (from its /v1/profile), ours included."""
        links: dict[str, dict[str, Any]] = {self.node_id: dict(self.link_stats)}
        asked = [(n, info.addr) for n in members if n != self.node_id
                 and (info := self.peers.get(n)) is not None and info.addr is not None]

        async def one(addr: tuple[str, int]) -> dict[str, Any] | None:
            return await asyncio.wait_for(self.peer_http.fetch_profile(*addr), 3.0)

        docs = await asyncio.gather(*(one(a) for _, a in asked), return_exceptions=True)
        for (n, _), doc in zip(asked, docs, strict=True):
            if isinstance(doc, dict) and isinstance(doc.get("links"), dict):
                links[n] = doc["links"]
        return links
