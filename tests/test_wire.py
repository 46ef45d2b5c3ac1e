"""Wire codec: every message round-trips; everything a peer can get wrong is a RemoteProtocolError."""

from __future__ import annotations

import contextlib
import dataclasses
import typing

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import LocalProtocolError, RemoteProtocolError
from meshllm.wire.codec import EXT, TENSOR_EXT, Codec, ExtRegistry, decode, encode
from meshllm.wire.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Activations,
    Heartbeat,
    IslandWork,
    KVChunk,
    PlanPropose,
    Prefill,
    _register,
)
from meshllm.wire.tensor import DTYPES, Tensor


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
    frame = msgpack.unpackb(data, raw=False, ext_hook=lambda c, d: c)
    assert frame["v"] == PROTOCOL_VERSION and frame["t"] == tag
    assert dataclasses.is_dataclass(msg) and msg.__dataclass_params__.frozen
    assert not hasattr(msg, "__dict__")  # slotted
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, dataclasses.fields(cls)[0].name, None)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tensor_round_trip_exact(dtype: str) -> None:
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)  # (2, 3, 4)
    msg = KVChunk("r", 3, 5, Tensor.from_array(a), Tensor.from_array(a[:1]), 16)
    back = decode(encode(msg))
    assert isinstance(back, KVChunk)
    np.testing.assert_array_equal(back.k.to_array(), a)  # bit-exact
    assert back.k.to_array().dtype == np.dtype(dtype) and back.v.to_array().shape == (1, 3, 4)


def test_tensor_big_endian_input_is_sent_little_endian() -> None:
    a = np.arange(5, dtype=">f4")
    t = Tensor.from_array(a)
    np.testing.assert_array_equal(t.to_array(), a)
    assert t.data == np.arange(5, dtype="<f4").tobytes()


@pytest.mark.parametrize("bad", [np.array([object(), 1], dtype=object), np.zeros(2, dtype=np.complex64),
                                 np.zeros(2, dtype="U3"), np.zeros(2, dtype=bool)])
def test_tensor_refuses_dtypes_outside_the_allow_list(bad: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError, match="dtype"):
        Tensor.from_array(bad)


def _frame(tag: str, body: dict, version: int = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"v": version, "t": tag, "b": body}, use_bin_type=True)


def _tensor_ext(dtype, shape, data) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb({"dtype": dtype, "shape": shape, "data": data}))


HB = {"node_id": "a", "term": 1, "leader": None, "priority": 0, "seq": 1}


@pytest.mark.parametrize(("data", "match"), [
    (b"\xc1", "malformed frame"),
    (b"", "malformed frame"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({"v": 1, "t": "heartbeat"}), "not a map with v, t and b"),
    (_frame("heartbeat", HB) + b"\x00", "malformed frame"),
    (_frame("heartbeat", HB, version=2), "protocol version 2 not supported"),
    (_frame("no_such_type", {}), "unknown message type 'no_such_type'"),
    (_frame("heartbeat", []), "body must be a map"),
    (_frame("heartbeat", {**HB, "evil": 1}), "unknown fields"),
    (_frame("heartbeat", {k: v for k, v in HB.items() if k != "term"}), "missing field 'term'"),
    (_frame("heartbeat", {**HB, "term": "1"}), "heartbeat.term: expected int"),
    (_frame("heartbeat", {**HB, "term": True}), "heartbeat.term"),
    (_frame("heartbeat", {**HB, "leader": 5}), "heartbeat.leader"),
    (msgpack.packb({1: 2}), "malformed frame"),  # non-string map keys
    (_frame("plan_propose", {"term": 1, "leader": "a", "epoch": 1,
                             "plan": {"t": _tensor_ext("float32", [1], b"\0" * 4)}}), "is not allowed here"),
    (_frame("activations", {"req": "r", "epoch": 1, "positions": [0],
                            "hidden": _tensor_ext("float32", [2, 2], b"\0" * 15)}), "needs 16 bytes, got 15"),
    (_frame("activations", {"req": "r", "epoch": 1, "positions": [0],
                            "hidden": _tensor_ext("object", [1], b"\0" * 8)}), "dtype 'object'"),
    (_frame("activations", {"req": "r", "epoch": 1, "positions": [0],
                            "hidden": _tensor_ext("float32", [-1], b"")}), "non-negative"),
    (_frame("activations", {"req": "r", "epoch": 1, "positions": [0],
                            "hidden": msgpack.ExtType(99, b"x")}), "unknown msgpack ext code 99"),
    (_frame("activations", {"req": "r", "epoch": 1, "positions": [0],
                            "hidden": msgpack.ExtType(TENSOR_EXT, b"\xc1")}), "malformed tensor payload"),
    (_frame("activations", {"req": "r", "epoch": 1, "positions": [0],
                            "hidden": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}}), "hidden"),
    (_frame("island_work", {"term": 1, "leader": "a", "round": 1, "island": 0, "generations": 1, "seed": 1,
                            "problem": {}, "individuals": [[1, "x"]]}), r"individuals\[0\]\[1\]"),
])
def test_bad_frames_are_remote_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data)


def test_size_cap_both_ways() -> None:
    small = Codec(max_message_bytes=1024)
    big = Activations("r", 1, Tensor.from_array(np.zeros((16, 32), np.float32)), tuple(range(16)))
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


def test_defaults_fill_missing_optional_fields() -> None:
    msg = decode(_frame("prefill", {"req": "r", "epoch": 2, "token_ids": [1, 2], "sampling": {},
                                    "decoder": "d0"}))
    assert msg == Prefill("r", 2, (1, 2), {}, "d0", None, 0)


_VALID = [encode(Heartbeat("a", 3, "b", 1, 9, 2, "n")),
          encode(PlanPropose(1, "a", 2, {"replicas": [{"stages": [{"node": "a"}]}]})),
          encode(KVChunk("r", 1, 2, Tensor.from_array(np.ones((2, 2), np.float16)),
                         Tensor.from_array(np.ones((2, 2), np.float16)), 0))]


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
    data = (b"\x83" + msgpack.packb("v") + b"\x01" + msgpack.packb("t") + msgpack.packb("plan_propose")
            + msgpack.packb("b") + body)
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data)
