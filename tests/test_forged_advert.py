"""A LAN host forges a member's mDNS advert — the member's node id and mesh id (both public) at
its own address, where an HTTP server serves that member's profile with ``memory_bytes: 1`` and
answers link handshakes without the mesh key. Real nodes, real zeroconf on 127.0.0.1.

While the real link is up: the plan, the members' addresses and the figures the dashboard shows
are unchanged, and nothing dials or fetches from the forged address. Once the real member is
gone, a redial to the forged address fails the handshake."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web
from test_link_capture import FAST
from test_node_procs import free_port
from waiting import async_wait_until
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshllm.net.base import PROTOCOL_VERSION, SERVICE_TYPE, Advert
from meshllm.net.discovery import advert_to_txt, multicast_unavailable
from meshllm.net.links import LINK_PATH
from meshllm.net.server import HttpServer
from meshllm.node import Node, NodeOptions
from meshllm.wire.auth import Handshake
from meshllm.wire.codec import Codec

pytestmark = pytest.mark.skipif(multicast_unavailable() is not None, reason=str(multicast_unavailable()))


class Forger:
    """The attacker's HTTP server: a forged profile, and a link endpoint that runs the handshake
    as the victim without the key."""

    def __init__(self, victim: Node) -> None:
        self.victim = victim
        self.profile_hits = 0
        self.link_attempts = 0
        app = web.Application()
        app.router.add_get("/v1/profile", self.profile)
        app.router.add_get(LINK_PATH, self.link)
        self.server = HttpServer(app, "127.0.0.1", 0)

    async def profile(self, request: web.Request) -> web.Response:
        self.profile_hits += 1
        doc = self.victim.profile_view()
        doc["profile"] = {**(doc.get("profile") or {}), "memory_bytes": 1}
        doc["links"] = {nid: {"mbps": 0.001, "rtt_ms": 9999.0} for nid in doc.get("peers", {})}
        return web.json_response(doc)

    async def link(self, request: web.Request) -> web.StreamResponse:
        self.link_attempts += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        codec = Codec(max_message_bytes=4096)
        hs = Handshake(key=b"not the mesh key", node_id=self.victim.node_id, mesh_id=self.victim.mesh_id,
                       nonce=os.urandom(16), initiator=False, port=self.server.port)
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            for m in hs.receive(codec.decode(msg.data)):
                await ws.send_bytes(codec.encode(m))
            await ws.receive()
        await ws.close()
        return ws


def forged_service(ad: Advert) -> AsyncServiceInfo:
    tag = uuid.uuid4().hex[:8]
    return AsyncServiceInfo(SERVICE_TYPE, f"forged-{tag}.{SERVICE_TYPE}", port=ad.port, properties=advert_to_txt(ad),
                            addresses=[socket.inet_aton(ad.host)], server=f"forged-{tag}.local.")


def memory_figures(doc: object) -> list[object]:
    """Every memory figure (``memory_bytes``, ``budget``) anywhere in a JSON document."""
    if isinstance(doc, dict):
        return [v for k, v in doc.items() if k in ("memory_bytes", "budget")] + \
            [x for v in doc.values() for x in memory_figures(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in memory_figures(v)]
    return []


async def test_a_forged_advert_moves_nothing_and_its_address_fails_the_handshake(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    key = uuid.uuid4().bytes
    ports = [free_port(), free_port()]
    nodes = [Node.real(NodeOptions(model_dir=tiny_model_dir, state_dir=tmp_path / f"s{i}", mesh_key=key,
                                   name=f"f{i}", host="127.0.0.1", advertise_host="127.0.0.1", port=ports[i],
                                   interfaces=("127.0.0.1",), mdns=True, control=FAST, memory_budget=1 << 30,
                                   verify_model=False))
             for i in range(2)]
    a, b = nodes
    forger = Forger(b)
    azc: AsyncZeroconf | None = None
    try:
        for n in nodes:
            await n.start()
        await forger.server.start()

        def agreed() -> bool:
            vs = [n.mesh_view() for n in nodes]
            return (all(v["ready"] and len(v["members"]) == 2 for v in vs)
                    and len({(v["term"], v["leader"], v["epoch"]) for v in vs}) == 1
                    and all(m["profile"] for v in vs for m in v["members"])
                    and any(set(n.planned_over.get(vs[0]["epoch"], ())) == ids for n in nodes))

        ids = {a.node_id, b.node_id}

        await async_wait_until(agreed, "both nodes ready on one plan made over both, with each other's profile", 60)
        before = a.mesh_view()
        b_addr = next(m["addr"] for m in before["members"] if m["id"] == b.node_id)
        assert b_addr == f"127.0.0.1:{ports[1]}"

        # The forgery: b's id and mesh id at the forger's port.
        ad = Advert(b.node_id, "127.0.0.1", forger.server.port, a.mesh_id, PROTOCOL_VERSION)
        azc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        await (await azc.async_register_service(forged_service(ad)))
        await async_wait_until(lambda: a.dialer.refused_adverts >= 1, "a to see (and ignore) the forged advert", 20)
        # Let a refresh b's profile and figures at least once after the forgery.
        seen_at = a.dialer.peers[b.node_id].fetched_at
        await async_wait_until(lambda: a.dialer.peers[b.node_id].fetched_at > seen_at, "a profile refresh", 20)
        after = a.mesh_view()
        assert after["plan"] == before["plan"] and after["epoch"] == before["epoch"]
        assert [(m["id"], m["addr"]) for m in after["members"]] == [(m["id"], m["addr"]) for m in before["members"]]
        b_seen = next(m for m in after["members"] if m["id"] == b.node_id)
        assert b_seen["profile"]["memory_bytes"] > 1 and b_seen["linked"]
        dash = await a.peer_http.fetch_json("127.0.0.1", ports[0], "/v1/dashboard")
        assert dash is not None and 1 not in memory_figures(dash) and memory_figures(dash)
        assert forger.link_attempts == 0 and forger.profile_hits == 0
        # What the forger serves, even fetched directly, is refused: it carries no MAC.
        assert await a.peer_http.fetch_profile("127.0.0.1", forger.server.port) is None

        # The real b goes away; the forger re-announces; a redials the forged address and the
        # handshake fails: no link to "b".
        await b.stop()
        await async_wait_until(lambda: b.node_id not in a.transport.peers(), "the real link to go down", 20)
        await (await azc.async_register_service(forged_service(ad)))  # announced again, under a new name
        await async_wait_until(lambda: forger.link_attempts >= 1, "a to dial the forged address", 30)
        assert b.node_id not in a.transport.peers()
        assert a.transport.peer_addr(b.node_id) is None
    finally:
        if azc is not None:
            await azc.async_close()
        await forger.server.close()
        for n in nodes:
            await n.stop()
