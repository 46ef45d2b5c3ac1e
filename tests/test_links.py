"""Node links over real aiohttp WebSockets on loopback: authentication, one link per pair, size cap."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web

from meshllm.errors import RemoteProtocolError
from meshllm.net.base import LinkIdentity
from meshllm.net.links import LINK_PATH, WsTransport
from meshllm.net.server import HttpServer


class End:
    def __init__(self, node_id: str, key: bytes = b"k" * 32, mesh: str = "mesh1", cap: int = 1 << 16) -> None:
        self.t = WsTransport(LinkIdentity(node_id, mesh, key), max_message=cap)
        self.got: list[tuple[str, bytes]] = []
        self.up: list[str] = []
        self.down: list[str] = []
        self.changed = asyncio.Event()
        self.t.set_handlers(self._msg, self._up, self._down)
        app = web.Application()
        app.router.add_get(LINK_PATH, self.t.handle)
        self.server = HttpServer(app, "127.0.0.1", 0)
        self.port = 0

    def _msg(self, p: str, d: bytes) -> None:
        self.got.append((p, d))
        self.changed.set()

    def _up(self, p: str) -> None:
        self.up.append(p)
        self.changed.set()

    def _down(self, p: str) -> None:
        self.down.append(p)
        self.changed.set()

    async def start(self) -> End:
        self.port = await self.server.start()
        return self

    async def until(self, cond, deadline_s: float = 10.0) -> None:
        async with asyncio.timeout(deadline_s):
            while not cond():
                self.changed.clear()
                # Some changes (a link replaced by its twin) fire no callback: poll as well.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    async def stop(self) -> None:
        await self.t.close()
        await self.server.close()


@pytest.fixture
async def ends():
    made: list[End] = []

    async def make(*a, **kw) -> End:
        e = await End(*a, **kw).start()
        made.append(e)
        return e

    yield make
    for e in made:
        await e.stop()


async def test_authenticated_link_carries_frames_both_ways(ends) -> None:
    a, b = await ends("a"), await ends("b")
    assert await a.t.dial("127.0.0.1", b.port) == "b"
    await b.until(lambda: b.up == ["a"])
    assert a.up == ["b"]
    assert a.t.send("b", b"hello") and b.t.send("a", b"world")
    await b.until(lambda: b.got == [("a", b"hello")])
    await a.until(lambda: a.got == [("b", b"world")])
    await a.t.disconnect("b")
    await b.until(lambda: b.down == ["a"])
    assert a.down == ["b"] and a.t.peers() == [] and not a.t.send("b", b"x")


async def test_wrong_key_and_other_mesh_are_refused_and_get_nothing(ends) -> None:
    a = await ends("a")
    for other in (await ends("x", key=b"wrong" * 8), await ends("y", mesh="mesh2")):
        with pytest.raises(RemoteProtocolError):
            await other.t.dial("127.0.0.1", a.port)
        assert other.t.peers() == [] and not other.up and not other.got
    assert a.t.peers() == [] and not a.up and a.t.rejected == 2


async def test_garbage_handshake_is_refused(ends) -> None:
    a = await ends("a")
    async with aiohttp.ClientSession() as s, s.ws_connect(f"http://127.0.0.1:{a.port}{LINK_PATH}") as ws:
        await ws.send_bytes(b"\xc1not msgpack")
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert a.t.rejected == 1 and a.t.peers() == []


async def test_simultaneous_dials_leave_one_link(ends) -> None:
    a, b = await ends("a"), await ends("b")
    await asyncio.gather(a.t.dial("127.0.0.1", b.port), b.t.dial("127.0.0.1", a.port))
    # Both keep the link dialed by "a" (the smaller id).
    await a.until(lambda: a.t.dialer_of("b") == "a")
    await b.until(lambda: b.t.dialer_of("a") == "a")
    # Frames flow, and each side saw exactly one "up".
    assert a.t.send("b", b"1") and b.t.send("a", b"2")
    await b.until(lambda: ("a", b"1") in b.got)
    await a.until(lambda: ("b", b"2") in a.got)
    assert a.up == ["b"] and b.up == ["a"] and not a.down and not b.down


async def test_oversized_frame_closes_the_link(ends) -> None:
    a, b = await ends("a"), await ends("b", cap=1024)
    await a.t.dial("127.0.0.1", b.port)
    await b.until(lambda: b.up == ["a"])
    a.t.send("b", b"x" * 4096)
    await b.until(lambda: b.down == ["a"])
    await a.until(lambda: a.down == ["b"])
    assert not b.got


async def test_dialing_ourselves_is_refused(ends) -> None:
    a = await ends("a")
    with pytest.raises(RemoteProtocolError):
        await a.t.dial("127.0.0.1", a.port)
    assert a.t.peers() == []
