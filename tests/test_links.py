"""Node links over real aiohttp WebSockets on loopback: authentication, one link per pair, two
lanes (control never waits behind data, data senders wait for room), one size cap."""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
import pytest
from aiohttp import web
from waiting import async_wait_until

from meshllm.errors import LocalProtocolError, RemoteProtocolError
from meshllm.net.base import DATA_QUEUE_BYTES, DEFAULT_MAX_MESSAGE, DEFAULT_MESH_KEY, LinkIdentity
from meshllm.net.links import LINK_PATH, WsTransport
from meshllm.net.server import HttpServer
from meshllm.wire.auth import Handshake
from meshllm.wire.codec import Codec
from meshllm.wire.limits import MAX_MESSAGE_BYTES
from meshllm.wire.seal import TAG_BYTES, Opener, Sealer


class End:
    def __init__(self, node_id: str, key: bytes = b"k" * 32, mesh: str = "mesh1", cap: int = 1 << 16,
                 data_queue: int = DATA_QUEUE_BYTES) -> None:
        self.t = WsTransport(LinkIdentity(node_id, mesh, key), max_message=cap, data_queue_bytes=data_queue)
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


# --- lanes ---------------------------------------------------------------------------------------


def test_one_cap_everywhere() -> None:
    assert DEFAULT_MAX_MESSAGE == MAX_MESSAGE_BYTES == Codec().max_message_bytes
    assert WsTransport(LinkIdentity("a", "m", b"k")).max_message == MAX_MESSAGE_BYTES


class RawPeer:
    """A peer that authenticates both lanes by hand and then reads its data lane only when told:
    a stalled consumer, as seen from the transport under test."""

    def __init__(self, port: int, node_id: str = "z", key: bytes = b"k" * 32, mesh: str = "mesh1") -> None:
        self.url = f"http://127.0.0.1:{port}{LINK_PATH}"
        self.node_id, self.key, self.mesh = node_id, key, mesh
        self.codec = Codec(max_message_bytes=4096)
        self.control: list[bytes] = []
        self.data: list[bytes] = []
        self.session = aiohttp.ClientSession()
        self.tasks: list[asyncio.Task] = []
        self.keys: dict[str, tuple[bytes, bytes]] = {}

    async def _handshake(self, ws, lane: str, pair: bytes) -> Handshake:
        hs = Handshake(key=self.key, node_id=self.node_id, mesh_id=self.mesh, nonce=os.urandom(16),
                       initiator=True, lane=lane, pair=pair)
        await ws.send_bytes(self.codec.encode(hs.start()))
        for m in hs.receive(self.codec.decode((await ws.receive()).data)):
            await ws.send_bytes(self.codec.encode(m))
        return hs

    async def connect(self, lanes: tuple[str, ...] = ("control", "data"), *, read_control: bool = True) -> None:
        pair = os.urandom(16)  # a data lane opened alone names a control connection that does not exist
        self.ws = {}
        for lane in lanes:
            ws = await self.session.ws_connect(self.url, max_msg_size=0)
            hs = await self._handshake(ws, lane, pair if lane == "data" else b"")
            if lane == "control":
                pair = hs.initiator_nonce
            self.ws[lane] = ws
            self.keys[lane] = hs.frame_keys()
        if "control" in self.ws and read_control:
            self.read_control()

    def read_control(self) -> None:
        self.tasks.append(asyncio.ensure_future(self._read("control", self.control)))

    def read_data(self) -> None:
        self.tasks.append(asyncio.ensure_future(self._read("data", self.data)))

    async def _read(self, lane: str, into: list[bytes]) -> None:
        # the frames are sealed (this peer holds the key), except on an open mesh
        opener = Opener(self.keys[lane][1]) if self.key != DEFAULT_MESH_KEY else None
        async for msg in self.ws[lane]:
            if msg.type == aiohttp.WSMsgType.BINARY:
                into.append(opener.open(msg.data) if opener else msg.data)

    def sealed(self, lane: str, frames: list[bytes]) -> list[bytes]:
        """``frames`` sealed in order as this peer's end of ``lane`` seals them."""
        s = Sealer(self.keys[lane][0])
        return [s.seal(f) for f in frames]

    async def close(self) -> None:
        for ws in self.ws.values():
            await ws.close()
        for t in self.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.session.close()


@pytest.fixture
async def raw_peers():
    made: list[RawPeer] = []

    def make(*a, **kw) -> RawPeer:
        made.append(RawPeer(*a, **kw))
        return made[-1]

    yield make
    for p in made:
        await p.close()


async def test_both_lanes_deliver_in_order_per_lane(ends) -> None:
    a, b = await ends("a"), await ends("b")
    await a.t.dial("127.0.0.1", b.port)
    await b.until(lambda: b.up == ["a"])
    for i in range(40):
        assert await a.t.send_data("b", b"d%03d" % i + bytes(1000 * (i % 7)))
        assert a.t.send("b", b"c%03d" % i)
    await b.until(lambda: len(b.got) == 80)
    got = [d for _, d in b.got]
    assert [d[:4] for d in got if d[:1] == b"c"] == [b"c%03d" % i for i in range(40)]
    assert [d[:4] for d in got if d[:1] == b"d"] == [b"d%03d" % i for i in range(40)]
    await a.until(lambda: a.t.data_backlog("b") == 0)
    assert await b.t.send_data("a", b"back")  # the listener's end has a data lane too
    await a.until(lambda: a.got == [("b", b"back")])


async def test_stalled_peer_backpressure_control_overtakes_and_resume(ends, raw_peers) -> None:
    frame, limit = 256 * 1024, 1 << 20
    a = await ends("a", cap=1 << 20, data_queue=limit)
    z = raw_peers(a.port)
    await z.connect()
    await a.until(lambda: a.up == ["z"])
    total = 160  # 40 MiB: far more than the socket buffers between the two ends can hold
    sent = 0

    async def produce() -> None:
        nonlocal sent
        for _ in range(total):
            assert await a.t.send_data("z", b"x" * frame)
            sent += 1

    producer = asyncio.ensure_future(produce())
    # The peer reads nothing from its data lane: our lane fills and the producer waits for room.
    await async_wait_until(lambda: a.t.data_backlog("z") + frame > limit and not producer.done(),
                           "the data lane full and the producer waiting", 20.0,
                           describe=lambda: f"backlog {a.t.data_backlog('z')}, sent {sent}")
    assert sent < total and not z.data and a.t.data_backlog("z") <= limit
    # A control frame goes straight past every data frame sent before it (none has been read;
    # while the socket buffers still fill, our queue may momentarily be empty, so only the
    # peer's side is asserted).
    assert a.t.send("z", b"heartbeat")
    await async_wait_until(lambda: z.control == [b"heartbeat"], "the control frame", 10.0)
    assert not z.data and not producer.done() and sent >= limit // frame
    # The peer drains its data lane: the producer resumes and every frame arrives.
    z.read_data()
    await asyncio.wait_for(producer, 30.0)
    await async_wait_until(lambda: len(z.data) == total, "every data frame", 30.0)
    assert all(len(d) == frame for d in z.data) and a.t.data_backlog("z") == 0


async def test_control_frames_written_at_once_keep_their_order_through_a_stalled_peer(ends, raw_peers) -> None:
    # A control frame with nothing ahead of it is written on the sender's turn; once the peer stops
    # reading and the connection must drain, that write finishes in a task and later frames queue
    # behind it. Sealed with counter nonces, a frame out of order would not even open.
    frame, n = 64 * 1024, 400  # 25 MiB: more than the socket buffers between the two ends hold
    a = await ends("a", cap=1 << 20)
    z = raw_peers(a.port)
    await z.connect(read_control=False)
    await a.until(lambda: a.up == ["z"])
    for i in range(n):
        assert a.t.send("z", i.to_bytes(4, "little") + bytes(frame))
    await asyncio.sleep(0)
    assert not z.control
    z.read_control()
    await async_wait_until(lambda: len(z.control) == n, "every control frame", 30.0,
                           describe=lambda: f"{len(z.control)} of {n}")
    assert [int.from_bytes(d[:4], "little") for d in z.control] == list(range(n))
    assert a.t.send("z", b"after")  # the lane is idle again: written at once
    await async_wait_until(lambda: z.control[-1:] == [b"after"], "the frame after the stall", 10.0)


async def test_send_data_returns_false_when_the_link_drops_while_waiting(ends, raw_peers) -> None:
    frame, limit = 256 * 1024, 1 << 20
    a = await ends("a", cap=1 << 20, data_queue=limit)
    z = raw_peers(a.port)
    await z.connect()
    await a.until(lambda: a.up == ["z"])
    results: list[bool] = []

    async def produce() -> None:
        while True:
            ok = await a.t.send_data("z", b"x" * frame)
            results.append(ok)
            if not ok:
                return

    producer = asyncio.ensure_future(produce())
    await async_wait_until(lambda: a.t.data_backlog("z") + frame > limit and not producer.done(),
                           "the producer waiting", 20.0)
    await z.close()  # the peer goes away (TCP close) while we wait for room
    await asyncio.wait_for(producer, 10.0)
    assert results[-1] is False and all(results[:-1])
    await a.until(lambda: a.down == ["z"])
    assert a.t.data_backlog("z") == 0 and not await a.t.send_data("z", b"x")


async def test_a_data_connection_without_its_control_connection_is_refused(ends, raw_peers) -> None:
    a = await ends("a")
    z = raw_peers(a.port)
    with contextlib.suppress(Exception):
        await z.connect(lanes=("data",))
    await a.until(lambda: a.t.rejected == 1)
    assert a.t.peers() == [] and not a.up


async def test_cap_is_inclusive_on_both_lanes_and_refused_locally(ends) -> None:
    cap = 4096
    a, b = await ends("a", cap=1 << 16), await ends("b", cap=cap)
    await a.t.dial("127.0.0.1", b.port)
    await b.until(lambda: b.up == ["a"])
    assert a.t.send("b", b"c" * cap) and await a.t.send_data("b", b"d" * cap)
    await b.until(lambda: len(b.got) == 2)
    with pytest.raises(LocalProtocolError, match="over the 4096-byte cap"):
        b.t.send("a", b"x" * (cap + 1))
    with pytest.raises(LocalProtocolError, match="over the 4096-byte cap"):
        await b.t.send_data("a", b"x" * (cap + 1))
    assert await a.t.send_data("b", b"x" * (cap + 1))  # a's cap allows it; b closes the link
    await b.until(lambda: b.down == ["a"])
    await a.until(lambda: a.down == ["b"])
    assert len(b.got) == 2


# --- the in-memory transport models the same lanes -----------------------------------------------


class MemEnd:
    def __init__(self, net, node_id: str, cap: int = DEFAULT_MAX_MESSAGE, data_queue: int = DATA_QUEUE_BYTES):
        from meshllm.net.memory import MemoryTransport

        self.t = MemoryTransport(net, LinkIdentity(node_id, "mesh1", b"k" * 32), f"10.0.0.{node_id}:1",
                                 max_message=cap, data_queue_bytes=data_queue)
        self.got: list[bytes] = []
        self.down: list[str] = []
        self.t.set_handlers(lambda p, d: self.got.append(d), lambda p: None, self.down.append)


async def _mem_pair(cap: int = DEFAULT_MAX_MESSAGE, data_queue: int = DATA_QUEUE_BYTES, **net_kw):
    from meshllm.net.memory import MemoryNetwork

    net = MemoryNetwork(**net_kw)
    a, b = MemEnd(net, "1", data_queue=data_queue), MemEnd(net, "2", cap=cap, data_queue=data_queue)
    assert await a.t.dial("10.0.0.2", 1) == "2"
    return net, a, b


async def _turns(n: int = 20) -> None:
    for _ in range(n):  # loop turns, not time: the in-memory network delivers one data frame per turn
        await asyncio.sleep(0)


async def test_memory_control_overtakes_queued_data_and_lanes_keep_order() -> None:
    _, a, b = await _mem_pair()
    for i in range(5):
        assert await a.t.send_data("2", b"d%d" % i)
    assert a.t.data_backlog("2") == 10
    assert a.t.send("2", b"ctl")
    await async_wait_until(lambda: len(b.got) == 6, "six frames", 5.0)
    # At most the one data frame already being delivered goes ahead of the control frame.
    assert b.got.index(b"ctl") <= 1
    assert [d for d in b.got if d != b"ctl"] == [b"d%d" % i for i in range(5)]
    assert a.t.data_backlog("2") == 0


async def test_memory_send_data_waits_for_room_and_resumes() -> None:
    net, a, b = await _mem_pair(data_queue=3000)
    net.stall("2")
    for i in range(3):
        assert await a.t.send_data("2", bytes([i]) * 1000)  # fits: returns at once
    blocked = asyncio.ensure_future(a.t.send_data("2", b"\x03" * 1000))
    later = asyncio.ensure_future(a.t.send_data("2", b"\x04" * 10))  # queues behind, in call order
    await _turns()
    assert not blocked.done() and not later.done() and a.t.data_backlog("2") == 3000 and not b.got
    assert a.t.send("2", b"ctl")  # control still flows past the stalled data lane
    await async_wait_until(lambda: b.got == [b"ctl"], "the control frame", 5.0)
    net.unstall("2")
    assert await asyncio.wait_for(blocked, 5.0) and await asyncio.wait_for(later, 5.0)
    await async_wait_until(lambda: len(b.got) == 6, "every data frame", 5.0)
    assert [d[:1] for d in b.got[1:]] == [b"\x00", b"\x01", b"\x02", b"\x03", b"\x04"]


@pytest.mark.parametrize("how", ["partition", "disconnect", "close"])
async def test_memory_send_data_returns_false_when_the_link_drops_while_waiting(how: str) -> None:
    net, a, b = await _mem_pair(data_queue=1000)
    net.stall("2")
    assert await a.t.send_data("2", b"x" * 1000)
    blocked = asyncio.ensure_future(a.t.send_data("2", b"y"))
    await _turns()
    assert not blocked.done()
    if how == "partition":
        net.partition(["1"], ["2"])
    elif how == "disconnect":
        await b.t.disconnect("1")
    else:
        await b.t.close()
    assert await asyncio.wait_for(blocked, 5.0) is False
    assert a.down == ["2"] and a.t.data_backlog("2") == 0 and not await a.t.send_data("2", b"z")


async def test_memory_cap_is_inclusive_on_both_lanes_and_refused_locally() -> None:
    cap = 4096
    _, a, b = await _mem_pair(cap=cap)
    assert a.t.send("2", b"c" * cap) and await a.t.send_data("2", b"d" * cap)
    await async_wait_until(lambda: len(b.got) == 2, "both frames at the cap", 5.0)
    with pytest.raises(LocalProtocolError, match="over the 4096-byte cap"):
        b.t.send("1", b"x" * (cap + 1))
    with pytest.raises(LocalProtocolError, match="over the 4096-byte cap"):
        await b.t.send_data("1", b"x" * (cap + 1))
    assert await a.t.send_data("2", b"x" * (cap + 1))  # a's cap allows it; b closes the link
    await async_wait_until(lambda: b.down == ["1"] and a.down == ["2"], "the link closed", 5.0)
    assert len(b.got) == 2


async def test_memory_data_lane_is_delayed_like_control_and_never_dropped() -> None:
    _, a, b = await _mem_pair(drop=1.0, delay=0.01)
    assert a.t.send("2", b"lost")  # control frames may be dropped (drop=1.0: all are)
    for i in range(3):
        assert await a.t.send_data("2", b"%d" % i)
    await async_wait_until(lambda: len(b.got) == 3, "the data frames", 5.0)
    assert b.got == [b"0", b"1", b"2"]


async def test_memory_a_cancelled_waiting_sender_sends_nothing() -> None:
    net, a, b = await _mem_pair(data_queue=100)
    net.stall("2")
    assert await a.t.send_data("2", b"0" * 100)
    cancelled = asyncio.ensure_future(a.t.send_data("2", b"1" * 50))
    kept = asyncio.ensure_future(a.t.send_data("2", b"2" * 50))
    await _turns()
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    net.unstall("2")
    assert await asyncio.wait_for(kept, 5.0)
    await async_wait_until(lambda: len(b.got) == 2, "two frames", 5.0)
    assert [d[:1] for d in b.got] == [b"0", b"2"] and a.t.data_backlog("2") == 0


@pytest.mark.parametrize("how", ["flip", "truncate", "replay", "reorder", "plain", "append"])
@pytest.mark.parametrize("lane", ["control", "data"])
async def test_a_tampered_sealed_frame_closes_the_link_and_never_reaches_the_decoder(
        ends, raw_peers, caplog, how: str, lane: str) -> None:
    a = await ends("a")
    z = raw_peers(a.port)
    await z.connect()
    z.read_data()  # answers the close handshake on both lanes, as a live peer does
    await a.until(lambda: a.up == ["z"])
    frames = [b"first", b"second", b"third"]
    s = z.sealed(lane, frames)
    good, bad = {
        "flip": ([s[0]], s[1][:3] + bytes([s[1][3] ^ 0x10]) + s[1][4:]),
        "truncate": ([s[0]], s[1][:-1]),
        "replay": ([s[0]], s[0]),
        "reorder": ([s[0]], s[2]),
        "plain": ([s[0]], frames[1]),  # an unsealed frame injected into a sealed lane
        "append": ([s[0]], s[1] + b"\0"),
    }[how]
    for x in [*good, bad, s[1]]:
        await z.ws[lane].send_bytes(x)
    await a.until(lambda: a.down == ["z"])
    assert a.got == [("z", b"first")]  # the good frame arrived; nothing of or after the bad one
    assert a.t.bad_frames == 1 and a.t.peers() == []
    lines = [r for r in caplog.records if "failed authentication" in r.getMessage()
             or "shorter than its tag" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"


async def test_frames_on_the_wire_are_sealed_with_a_key_and_plain_on_an_open_mesh(ends, raw_peers) -> None:
    for key in (b"k" * 32, DEFAULT_MESH_KEY):
        a = await ends(f"a{len(key)}", key=key)
        z = raw_peers(a.port, key=key)
        seen: list[bytes] = []
        a.t.tap = lambda me, peer, lane, data, seen=seen: seen.append(data)
        await z.connect()
        await a.until(lambda a=a: a.up == ["z"])
        secret = b"the prompt's token ids: 17 4 99 3"
        assert a.t.send("z", secret)
        await async_wait_until(lambda z=z, secret=secret: z.control == [secret], "the frame at the peer", 10.0)
        on_wire = seen[-1]
        if key == DEFAULT_MESH_KEY:
            assert on_wire == secret
        else:
            assert secret not in on_wire and len(on_wire) == len(secret) + TAG_BYTES
