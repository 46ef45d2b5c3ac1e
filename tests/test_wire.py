"""Wire codec: every message round-trips; everything a peer can get wrong is a RemoteProtocolError."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import typing

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import LocalProtocolError, RemoteProtocolError
from meshllm.wire.codec import ALIGN, EXT, TENSOR_EXT, Codec, ExtRegistry, decode, encode
from meshllm.wire.limits import DATA_CHUNK_BYTES, HEADER_HEADROOM, MAX_MESSAGE_BYTES, chunk_tokens
from meshllm.wire.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    DecodeBatch,
    Heartbeat,
    IslandWork,
    KVChunk,
    PlanPropose,
    PrefillChunk,
    _register,
)
from meshllm.wire.tensor import DTYPES, Tensor


def _step(hidden: Tensor) -> DecodeBatch:
    """A decode step carrying ``hidden`` (B, H)."""
    return DecodeBatch(1, 0, 0, 3, tuple("r" for _ in range(hidden.shape[0] if hidden.shape else 0)),
                       tuple(range(hidden.shape[0] if hidden.shape else 0)), hidden)


def _kv(k: Tensor, v: Tensor, offset: int = 0) -> KVChunk:
    return KVChunk("r", 1, 0, 2, offset, offset + (k.shape[0] if k.shape else 1), k, v)


def sample(tp, i: int = 0):
    """A non-default value of annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        return sample(typing.get_args(tp)[0], i)
    if tp is bool:
        return True
    if tp is int or getattr(tp, "__supertype__", None) is int:
        return 7 + i
    if tp is float:
        return 1.5 + i
    if tp is str or getattr(tp, "__supertype__", None) is str:
        return f"s{i}"
    if tp is bytes:
        return bytes(range(16))
    if tp is Tensor:
        return Tensor.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) + i)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return (sample(inner, i), sample(inner, i + 1))
    if origin is dict:
        return {"replicas": [{"id": 0, "stages": [{"node": "a", "layers": [0, 3]}]}], "x": 1.5, "n": None}
    raise AssertionError(tp)


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_every_message_round_trips(tag: str) -> None:
    cls = MESSAGE_TYPES[tag]
    hints = typing.get_type_hints(cls)
    msg = cls(**{f.name: sample(hints[f.name], k) for k, f in enumerate(dataclasses.fields(cls))})
    data = encode(msg)
    back = decode(data)
    assert back == msg and type(back) is cls
    frame = _header(data)
    assert frame["v"] == PROTOCOL_VERSION and frame["t"] == tag
    assert dataclasses.is_dataclass(msg) and msg.__dataclass_params__.frozen
    assert not hasattr(msg, "__dict__")  # slotted
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, dataclasses.fields(cls)[0].name, None)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tensor_round_trip_exact(dtype: str) -> None:
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)  # (2, 3, 4)
    msg = _kv(Tensor.from_array(a), Tensor.from_array(a[:1]), 16)
    back = decode(encode(msg))
    assert isinstance(back, KVChunk)
    np.testing.assert_array_equal(back.k.to_array(), a)  # bit-exact
    assert back.k.to_array().dtype == np.dtype(dtype) and back.v.to_array().shape == (1, 3, 4)


def test_tensor_big_endian_input_is_sent_little_endian() -> None:
    a = np.arange(5, dtype=">f4")
    t = Tensor.from_array(a)
    np.testing.assert_array_equal(t.to_array(), a)
    assert t.data == np.arange(5, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode(encode(_step(t))).hidden.array(), a)


@pytest.mark.parametrize("bad", [np.array([object(), 1], dtype=object), np.zeros(2, dtype=np.complex64),
                                 np.zeros(2, dtype="U3"), np.zeros(2, dtype=bool)])
def test_tensor_refuses_dtypes_outside_the_allow_list(bad: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError, match="dtype"):
        Tensor.from_array(bad)


# Frames built by hand, as docs/control.md describes them, independently of the codec:
# u32le header length | msgpack header | per tensor: zero padding to ALIGN, raw bytes.


def _raw(header: bytes, *buffers: bytes) -> bytes:
    out = bytearray(len(header).to_bytes(4, "little") + header)
    for b in buffers:
        out += bytes(-len(out) % ALIGN) + b
    return bytes(out)


def _frame(tag: str, body: dict, *buffers: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return _raw(msgpack.packb({"v": version, "t": tag, "b": body}, use_bin_type=True), *buffers)


def _header(frame: bytes) -> dict:
    n = int.from_bytes(frame[:4], "little")
    return msgpack.unpackb(frame[4:4 + n], raw=False, ext_hook=lambda c, d: (c, msgpack.unpackb(d)))


def _tensor_ext(dtype, shape) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb([dtype, shape]))


def _act(hidden) -> dict:
    return {"epoch": 1, "replica": 0, "micro": 0, "first_block": 3, "reqs": ["r"], "indexes": [0],
            "hidden": hidden}


HB = {"node_id": "a", "term": 1, "leader": None, "priority": 0, "seq": 1}


@pytest.mark.parametrize(("data", "match"), [
    (b"\xc1", "malformed frame"),
    (b"", "malformed frame"),
    (_raw(b"\xc1"), "malformed frame"),
    (b"\xff\xff\x00\x00" + msgpack.packb({}), "a header of 65535 bytes in a frame of 5"),
    (msgpack.packb({"v": 1, "t": "heartbeat", "b": HB}), "malformed frame"),  # a version-1 frame
    (_raw(msgpack.packb([1, 2, 3])), "not a map"),
    (_raw(msgpack.packb({"v": 2, "t": "heartbeat"})), "not a map with v, t and b"),
    (_frame("heartbeat", HB) + b"\x00", "1 bytes after the last tensor"),
    (_raw(msgpack.packb({"v": 2, "t": "heartbeat", "b": HB}) + b"\x00"), "malformed frame: ExtraData"),
    (_frame("heartbeat", HB, version=1), "protocol version 1 not supported"),
    (_frame("no_such_type", {}), "unknown message type 'no_such_type'"),
    (_frame("heartbeat", []), "body must be a map"),
    (_frame("heartbeat", {**HB, "evil": 1}), "unknown fields"),
    (_frame("heartbeat", {k: v for k, v in HB.items() if k != "term"}), "missing field 'term'"),
    (_frame("heartbeat", {**HB, "term": "1"}), "heartbeat.term: expected int"),
    (_frame("heartbeat", {**HB, "term": True}), "heartbeat.term"),
    (_frame("heartbeat", {**HB, "leader": 5}), "heartbeat.leader"),
    (_raw(msgpack.packb({1: 2})), "malformed frame"),  # non-string map keys
    (_frame("plan_propose", {"term": 1, "leader": "a", "epoch": 1,
                             "plan": {"t": _tensor_ext("float32", [1])}}, b"\0" * 4), "is not allowed here"),
    # lying shapes and truncated buffers: the bytes after the header must be exactly the tensors'
    (_frame("decode_batch", _act(_tensor_ext("float32", [2, 2])), b"\0" * 15),
     r"float32 tensor of shape \[2, 2\] needs bytes up to \d+, the frame has \d+"),
    (_frame("decode_batch", _act(_tensor_ext("float32", [2, 2])), b"\0" * 17), "1 bytes after the last tensor"),
    (_frame("decode_batch", _act(_tensor_ext("float32", [1 << 40, 1 << 40]))), "truncated frame"),
    (_frame("decode_batch", _act(_tensor_ext("float32", [2, 2]))), "truncated frame"),
    (_frame("decode_batch", _act(_tensor_ext("object", [1])), b"\0" * 8), "dtype 'object'"),
    (_frame("decode_batch", _act(_tensor_ext("<f4", [1])), b"\0" * 4), "dtype '<f4'"),
    (_frame("decode_batch", _act(_tensor_ext("float32", [-1]))), "non-negative"),
    (_frame("decode_batch", _act(_tensor_ext("float32", [1.5]))), "non-negative ints"),
    (_frame("decode_batch", _act(_tensor_ext("float32", [1] * 9)), b"\0" * 4), "at most 8 ints"),
    (_frame("decode_batch", _act(msgpack.ExtType(TENSOR_EXT, msgpack.packb({"dtype": "float32"})))),
     r"descriptor must be \[dtype, shape\]"),
    (_frame("decode_batch", _act(msgpack.ExtType(99, b"x"))), "unknown msgpack ext code 99"),
    (_frame("decode_batch", _act(msgpack.ExtType(TENSOR_EXT, b"\xc1"))), "malformed tensor descriptor"),
    (_frame("decode_batch", _act({"dtype": "float32", "shape": [1], "data": b"\0" * 4})), "hidden"),
    (_frame("island_work", {"term": 1, "leader": "a", "round": 1, "island": 0, "generations": 1, "seed": 1,
                            "problem": {}, "individuals": [[1, "x"]]}), r"individuals\[0\]\[1\]"),
])
def test_bad_frames_are_remote_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data)


def test_tensors_decode_as_views_of_the_frame() -> None:
    k = (np.arange(3 * 2 * 4, dtype=np.float32) - 7).reshape(3, 2, 4)  # (T, kv_heads, head_dim)
    v = np.arange(3 * 2 * 4, dtype=np.int64).reshape(3, 2, 4)
    frame = encode(_kv(Tensor.from_array(k), Tensor.from_array(v)))
    raw = np.frombuffer(frame, np.uint8)
    for buf in (frame, bytearray(frame), memoryview(frame), memoryview(bytearray(frame))):
        msg = decode(buf)
        assert isinstance(msg, KVChunk)
        got_k, got_v = msg.k.array(), msg.v.array()
        np.testing.assert_array_equal(got_k, k)
        np.testing.assert_array_equal(got_v, v)
        src = np.frombuffer(buf, np.uint8)
        assert np.shares_memory(got_k, src) and np.shares_memory(got_v, src)  # no copy
        assert not got_k.flags.writeable and not got_v.flags.writeable
        assert got_k.flags.c_contiguous and got_v.dtype == np.int64
    # The frame is header then buffers: the tensor bytes sit in it verbatim, aligned.
    start = frame.find(k.tobytes())
    assert start % ALIGN == 0 and frame[start:start + k.nbytes] == k.tobytes()
    assert np.shares_memory(decode(frame).k.array(), raw[start:start + k.nbytes])


def test_from_array_wraps_without_copying_and_copies_only_when_it_must() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = Tensor.from_array(a)
    assert np.shares_memory(t.array(), a) and not t.array().flags.writeable
    assert a.flags.writeable  # the caller's array is untouched
    strided = a[:, ::2]  # not contiguous: one copy into wire layout
    ts = Tensor.from_array(strided)
    assert not np.shares_memory(ts.array(), a)
    np.testing.assert_array_equal(ts.array(), strided)
    assert ts.shape == (3, 2) and ts.dtype == "float32" and ts.nbytes == 24


def test_tensor_equality_and_raw_constructor() -> None:
    a = np.arange(4, dtype=np.int32)
    t = Tensor("int32", (4,), a.tobytes())
    assert t == Tensor.from_array(a) and hash(t) == hash(Tensor.from_array(a))
    assert t != Tensor.from_array(a + 1) and t != Tensor.from_array(a.astype(np.int64))
    assert t != Tensor.from_array(a.reshape(2, 2))
    assert Tensor("int32", [4], memoryview(bytearray(a.tobytes()))) == t
    with pytest.raises(LocalProtocolError, match="needs 16 bytes, got 15"):
        Tensor("int32", (4,), b"\0" * 15)
    with pytest.raises(AttributeError):
        t.dtype = "int64"  # type: ignore[misc]
    empty = Tensor.from_array(np.zeros((0, 3), np.float16))
    back = decode(encode(_step(empty)))
    assert back.hidden == empty and back.hidden.shape == (0, 3)


def test_one_cap_everywhere() -> None:
    assert Codec().max_message_bytes == MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    assert DATA_CHUNK_BYTES + HEADER_HEADROOM < MAX_MESSAGE_BYTES


def test_a_frame_exactly_at_the_cap_passes_and_one_byte_more_does_not() -> None:
    msg = _step(Tensor.from_array(np.zeros((1, 1000), np.uint8)))
    size = len(encode(msg))
    assert Codec(max_message_bytes=size).decode(Codec(max_message_bytes=size).encode(msg)) == msg
    with pytest.raises(LocalProtocolError, match="over the"):
        Codec(max_message_bytes=size - 1).encode(msg)
    with pytest.raises(RemoteProtocolError, match="over the"):
        Codec(max_message_bytes=size - 1).decode(encode(msg))


@pytest.mark.parametrize(("per_token", "want"), [
    (1, DATA_CHUNK_BYTES - HEADER_HEADROOM),
    (2 * 12 * 64 * 4, (DATA_CHUNK_BYTES - HEADER_HEADROOM) // (2 * 12 * 64 * 4)),  # K and V, fp32
    (DATA_CHUNK_BYTES, 1),  # wider than a chunk: one per frame
])
def test_chunk_tokens_fill_a_chunk_under_the_cap(per_token: int, want: int) -> None:
    n = chunk_tokens(per_token)
    assert n == want and n >= 1
    # A KV chunk of that many tokens really encodes within the chunk (or alone, for wide tokens).
    if per_token % 8 == 0 and per_token <= 8192:
        kv = np.zeros((n, per_token // 8), np.float32)  # k and v each half of a token's bytes
        frame = encode(KVChunk("r" * 36, 1 << 30, 99, 999, 1 << 40, 1 << 41, Tensor.from_array(kv),
                               Tensor.from_array(kv)))
        assert len(frame) <= DATA_CHUNK_BYTES


def test_chunk_tokens_refuses_nonsense() -> None:
    for bad in (0, -5, 1.5, True):
        with pytest.raises(LocalProtocolError, match="positive int"):
            chunk_tokens(bad)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="does not fit"):
        chunk_tokens(MAX_MESSAGE_BYTES)
    assert chunk_tokens(100, cap=1 << 30) == (MAX_MESSAGE_BYTES - HEADER_HEADROOM) // 100


def test_size_cap_both_ways() -> None:
    small = Codec(max_message_bytes=1024)
    big = _step(Tensor.from_array(np.zeros((16, 32), np.float32)))
    data = encode(big)
    with pytest.raises(RemoteProtocolError, match="over the 1024-byte cap"):
        small.decode(data)
    with pytest.raises(LocalProtocolError, match="over the 1024-byte cap"):
        small.encode(big)
    assert small.decode(small.encode(Heartbeat("a", 1, "a", 0, 3))) == Heartbeat("a", 1, "a", 0, 3)


def test_ext_codes_and_message_types_register_once() -> None:
    reg = ExtRegistry()
    reg.register(5, Tensor, lambda t: b"", lambda b: None)
    with pytest.raises(LocalProtocolError, match="ext code 5 already registered"):
        reg.register(5, bytearray, lambda t: b"", lambda b: None)
    with pytest.raises(LocalProtocolError, match="already has msgpack ext code 5"):
        reg.register(6, Tensor, lambda t: b"", lambda b: None)
    with pytest.raises(LocalProtocolError, match="already registered"):
        EXT.register(TENSOR_EXT, complex, lambda t: b"", lambda b: None)
    with pytest.raises(LocalProtocolError, match="registered twice"):
        _register("heartbeat", "control")(type("Dup", (), {}))


def test_encoding_a_non_message_or_bad_value_is_local() -> None:
    with pytest.raises(LocalProtocolError, match="not a wire message"):
        encode(object())  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode(PlanPropose(1, "a", 1, {"x": {1, 2}}))


def test_lists_become_tuples_and_floats_accept_ints() -> None:
    frame = _frame("island_result", {"term": 1, "round": 2, "island": 0, "node_id": "b",
                                     "individuals": [[1, 2], [3]], "fitness": [1, 2.5]})
    msg = decode(frame)
    assert msg.individuals == ((1, 2), (3,)) and msg.fitness == (1.0, 2.5)
    assert isinstance(msg.fitness[0], float)


_PREFILL = {"req": "r", "epoch": 2, "replica": 0, "first_block": 0, "offset": 0, "last": True,
            "prompt_len": 2, "decoder": 1, "entry": "e", "sampling": {}, "seed": 5}


def test_defaults_fill_missing_optional_fields() -> None:
    msg = decode(_frame("prefill", _PREFILL))
    assert msg == PrefillChunk("r", 2, 0, 0, 0, True, 2, 1, "e", {}, 5, None, None, -1)


@pytest.mark.parametrize("which", [(), ("ids",), ("hidden",), ("ids", "hidden")])
def test_optional_tensor_fields_round_trip_as_views(which: tuple[str, ...]) -> None:
    ids = np.array([1, 5, 9], np.int64)  # (T,)
    hidden = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)  # (T, H)
    given = {"ids": Tensor.from_array(ids), "hidden": Tensor.from_array(hidden)}
    msg = PrefillChunk("r", 2, 0, 0, 0, True, 3, 1, "e", {"temperature": 0.5}, 5,
                       **{k: given[k] for k in which})
    frame = encode(msg)
    back = decode(frame)
    assert back == msg
    for name, want in (("ids", ids), ("hidden", hidden)):
        got = getattr(back, name)
        if name in which:
            np.testing.assert_array_equal(got.array(), want)
            assert np.shares_memory(got.array(), np.frombuffer(frame, np.uint8))
        else:
            assert got is None
    # A tensor field sent as nil stays None; a tensor where none may be is refused.
    with pytest.raises(RemoteProtocolError, match=r"prefill\.seed"):
        decode(_frame("prefill", {**_PREFILL, "seed": _tensor_ext("int64", [1])}, bytes(8)))


_VALID = [encode(Heartbeat("a", 3, "b", 1, 9, 2, "n")),
          encode(PlanPropose(1, "a", 2, {"replicas": [{"stages": [{"node": "a"}]}]})),
          encode(_kv(Tensor.from_array(np.ones((2, 2), np.float16)), Tensor.from_array(np.ones((2, 2), np.float16)))),
          encode(_step(Tensor.from_array(np.ones((3, 5), np.float32))))]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 10_000))
def test_corrupted_frames_never_escape_as_other_errors(frame: bytes, flips, cut: int) -> None:
    """Flip bytes of valid frames and truncate them: decode answers a message or RemoteProtocolError."""
    data = bytearray(frame)
    for pos, val in flips:
        data[pos % len(data)] = val
    with contextlib.suppress(RemoteProtocolError):
        decode(bytes(data[: max(1, len(data) - cut % len(data))]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(-2**63, 2**63 - 1), max_size=5), max_size=5), st.integers(0, 2**62))
def test_island_work_round_trips_any_individuals(inds, seed) -> None:
    msg = IslandWork(1, "a", 1, 0, tuple(tuple(i) for i in inds), 3, seed, {"k": [1, 2]})
    assert decode(encode(msg)) == msg



@pytest.mark.parametrize(("depth", "match"), [(100_000, "malformed frame: StackError"), (100, "nested too deeply")])
def test_deep_nesting_is_refused_without_recursion_errors(depth: int, match: str) -> None:
    deep = b"\x91" * depth + b"\x00"  # [[[...0...]]]
    body = (b"\x84" + msgpack.packb("term") + b"\x01" + msgpack.packb("leader") + msgpack.packb("a")
            + msgpack.packb("epoch") + b"\x01" + msgpack.packb("plan") + b"\x81" + msgpack.packb("x") + deep)
    data = (b"\x83" + msgpack.packb("v") + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("t")
            + msgpack.packb("plan_propose") + msgpack.packb("b") + body)
    with pytest.raises(RemoteProtocolError, match=match):
        decode(_raw(data))


def test_bench_wire_prints_every_frame_kind_decoded_as_views(capsys) -> None:
    from meshllm.cli import main

    assert main(["bench", "wire", "--json", "--repeats", "1", "--budget-s", "0.001", "--kv-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    kinds = out["kinds"]
    assert set(kinds) == {"activation_1x768", "activation_16x768", "kv_8x12x64", "kv_chunk_170x12x64"}
    for k in kinds.values():
        assert k["decoded_as_views"] is True and k["codec_us"] > 0 and k["memcpy_us"] > 0
        assert k["ratio_vs_memcpy"] == pytest.approx(k["memcpy_us"] / k["codec_us"], rel=0.05, abs=0.002)
    assert kinds["kv_8x12x64"]["frame_bytes"] >= 2 * 8 * 12 * 64 * 4
    assert out["overall"]["ratio_vs_memcpy"] > 0


def test_both_header_paths_write_the_same_frame() -> None:
    """Plain ``Tensor`` fields take the fast path (a reused packer, descriptors substituted in
    field order); a message with tensors nested elsewhere would take the default-hook path. Both
    must write the same bytes."""
    k = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    v = np.arange(12, dtype=np.int8).reshape(3, 4)
    msg = _kv(Tensor.from_array(k), Tensor.from_array(v))
    codec = Codec()
    arrays: list[np.ndarray] = []
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    header = codec._pack_nested(msg.TYPE, body, arrays)
    assert [a.dtype for a in arrays] == [np.float16, np.int8]
    assert codec.encode(msg) == _raw(header, k.tobytes(), v.tobytes())
