"""Wire codec speed: encode+decode of activation and KV frames against a plain copy of the same bytes.

For each frame kind, one round is ``decode(encode(msg))`` (encode copies each tensor once, into
the frame; decode makes views of it) and the baseline is ``bytes(buf)`` of a buffer as long as the
frame, filled with the frame's bytes (allocate and copy: what any sender must do once to hand a
frame to a socket).
``ratio_vs_memcpy`` = baseline time / codec time: 1.0 means the codec costs no more than that one
copy (target >= 0.8). The two are timed alternately in one loop, in CPU seconds of this process
(other load on a shared machine does not count); each figure is the best of ``--repeats`` runs.
``overall`` sums one frame of every kind.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import numpy as np

TARGET = 0.8


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size of activation frames")
    p.add_argument("--kv-tokens", type=int, default=512, help="tokens in the KV frame")
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="runs per figure (the best counts)")
    p.add_argument("--budget-s", type=float, default=0.05,
                   help="rough seconds per run per kind (sets --number per kind)")


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
    return {
        f"activation_1x{args.hidden}": decode_step(1),
        f"activation_16x{args.hidden}": prefill(16),
        f"kv_{args.kv_tokens}x{args.kv_heads}x{args.head_dim}": kv(args.kv_tokens),
        f"kv_chunk_{chunk}x{args.kv_heads}x{args.head_dim}": kv(chunk),
    }


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


def run(args: argparse.Namespace) -> int:
    from meshllm.wire.codec import Codec

    codec = Codec()
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

        one = max(_best(round_trip, 3), 1e-7)
        number = max(3, int(args.budget_s / one))
        codec_s, copy_s = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine
            codec_s.append(_best(round_trip, number))
            copy_s.append(_best(copy, number))
        c, m = min(codec_s), min(copy_s)
        total_codec += c
        total_copy += m
        kinds[name] = {"frame_bytes": len(frame), "codec_us": round(c * 1e6, 2),
                       "memcpy_us": round(m * 1e6, 2), "ratio_vs_memcpy": round(m / c, 3),
                       "meets_target": m / c >= TARGET, "decoded_as_views": views,
                       "codec_gb_s": round(len(frame) / c / 1e9, 2)}
    result["kinds"] = kinds
    result["overall"] = {"codec_us": round(total_codec * 1e6, 2), "memcpy_us": round(total_copy * 1e6, 2),
                         "ratio_vs_memcpy": round(total_copy / total_codec, 3),
                         "meets_target": total_copy / total_codec >= TARGET}
    print(json.dumps(result, indent=1))
    return 0
