"""Mesh-key handshake: both directions authenticated; wrong keys, reflection and replay refused."""

from __future__ import annotations

import dataclasses

import pytest

from meshllm.errors import LocalProtocolError, RemoteProtocolError
from meshllm.wire.auth import Handshake, mesh_id
from meshllm.wire.codec import decode, encode
from meshllm.wire.messages import AuthProof, Hello, HelloReply

KEY = b"correct horse battery staple"
MESH = mesh_id("model-abc", KEY)


def pair(key_a=KEY, key_b=KEY, mesh_a=MESH, mesh_b=MESH, nonce_a=b"A" * 16, nonce_b=b"B" * 16):
    a = Handshake(key=key_a, node_id="a", mesh_id=mesh_a, nonce=nonce_a, initiator=True, name="alpha", port=1)
    b = Handshake(key=key_b, node_id="b", mesh_id=mesh_b, nonce=nonce_b, initiator=False, name="beta", port=2)
    return a, b


def wire(msg):
    return decode(encode(msg))  # every handshake message travels through the codec


def test_handshake_authenticates_both_ends() -> None:
    a, b = pair()
    (reply,) = b.receive(wire(a.start()))
    assert not b.done and isinstance(reply, HelloReply)
    (proof,) = a.receive(wire(reply))
    assert a.done and a.peer == "b" and a.peer_name == "beta" and a.peer_port == 2
    assert b.receive(wire(proof)) == []
    assert b.done and b.peer == "a" and b.peer_name == "alpha" and b.peer_port == 1


def test_wrong_key_fails_on_both_sides() -> None:
    a, b = pair(key_b=b"another key")
    reply = b.receive(a.start())[0]
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        a.receive(reply)  # the initiator refuses a responder without the key
    a, b = pair(key_a=b"another key")
    reply = b.receive(a.start())[0]
    with pytest.raises(RemoteProtocolError):
        a.receive(reply)
    # An initiator without the key, talking to an honest responder, cannot forge its proof either.
    a2, b2 = pair()
    b2.receive(a2.start())
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        b2.receive(AuthProof("a", b"\0" * 32))
    assert not b2.done


def test_reflected_proof_is_refused() -> None:
    # An attacker without the key opens to b and replays b's own responder proof as its AuthProof.
    a, b = pair()
    reply = b.receive(a.start())[0]
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        b.receive(AuthProof("a", reply.proof))


def test_replayed_proof_with_fresh_nonce_is_refused() -> None:
    a, b = pair()
    proof = a.receive(b.receive(a.start())[0])[0]
    b2 = Handshake(key=KEY, node_id="b", mesh_id=MESH, nonce=b"C" * 16, initiator=False)
    b2.receive(Hello("a", MESH, b"A" * 16))
    with pytest.raises(RemoteProtocolError):
        b2.receive(proof)


def test_other_mesh_self_id_and_order_are_refused() -> None:
    a, b = pair(mesh_a=mesh_id("other-model", KEY))
    with pytest.raises(RemoteProtocolError, match="another mesh"):
        b.receive(a.start())
    b = Handshake(key=KEY, node_id="b", mesh_id=MESH, nonce=b"B" * 16, initiator=False)
    with pytest.raises(RemoteProtocolError, match="claims node id 'b'"):
        b.receive(Hello("b", MESH, b"X" * 16))
    with pytest.raises(RemoteProtocolError, match="nonce shorter"):
        b.receive(Hello("a", MESH, b"short"))
    with pytest.raises(RemoteProtocolError, match="expected hello"):
        b.receive(AuthProof("a", b"x"))
    a, _ = pair()
    with pytest.raises(RemoteProtocolError, match="expected hello_reply"):
        a.receive(HelloReply("b", MESH, b"B" * 16, b"p"))  # before start()
    with pytest.raises(LocalProtocolError):
        Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=b"x", initiator=True)


def test_nothing_after_done() -> None:
    a, b = pair()
    b.receive(a.receive(b.receive(a.start())[0])[0])
    with pytest.raises(RemoteProtocolError, match="after the handshake"):
        b.receive(AuthProof("a", b"x"))


def test_mesh_id_depends_on_model_and_key_and_hides_the_key() -> None:
    ids = {mesh_id(m, k) for m in ("m1", "m2") for k in (b"k1", b"k2")}
    assert len(ids) == 4
    assert mesh_id("m1", b"k1") == mesh_id("m1", b"k1")
    mid = mesh_id("m1", KEY)
    assert len(mid) == 16 and int(mid, 16) >= 0
    assert KEY.hex()[:8] not in mid and b"horse" not in mid.encode()


def test_data_lane_handshake_names_its_control_connection_under_the_proofs() -> None:
    a, b = pair()
    b.receive(a.start())
    ctl = a.initiator_nonce
    assert ctl == b"A" * 16 == b.initiator_nonce
    da = Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=b"C" * 16, initiator=True, lane="data", pair=ctl)
    db = Handshake(key=KEY, node_id="b", mesh_id=MESH, nonce=b"D" * 16, initiator=False)
    hello = wire(da.start())
    assert isinstance(hello, Hello) and hello.lane == "data" and hello.pair == ctl
    db.receive(hello)
    assert db.lane == "data" and db.pair == ctl
    # A Hello whose pair was changed in flight: the responder signs what it saw, the initiator refuses.
    db2 = Handshake(key=KEY, node_id="b", mesh_id=MESH, nonce=b"E" * 16, initiator=False)
    da2 = Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=b"F" * 16, initiator=True, lane="data", pair=ctl)
    (reply,) = db2.receive(dataclasses.replace(da2.start(), pair=b"X" * 16))
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        da2.receive(reply)
    # A lane changed in flight fails the same way.
    db3 = Handshake(key=KEY, node_id="b", mesh_id=MESH, nonce=b"G" * 16, initiator=False)
    da3 = Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=b"H" * 16, initiator=True, lane="data", pair=ctl)
    (reply,) = db3.receive(dataclasses.replace(da3.start(), lane="control"))
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        da3.receive(reply)


def test_unknown_lanes_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="lane"):
        Handshake(key=KEY, node_id="a", mesh_id=MESH, nonce=b"A" * 16, initiator=True, lane="bulk")
    b = Handshake(key=KEY, node_id="b", mesh_id=MESH, nonce=b"B" * 16, initiator=False)
    with pytest.raises(RemoteProtocolError, match="lane 'bulk'"):
        b.receive(Hello("a", MESH, b"A" * 16, lane="bulk"))


def _fuzz_messages():
    from hypothesis import strategies as st

    from meshllm.wire.messages import AuthProof, Hello, HelloReply

    ids = st.sampled_from(["a", "b", "", "mallory"]) | st.text(max_size=8)
    meshes = st.sampled_from(["m1", "m2"]) | st.text(max_size=6)
    raw = st.binary(max_size=40)
    lanes = st.sampled_from(["control", "data", "bogus"])
    return st.lists(st.one_of(
        st.builds(Hello, ids, meshes, raw, st.text(max_size=4), st.integers(0, 70000), lanes, raw),
        st.builds(HelloReply, ids, meshes, raw, raw, st.text(max_size=4), st.integers(0, 70000)),
        st.builds(AuthProof, ids, raw)), min_size=1, max_size=4)


def test_fuzzed_handshake_messages_never_authenticate_without_the_key() -> None:
    """Any sequence of forged hello / hello_reply / auth_proof messages, to either end: each is
    refused with RemoteProtocolError (nothing else escapes), and no end ever finishes the
    handshake with a peer that does not know the key."""
    import os

    from hypothesis import given, settings

    from meshllm.errors import RemoteProtocolError
    from meshllm.wire.auth import NONCE_BYTES, Handshake

    @settings(max_examples=300, deadline=None, database=None)
    @given(_fuzz_messages(), st_bools())
    def run(msgs, initiator: bool) -> None:
        hs = Handshake(key=b"the-real-mesh-key", node_id="b", mesh_id="m1", nonce=os.urandom(NONCE_BYTES),
                       initiator=initiator)
        if initiator:
            hs.start()
        for m in msgs:
            try:
                hs.receive(m)
            except RemoteProtocolError:
                break
            # a forger without the key cannot produce a valid proof: never done
            assert not hs.done

    run()


def st_bools():
    from hypothesis import strategies as st

    return st.booleans()
