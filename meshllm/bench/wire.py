"""Wire codec speed: encode+decode of activation and KV frames against a plain copy of the same bytes.

For each frame kind, one round is ``decode(encode(msg))`` (encode copies each tensor once, into
the frame; decode makes views of it) and the baseline is ``bytes(buf)`` of a buffer as long as the
frame, filled with the frame's bytes (allocate and copy: what any sender must do once to hand a
frame to a socket).
``ratio_vs_memcpy`` = baseline time / codec time: 1.0 means the codec costs no more than that one
copy (target >= 0.8). The two are timed alternately in one loop, in CPU seconds of this process
(other load on a shared machine does not count); each figure is the best of ``--repeats`` runs.
``overall`` sums one frame of every kind.

Sealed vs plain (``meshllm.wire.seal``, what a mesh with a key does to every link frame): per
kind, ``seal_us`` is sealing and opening the frame (AES-256-GCM), ``sealed_ratio_vs_memcpy`` the
same baseline over encode + seal + open + decode. ``sealed.decode_frame_added_us`` is what sealing
adds to a decode-size frame (target <= 30 µs), ``sealed.kv_1mib_ratio_vs_memcpy`` the ratio for
a 1 MiB KV frame. ``handoff`` sends KV chunks over a real link on loopback (two WebSocket
transports in this process, the data lane) with a key and without one and reports MB/s of each
(wall clock, best of ``--repeats``; target: sealed >= 0.5x plain). ``hop`` bounces a decode-size
frame back and forth over the control lane of such a link (``--hop-rounds`` round trips) and
reports the mean round trip sealed and plain: what sealing adds to each hop of a decode step.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import numpy as np

TARGET = 0.8
SEAL_ADDED_US_TARGET = 30.0
HANDOFF_TARGET = 0.5


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size of activation frames")
    p.add_argument("--kv-tokens", type=int, default=512, help="tokens in the KV frame")
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="runs per figure (the best counts)")
    p.add_argument("--budget-s", type=float, default=0.05,
                   help="rough seconds per run per kind (sets --number per kind)")
    p.add_argument("--handoff-mib", type=int, default=32, help="MiB of KV chunks per hand-off run (0: skip)")
    p.add_argument("--hop-rounds", type=int, default=500, help="round trips per hop-latency run (0: skip)")


def _frames(args: argparse.Namespace) -> dict[str, object]:
    """One frame of each kind the data plane sends in bulk or per step."""
    from meshllm.wire.ids import NodeId, RequestId
    from meshllm.wire.limits import chunk_tokens
    from meshllm.wire.messages import DecodeBatch, KVChunk, PrefillChunk
    from meshllm.wire.tensor import Tensor

    rng = np.random.default_rng(0)
    req = RequestId("req-0")

    def decode_step(b: int) -> DecodeBatch:  # one decode step of a micro-batch of b requests
        h = rng.standard_normal((b, args.hidden), dtype=np.float32)  # (B, H)
        return DecodeBatch(1, 0, 0, 3, tuple(RequestId(f"req-{i}") for i in range(b)), tuple(range(b)),
                           Tensor.from_array(h))

    def prefill(t: int) -> PrefillChunk:  # a prompt chunk between two prefill stages
        h = rng.standard_normal((t, args.hidden), dtype=np.float32)  # (T, H)
        return PrefillChunk(req, 1, 0, 3, 0, True, t, 1, NodeId("entry"), {"temperature": 0.0}, 7,
                            hidden=Tensor.from_array(h))

    def kv(t: int) -> KVChunk:
        k = rng.standard_normal((t, args.kv_heads, args.head_dim), dtype=np.float32)  # (T, kv, hd)
        v = rng.standard_normal((t, args.kv_heads, args.head_dim), dtype=np.float32)
        return KVChunk(req, 1, 1, 5, 0, t, Tensor.from_array(k), Tensor.from_array(v))

    per_token = 2 * args.kv_heads * args.head_dim * 4
    chunk = chunk_tokens(per_token)
    mib_tokens = (1 << 20) // per_token  # a KV frame of about 1 MiB (the chunk, at the default shapes)
    kinds: dict[str, object] = {
        f"activation_1x{args.hidden}": decode_step(1),
        f"activation_16x{args.hidden}": prefill(16),
        f"kv_{args.kv_tokens}x{args.kv_heads}x{args.head_dim}": kv(args.kv_tokens),
        f"kv_chunk_{chunk}x{args.kv_heads}x{args.head_dim}": kv(chunk),
    }
    if mib_tokens != chunk:
        kinds[f"kv_1mib_{mib_tokens}x{args.kv_heads}x{args.head_dim}"] = kv(mib_tokens)
    return kinds


def _best(fn: Callable[[], object], number: int) -> float:
    """CPU seconds per call over ``number`` calls, with the garbage collector off (as ``timeit``)."""
    gc.disable()
    try:
        t0 = time.process_time()
        for _ in range(number):
            fn()
        return (time.process_time() - t0) / number
    finally:
        gc.enable()


async def _handoff(frames: int, frame: bytes, sealed: bool, ping_pong: bool = False) -> float:
    """Seconds to send ``frames`` copies of ``frame`` over a link's data lane on loopback and have
    the last one arrive (sealed: with a mesh key; plain: an open mesh). ``ping_pong``: over the
    control lane instead, each frame sent back before the next goes (round trips)."""
    import asyncio

    from aiohttp import web

    from meshllm.net.base import DEFAULT_MESH_KEY, LinkIdentity
    from meshllm.net.links import LINK_PATH, WsTransport
    from meshllm.net.server import HttpServer

    key = b"bench mesh key" if sealed else DEFAULT_MESH_KEY
    a = WsTransport(LinkIdentity("a", "bench", key))
    b = WsTransport(LinkIdentity("b", "bench", key))
    got = 0
    done = asyncio.Event()

    def on_message(peer: str, data: bytes) -> None:
        nonlocal got
        got += 1
        if got == frames:
            done.set()
        elif ping_pong:
            b.send("a", data)

    def on_back(peer: str, data: bytes) -> None:
        a.send("b", data)

    a.set_handlers(on_back if ping_pong else lambda p, d: None, lambda p: None, lambda p: None)
    b.set_handlers(on_message, lambda p: None, lambda p: None)
    app = web.Application()
    app.router.add_get(LINK_PATH, b.handle)
    server = HttpServer(app, "127.0.0.1", 0)
    port = await server.start()
    try:
        await a.dial("127.0.0.1", port)
        t0 = time.perf_counter()
        if ping_pong:
            a.send("b", frame)
        else:
            for _ in range(frames):
                await a.send_data("b", frame)
        await asyncio.wait_for(done.wait(), 120)
        return time.perf_counter() - t0
    finally:
        await a.close()
        await b.close()
        await server.close()


def run(args: argparse.Namespace) -> int:
    from meshllm.wire.codec import Codec
    from meshllm.wire.seal import Opener, Sealer

    codec = Codec()
    seal_key = bytes(range(32))
    result: dict[str, object] = {"baseline": "bytes(buf), buf as long as the frame", "target": TARGET}
    kinds: dict[str, dict[str, object]] = {}
    total_codec = total_copy = 0.0
    for name, msg in _frames(args).items():
        frame = codec.encode(msg)  # type: ignore[arg-type]
        back = codec.decode(frame)
        tensors = [t for t in (getattr(back, f, None) for f in ("hidden", "k", "v")) if t is not None]
        src = np.frombuffer(frame, np.uint8)
        views = all(np.shares_memory(t.array(), src) for t in tensors)
        # The frame's own bytes: a zero-filled buffer would read one shared zero page and flatter
        # the baseline.
        buf = bytearray(frame)

        def round_trip(m: object = msg) -> object:
            return codec.decode(codec.encode(m))  # type: ignore[arg-type]

        def copy(b: bytearray = buf) -> object:
            return bytes(b)

        sealer, opener = Sealer(seal_key), Opener(seal_key)

        def seal_open(f: bytes = frame, s: Sealer = sealer, o: Opener = opener) -> object:
            return o.open(s.seal(f))  # the counters advance together

        def sealed_trip(m: object = msg, s: Sealer = sealer, o: Opener = opener) -> object:
            return codec.decode(o.open(s.seal(codec.encode(m))))  # type: ignore[arg-type]

        one = max(_best(round_trip, 3), 1e-7)
        number = max(3, int(args.budget_s / one))
        codec_s, copy_s, seal_s, sealed_s = [], [], [], []
        for _ in range(args.repeats):  # alternate, so all see the same machine
            codec_s.append(_best(round_trip, number))
            copy_s.append(_best(copy, number))
            seal_s.append(_best(seal_open, number))
            sealed_s.append(_best(sealed_trip, number))
        c, m, sl, sd = min(codec_s), min(copy_s), min(seal_s), min(sealed_s)
        total_codec += c
        total_copy += m
        kinds[name] = {"frame_bytes": len(frame), "codec_us": round(c * 1e6, 2),
                       "memcpy_us": round(m * 1e6, 2), "ratio_vs_memcpy": round(m / c, 3),
                       "meets_target": m / c >= TARGET, "decoded_as_views": views,
                       "codec_gb_s": round(len(frame) / c / 1e9, 2),
                       "seal_us": round(sl * 1e6, 2), "sealed_us": round(sd * 1e6, 2),
                       "sealed_ratio_vs_memcpy": round(m / sd, 3)}
    result["kinds"] = kinds
    result["overall"] = {"codec_us": round(total_codec * 1e6, 2), "memcpy_us": round(total_copy * 1e6, 2),
                         "ratio_vs_memcpy": round(total_copy / total_codec, 3),
                         "meets_target": total_copy / total_codec >= TARGET}
    decode = kinds[f"activation_1x{args.hidden}"]
    kv1 = min((v for k, v in kinds.items() if k.startswith("kv_")),
              key=lambda v: abs(int(v["frame_bytes"]) - (1 << 20)))  # type: ignore[call-overload]
    added = float(decode["sealed_us"]) - float(decode["codec_us"])  # type: ignore[arg-type]
    sealed: dict[str, object] = {
        "cipher": "AES-256-GCM", "decode_frame": f"activation_1x{args.hidden}",
        "decode_frame_bytes": decode["frame_bytes"],
        "decode_frame_added_us": round(max(added, float(decode["seal_us"])), 2),  # type: ignore[arg-type]
        "decode_frame_target_us": SEAL_ADDED_US_TARGET,
        "kv_1mib_frame": next(k for k, v in kinds.items() if v is kv1), "kv_1mib_frame_bytes": kv1["frame_bytes"],
        "kv_1mib_ratio_vs_memcpy": kv1["sealed_ratio_vs_memcpy"],
        "kv_1mib_plain_ratio_vs_memcpy": kv1["ratio_vs_memcpy"],
    }
    sealed["meets_target"] = float(sealed["decode_frame_added_us"]) <= SEAL_ADDED_US_TARGET  # type: ignore[arg-type]
    result["sealed"] = sealed
    if args.handoff_mib > 0:
        import asyncio

        from meshllm.wire.limits import DATA_CHUNK_BYTES

        frame = np.random.default_rng(1).integers(0, 256, DATA_CHUNK_BYTES, dtype=np.uint8).tobytes()
        n = max(4, (args.handoff_mib << 20) // len(frame))
        plain_s, sealed_s = [], []
        for _ in range(max(1, min(args.repeats, 3))):  # alternate, best of each
            plain_s.append(asyncio.run(_handoff(n, frame, sealed=False)))
            sealed_s.append(asyncio.run(_handoff(n, frame, sealed=True)))
        mb = n * len(frame) / 1e6
        p, q = mb / min(plain_s), mb / min(sealed_s)
        result["handoff"] = {"frame_bytes": len(frame), "frames": n, "plain_mb_s": round(p, 1),
                             "sealed_mb_s": round(q, 1), "sealed_vs_plain": round(q / p, 3),
                             "target": HANDOFF_TARGET, "meets_target": q / p >= HANDOFF_TARGET}
    if args.hop_rounds > 0:
        import asyncio

        frame = codec.encode(_frames(args)[f"activation_1x{args.hidden}"])  # type: ignore[arg-type]
        plain_s, sealed_s = [], []
        for _ in range(max(1, min(args.repeats, 3))):
            plain_s.append(asyncio.run(_handoff(args.hop_rounds, frame, sealed=False, ping_pong=True)))
            sealed_s.append(asyncio.run(_handoff(args.hop_rounds, frame, sealed=True, ping_pong=True)))
        # each round trip is two hops
        p_us, s_us = min(plain_s) / args.hop_rounds / 2 * 1e6, min(sealed_s) / args.hop_rounds / 2 * 1e6
        result["hop"] = {"frame_bytes": len(frame), "round_trips": args.hop_rounds,
                         "plain_hop_us": round(p_us, 1), "sealed_hop_us": round(s_us, 1),
                         "added_us_per_hop": round(s_us - p_us, 1)}
    print(json.dumps(result, indent=1))
    return 0
