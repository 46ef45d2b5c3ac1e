"""What the LAN tells a node is a hint: an advert cannot move a linked peer, the peer table is
bounded and forgets entries that never authenticate, refusals are logged at most a few lines a
minute, and a flood of 10,000 adverts leaves the node serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
from test_node_sim import Mesh

from meshllm.model.manifest import Manifest
from meshllm.net.base import Advert, LinkIdentity, RefusalLog
from meshllm.net.dialer import MAX_PEERS, UNAUTHENTICATED_TTL_S, Dialer
from meshllm.net.memory import MemoryNetwork, MemoryTransport
from meshllm.net.peer_http import PeerHttp
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def dialer_on(net: MemoryNetwork, node_id: str, clock: Clock, max_peers: int = 8) -> tuple[Dialer, list[Any]]:
    spawned: list[Any] = []

    def spawn(coro: Any) -> Any:
        spawned.append(coro)
        coro.close()  # the test drives dialling itself
        return None

    d = Dialer(node_id, "m", PeerHttp(), (), spawn=spawn, closed=lambda: False, now=clock, max_peers=max_peers)
    t = MemoryTransport(net, LinkIdentity(node_id, "m", b"key"), f"10.0.0.{node_id[-1]}:7070")
    t.set_handlers(lambda p, d: None, d.on_link_up, lambda p: None)
    d.transport = t
    return d, spawned


async def test_an_advert_cannot_move_a_linked_peer_and_the_link_sets_the_address() -> None:
    net, clock = MemoryNetwork(), Clock()
    a, _ = dialer_on(net, "n1", clock)
    b, _ = dialer_on(net, "n2", clock)
    # A forged advert comes first: n2 at an attacker's address.
    a.on_found(Advert("n2", "10.6.6.6", 7070, "m"))
    assert a.peers["n2"].addr == ("10.6.6.6", 7070)
    # n2 dials n1 itself: once the link authenticates, n2's address is where the link came from.
    assert a.transport is not None and b.transport is not None
    await b.transport.dial("10.0.0.1", 7070)
    assert a.peers["n2"].addr == ("10.0.0.2", 7070) and a.peers["n2"].authenticated
    # While linked, adverts placing n2 elsewhere change nothing.
    for _ in range(3):
        a.on_found(Advert("n2", "10.6.6.6", 7070, "m"))
    assert a.peers["n2"].addr == ("10.0.0.2", 7070) and a.refused_adverts == 3
    assert a.linked_addresses() == {"n2": "10.0.0.2:7070"}


async def test_the_table_is_bounded_and_unauthenticated_entries_expire() -> None:
    net, clock = MemoryNetwork(), Clock()
    a, _ = dialer_on(net, "n1", clock, max_peers=8)
    b, _ = dialer_on(net, "n2", clock)
    for i in range(100):
        a.on_found(Advert(f"fake{i:03d}", "10.6.6.6", 7000 + i, "m"))
    assert len(a.peers) == 8 and a.refused_adverts == 92
    # A real peer still gets in when the table is full of entries that never authenticated.
    assert b.transport is not None
    await b.transport.dial("10.0.0.1", 7070)
    assert "n2" in a.peers and len(a.peers) == 8 and a.peers["n2"].authenticated
    clock.t += UNAUTHENTICATED_TTL_S - 1
    a.expire()
    assert len(a.peers) == 8
    clock.t += 2
    a.expire()
    assert list(a.peers) == ["n2"]  # the fakes expired; the authenticated peer stays, link or not
    assert a.transport is not None
    await a.transport.disconnect("n2")
    clock.t += 10 * UNAUTHENTICATED_TTL_S
    a.expire()
    assert list(a.peers) == ["n2"]


async def test_a_peer_that_keeps_failing_is_redialled_less_often() -> None:
    net, clock = MemoryNetwork(), Clock()
    a, _ = dialer_on(net, "n1", clock)
    a.on_found(Advert("n9", "10.6.6.6", 7070, "m"))
    waits = []
    for _ in range(8):
        await a.dial("n9", "10.6.6.6", 7070)  # nothing listens there
        waits.append(a.peers["n9"].next_dial - clock.t)
    assert waits == sorted(waits) and waits[0] >= 1.0 and waits[-1] == 30.0


def test_refusal_log_keeps_to_a_few_lines_a_minute_with_counts(caplog) -> None:
    clock = Clock()
    rl = RefusalLog(logging.getLogger("test.refusals"), clock, window_s=60.0, lines_per_window=5)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for i in range(10_000):
            rl.refused(f"10.6.{i % 7}.{i % 251}", "refused")
            clock.t += 0.001
        assert len(caplog.records) == 5 and rl.total == 10_000
        clock.t += 60
        rl.refused("10.6.0.0", "refused again")
    assert len(caplog.records) == 6
    last = caplog.records[-1].getMessage()
    assert "refused again" in last and "more from" in last  # the suppressed ones are counted


async def test_ten_thousand_adverts_leave_the_table_bounded_the_log_quiet_and_the_node_serving(
        tiny_model_dir: Path, tmp_path: Path, tiny_manifest: Manifest, caplog) -> None:
    mesh = Mesh(tiny_model_dir, tmp_path)
    try:
        for i in range(2):
            await mesh.add(i)
        await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan")
        node = mesh.nodes[0]
        rng = np.random.default_rng(0)
        with caplog.at_level(logging.INFO):
            caplog.clear()
            for i in range(10_000):
                nid = "".join(f"{x:02x}" for x in rng.integers(0, 256, 8))
                node.dialer.on_found(Advert(nid, f"10.66.{i % 250}.{i // 250 + 1}", 7070, node.mesh_id))
                if i % 1000 == 0:
                    await asyncio.sleep(0)  # the flood arrives over time, the loop keeps running
            assert len(node.dialer.peers) <= MAX_PEERS
            # the node keeps serving: a prompt through the plan, token-identical to one process
            full = StageRunner(tiny_manifest, 0, tiny_manifest.config.num_blocks, threads=1)
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            prompt = [5, 17, 42, 8]
            tokens = [ev.token_id async for ev in node.serving.entry.generate(prompt, params)]
            assert tokens == list(generate(full, prompt, params).token_ids)
            assert mesh.agreed() is not None and len(node.transport.peers()) == 1
        flood = [r for r in caplog.records if r.name.startswith("meshllm.net")]
        assert len(flood) <= 10, [r.getMessage() for r in flood]
        assert node.dialer.refused_adverts >= 10_000 - MAX_PEERS
    finally:
        await mesh.close()


async def test_peer_answers_count_only_with_the_mesh_keys_mac() -> None:
    """A profile fetched from a peer is taken only when the peer's server MACed it with the mesh
    key over our fresh challenge; another key's server, or one that does not MAC, gets dropped."""
    from aiohttp import web

    from meshllm.net.peer_http import AiohttpPeerHttp, http_mac_key
    from meshllm.net.server import HttpServer, make_app

    class Api:
        def mesh_view(self) -> dict:
            return {}

        def profile_view(self) -> dict:
            return {"node_id": "n1", "profile": {"memory_bytes": 123}}

        def request_replan(self, reason: str) -> dict:
            return {}

        def operator_token(self) -> str:
            return "x"

        def probe_token(self) -> str:
            return "x"

    async def no_link(request: web.Request) -> web.Response:
        return web.Response(status=404)

    servers = {name: HttpServer(make_app(Api(), no_link, mac), "127.0.0.1", 0)
               for name, mac in (("ours", http_mac_key(b"our key")), ("theirs", http_mac_key(b"their key")),
                                 ("none", b""))}
    ports = {name: await s.start() for name, s in servers.items()}
    client = AiohttpPeerHttp("token", http_mac_key(b"our key"))
    try:
        assert await client.fetch_profile("127.0.0.1", ports["ours"]) == Api().profile_view()
        assert await client.fetch_profile("127.0.0.1", ports["theirs"]) is None
        assert await client.fetch_profile("127.0.0.1", ports["none"]) is None
        assert client.rejected == 2
    finally:
        await client.close()
        for s in servers.values():
            await s.close()
