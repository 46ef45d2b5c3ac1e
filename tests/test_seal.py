"""Sealed link frames (wire/seal.py): keys from the handshake, and every way a frame can be
tampered with on the way — bit flips, truncation, replay, reordering, drops — fails to open."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import RemoteProtocolError
from meshllm.wire.auth import Handshake, mesh_id
from meshllm.wire.codec import decode, encode
from meshllm.wire.seal import TAG_BYTES, Opener, Sealer, derive_keys

KEY = b"a mesh key of our own"
MESH = mesh_id("model", KEY)


def handshake(lane: str = "control", nonce_a: bytes = b"A" * 16, nonce_b: bytes = b"B" * 16,
              key_b: bytes = KEY) -> tuple[Handshake, Handshake]:
    a = Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=nonce_a, initiator=True, lane=lane, pair=b"p")
    b = Handshake(key=key_b, node_id="b", mesh_id=MESH, nonce=nonce_b, initiator=False)
    (reply,) = b.receive(decode(encode(a.start())))
    (proof,) = a.receive(decode(encode(reply)))
    assert b.receive(decode(encode(proof))) == []
    return a, b


def test_both_ends_derive_matching_keys_per_direction() -> None:
    a, b = handshake()
    a_out, a_in = a.frame_keys()
    b_out, b_in = b.frame_keys()
    assert a_out == b_in and a_in == b_out and a_out != a_in
    s, o = Sealer(a_out), Opener(b_in)
    frames = [b"", b"x", bytes(range(256)) * 40]
    sealed = [s.seal(f) for f in frames]
    assert [len(x) for x in sealed] == [len(f) + TAG_BYTES for f in frames]
    assert [o.open(x) for x in sealed] == frames
    # the other direction has its own key and counter
    assert Opener(a_in).open(Sealer(b_out).seal(b"back")) == b"back"


def test_keys_differ_per_lane_link_and_mesh_key() -> None:
    base = handshake()[0].frame_keys()
    assert handshake(lane="data")[0].frame_keys() != base
    assert handshake(nonce_b=b"C" * 16)[0].frame_keys() != base  # a later link of the same pair
    other = derive_keys(b"another key", mesh=MESH, initiator="a", responder="b", nonce_i=b"A" * 16,
                        nonce_r=b"B" * 16, lane="control")
    assert set(other).isdisjoint(base)


def test_no_keys_before_the_handshake_is_done() -> None:
    a = Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=b"A" * 16, initiator=True)
    with pytest.raises(Exception, match="only after"):
        a.frame_keys()


def _stream(n: int = 4) -> tuple[list[bytes], list[bytes], bytes]:
    k = b"k" * 32
    s = Sealer(k)
    frames = [b"frame %d " % i * (i + 1) for i in range(n)]
    return frames, [s.seal(f) for f in frames], k


@pytest.mark.parametrize("how", ["flip", "truncate", "replay", "reorder", "drop", "empty", "tag_only"])
def test_every_tampering_fails_to_open_and_the_lane_stays_failed(how: str) -> None:
    frames, sealed, k = _stream()
    o = Opener(k)
    assert o.open(sealed[0]) == frames[0]
    bad = {
        "flip": bytes([sealed[1][0] ^ 1]) + sealed[1][1:],
        "truncate": sealed[1][:-1],
        "replay": sealed[0],
        "reorder": sealed[2],
        "drop": sealed[2],  # frame 1 never arrived
        "empty": b"",
        "tag_only": sealed[1][-TAG_BYTES:],
    }[how]
    with pytest.raises(RemoteProtocolError):
        o.open(bad)
    with pytest.raises(RemoteProtocolError):  # nothing after a failure opens, not even the right frame
        o.open(sealed[1])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzzed_sealed_streams_never_open_wrong(data: st.DataObject) -> None:
    """Any edit of a sealed stream (bit flips, cuts, splices, duplicates, swaps) either leaves the
    stream as sealed, and opens to the frames sent, or fails at the first edited frame."""
    frames, sealed, k = _stream(5)
    edited = list(sealed)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(edited) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "dup", "swap", "append"]))
        f = edited[i]
        if op == "flip" and f:
            j = data.draw(st.integers(0, len(f) - 1))
            edited[i] = f[:j] + bytes([f[j] ^ (1 << data.draw(st.integers(0, 7)))]) + f[j + 1:]
        elif op == "cut":
            edited[i] = f[:data.draw(st.integers(0, max(len(f) - 1, 0)))]
        elif op == "dup":
            edited.insert(i, f)
        elif op == "swap" and i + 1 < len(edited):
            edited[i], edited[i + 1] = edited[i + 1], edited[i]
        elif op == "append":
            edited[i] = f + data.draw(st.binary(min_size=1, max_size=4))
    o = Opener(k)
    opened: list[bytes] = []
    for x in edited:
        try:
            opened.append(o.open(x))
        except RemoteProtocolError:
            break
    # whatever opened is exactly a prefix of what was sent, in order
    assert opened == frames[:len(opened)]
    assert len(opened) == len(frames) or edited[:len(frames)] != sealed


def test_bench_wire_reports_sealed_beside_plain(capsys) -> None:
    import json

    from meshllm.cli import main

    assert main(["bench", "wire", "--json", "--repeats", "1", "--budget-s", "0.001", "--kv-tokens", "8",
                 "--handoff-mib", "2", "--hop-rounds", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in out["kinds"].values():
        assert k["seal_us"] > 0 and k["sealed_us"] > 0
        assert k["sealed_ratio_vs_memcpy"] == pytest.approx(k["memcpy_us"] / k["sealed_us"], rel=0.05, abs=0.002)
    s = out["sealed"]
    assert s["decode_frame"] == "activation_1x768" and s["decode_frame_added_us"] > 0
    assert s["kv_1mib_frame_bytes"] > 1_000_000 and s["kv_1mib_ratio_vs_memcpy"] > 0
    h = out["handoff"]
    assert h["plain_mb_s"] > 0 and h["sealed_mb_s"] > 0
    assert h["sealed_vs_plain"] == pytest.approx(h["sealed_mb_s"] / h["plain_mb_s"], rel=0.05)
    hop = out["hop"]
    assert hop["frame_bytes"] == out["kinds"]["activation_1x768"]["frame_bytes"] and hop["plain_hop_us"] > 0
    assert hop["added_us_per_hop"] == pytest.approx(hop["sealed_hop_us"] - hop["plain_hop_us"], abs=0.11)
