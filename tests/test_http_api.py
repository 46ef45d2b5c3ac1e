"""The node's HTTP API guards: replan from loopback or with the mesh-key token, probes for
members only and bounded in size."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from meshllm.commands.node import primary_ipv4
from meshllm.net.server import PROBE_MAX, PROBE_TOKEN_HEADER, REPLAN_TOKEN_HEADER, HttpServer, make_app
from meshllm.node import mesh_token

KEY = b"test-mesh-key-0123"


class Api:
    def __init__(self) -> None:
        self.replans: list[str] = []

    def mesh_view(self):
        return {"ready": True}

    def profile_view(self):
        return {"node_id": "n1"}

    def request_replan(self, reason: str):
        self.replans.append(reason)
        return {"accepted": True}

    def operator_token(self) -> str:
        return mesh_token(KEY, "operator replan")

    def probe_token(self) -> str:
        return mesh_token(KEY, "probe")


async def _no_link(request: web.Request) -> web.Response:
    return web.Response(status=404)


@pytest.fixture
async def server():
    api = Api()
    srv = HttpServer(make_app(api, _no_link), "0.0.0.0", 0)
    port = await srv.start()
    yield api, port
    await srv.close()


async def test_replan_needs_loopback_or_the_token(server) -> None:
    api, port = server
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/replan") as r:
            assert r.status == 200 and (await r.json())["accepted"]
        lan = primary_ipv4()
        if lan == "127.0.0.1":
            pytest.skip("no non-loopback address on this host to call from")
        async with s.post(f"http://{lan}:{port}/v1/replan") as r:
            assert r.status == 403
        async with s.post(f"http://{lan}:{port}/v1/replan", headers={REPLAN_TOKEN_HEADER: "wrong"}) as r:
            assert r.status == 403
        tok = mesh_token(KEY, "operator replan")
        async with s.post(f"http://{lan}:{port}/v1/replan", headers={REPLAN_TOKEN_HEADER: tok}) as r:
            assert r.status == 200
    assert len(api.replans) == 2


async def test_probe_is_for_members_and_bounded(server) -> None:
    _, port = server
    url = f"http://127.0.0.1:{port}/v1/probe"
    ok = {PROBE_TOKEN_HEADER: mesh_token(KEY, "probe")}
    async with aiohttp.ClientSession() as s:
        async with s.get(url, params={"bytes": "10"}) as r:
            assert r.status == 403
        async with s.get(url, params={"bytes": "1000"}, headers=ok) as r:
            assert r.status == 200 and len(await r.read()) == 1000
        for bad in (str(PROBE_MAX + 1), "-1", "many"):
            async with s.get(url, params={"bytes": bad}, headers=ok) as r:
                assert r.status == 400
        async with s.get(f"http://127.0.0.1:{port}/v1/mesh") as r:
            assert (await r.json()) == {"ready": True}


def test_a_probe_whose_small_fetch_was_as_slow_as_its_large_one_reads_no_absurd_bandwidth() -> None:
    from meshllm.net.peer_http import PROBE_BYTES, PROBE_SMALL, probe_mbps, slope_holds
    # the slope: 512 KiB more in 4.19 ms is 1000 Mb/s, whatever the fixed cost
    assert probe_mbps(0.002, 0.002 + (PROBE_BYTES - PROBE_SMALL) * 8 / 1e9) == pytest.approx(1000)
    # a busy machine: the fastest small fetch took as long as the large one (the slope alone
    # would read as hundreds of thousands of Mb/s); the large fetch alone bounds it from below
    assert not slope_holds(0.0049, 0.005)
    assert probe_mbps(0.0049, 0.005) == pytest.approx((PROBE_BYTES - PROBE_SMALL) * 8 / 0.005 / 1e6)
    assert probe_mbps(0.006, 0.005) < 1000
