"""Real zeroconf on 127.0.0.1: nodes of one mesh find each other, other meshes are ignored, and a
node that leaves is reported lost (goodbye packets)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from waiting import async_wait_until

from meshllm.net.base import Advert
from meshllm.net.discovery import ZeroconfDiscovery, interface_addresses, multicast_unavailable

pytestmark = pytest.mark.skipif(multicast_unavailable() is not None, reason=str(multicast_unavailable()))


class Seen:
    def __init__(self) -> None:
        self.found: dict[str, Advert] = {}
        self.lost: set[str] = set()
        self.changed = asyncio.Event()

    def on_found(self, ad: Advert) -> None:
        self.found[ad.node_id] = ad
        self.changed.set()

    def on_lost(self, nid: str) -> None:
        self.lost.add(nid)
        self.changed.set()

    async def until(self, cond, deadline_s: float = 15.0) -> None:
        async with asyncio.timeout(deadline_s):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


async def test_same_mesh_found_other_mesh_ignored_and_leave_reported() -> None:
    mesh = "m-" + uuid.uuid4().hex[:8]  # unique per run: other tests' adverts cannot interfere
    ads = [Advert(f"node{i}-{uuid.uuid4().hex[:6]}", "127.0.0.1", 41000 + i, mesh) for i in range(2)]
    stranger = Advert(f"other-{uuid.uuid4().hex[:6]}", "127.0.0.1", 41009, mesh + "x")
    seen = [Seen(), Seen(), Seen()]
    ds = [ZeroconfDiscovery(["127.0.0.1"], instance_name=f"t{i}") for i in range(3)]
    try:
        await ds[2].start(stranger, seen[2].on_found, seen[2].on_lost)
        for d, ad, s in zip(ds, ads, seen, strict=False):
            await d.start(ad, s.on_found, s.on_lost)
        await seen[0].until(lambda: ads[1].node_id in seen[0].found)
        await seen[1].until(lambda: ads[0].node_id in seen[1].found)
        got = seen[0].found[ads[1].node_id]
        assert (got.host, got.port, got.mesh_id) == ("127.0.0.1", 41001, mesh)
        # By the time both same-mesh nodes resolved each other, the stranger's advert (announced
        # first) has been seen and dropped by the mesh filter.
        assert stranger.node_id not in seen[0].found and stranger.node_id not in seen[1].found
        assert not seen[2].found
        await ds[1].close()
        await seen[0].until(lambda: ads[1].node_id in seen[0].lost)
    finally:
        for d in ds:
            await d.close()


def test_interface_names_resolve_to_ipv4() -> None:
    assert interface_addresses(["lo"]) == ["127.0.0.1"]
    assert interface_addresses(["127.0.0.1"]) == ["127.0.0.1"]
    from meshllm.errors import UserError
    with pytest.raises(UserError, match="no network interface"):
        interface_addresses(["nope0"])


async def test_a_lonely_node_is_told_to_try_peer(caplog: pytest.LogCaptureFixture) -> None:
    ad = Advert(f"lonely-{uuid.uuid4().hex[:6]}", "127.0.0.1", 41010, "m-" + uuid.uuid4().hex[:8])
    d = ZeroconfDiscovery(["127.0.0.1"], hint_after=0.3)
    with caplog.at_level("WARNING", logger="meshllm.net.discovery"):
        await d.start(ad, lambda a: None, lambda n: None)
        try:
            await async_wait_until(lambda: any("--peer" in r.getMessage() for r in caplog.records),
                                   "the --peer hint in the log", 10)
        finally:
            await d.close()
