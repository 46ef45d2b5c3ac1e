"""Mesh key authentication: a mutual challenge–response HMAC handshake, sans-IO.

Both ends hold the mesh key (a shared secret). The initiator sends ``Hello`` with a fresh nonce;
the responder answers ``HelloReply`` with its own nonce and a proof
``HMAC(key, "responder" | mesh | initiator | responder | nonce_i | nonce_r | lane | pair)``; the initiator
checks it and answers ``AuthProof`` with the same HMAC labelled ``"initiator"``. The role label
stops a peer reflecting our own proof back at us; both nonces make every proof single-use. A link
has two connections (control and data lanes, see ``meshllm.net.links``), each authenticated by
its own handshake; ``lane`` and ``pair`` (the control connection's initiator nonce, which ties a
data connection to its control connection) are part of what both proofs sign.
Until a ``Handshake`` is ``done`` the shell must pass nothing else from that peer on; once it is,
``frame_keys()`` gives the keys that seal the lane's frames (``meshllm.wire.seal``, HKDF over the
mesh key and both nonces, one key per direction).

``mesh_id(model_id, key)`` is what mDNS TXT records carry: an HMAC of the model id under the key,
so nodes of other meshes are filtered out early without the key ever leaving the process.
"""

from __future__ import annotations

import hashlib
import hmac

from meshllm.errors import LocalProtocolError, RemoteProtocolError
from meshllm.wire.ids import NodeId
from meshllm.wire.messages import AuthProof, Hello, HelloReply, Message
from meshllm.wire.seal import derive_keys

NONCE_BYTES = 16
_DOMAIN = b"meshllm-auth-v2"
LANES = ("control", "data")


def mesh_id(model_id: str, key: bytes) -> str:
    """A 16-hex-digit id for (model, key); reveals neither the key nor (without it) the pairing."""
    return hmac.new(key, b"meshllm-mesh-id-v1\0" + model_id.encode(), hashlib.sha256).hexdigest()[:16]


def _field(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b  # length-prefixed: no ambiguity between fields


def proof(key: bytes, role: str, mesh: str, initiator: str, responder: str,
          nonce_i: bytes, nonce_r: bytes, lane: str = "control", pair: bytes = b"") -> bytes:
    msg = b"".join(_field(x) for x in (_DOMAIN, role.encode(), mesh.encode(), initiator.encode(),
                                       responder.encode(), nonce_i, nonce_r, lane.encode(), pair))
    return hmac.new(key, msg, hashlib.sha256).digest()


class Handshake:
    """One end of the handshake. ``nonce`` must be fresh random bytes (the shell uses
    ``os.urandom(NONCE_BYTES)``; tests pass fixed ones).

    Initiator: ``msg = hs.start()`` -> send; feed the reply to ``hs.receive`` -> send what it returns.
    Responder: feed ``Hello`` to ``hs.receive`` -> send the ``HelloReply``; feed ``AuthProof``.
    ``receive`` raises ``RemoteProtocolError`` on anything wrong; then close the link.
    An initiator names its ``lane`` and ``pair``; a responder learns them as ``lane`` and ``pair``
    from the ``Hello``.
    """

    def __init__(self, *, key: bytes, node_id: NodeId, mesh_id: str, nonce: bytes, initiator: bool,
                 name: str = "", port: int = 0, lane: str = "control", pair: bytes = b"") -> None:
        if len(nonce) < NONCE_BYTES:
            raise LocalProtocolError(f"handshake nonce must be at least {NONCE_BYTES} bytes")
        if lane not in LANES:
            raise LocalProtocolError(f"handshake lane must be one of {LANES}, not {lane!r}")
        self.lane = lane
        self.pair = pair
        self._key = key
        self.node_id = node_id
        self.mesh_id = mesh_id
        self._nonce = nonce
        self.initiator = initiator
        self._name = name
        self._port = port
        self._peer_nonce: bytes | None = None
        self.peer: NodeId | None = None
        self.peer_name = ""
        self.peer_port = 0
        self.done = False
        self._started = False

    def start(self) -> Hello:
        if not self.initiator or self._started:
            raise LocalProtocolError("only an initiator starts a handshake, once")
        self._started = True
        return Hello(self.node_id, self.mesh_id, self._nonce, self._name, self._port, self.lane, self.pair)

    @property
    def initiator_nonce(self) -> bytes | None:
        """The initiator's nonce (known to the responder once ``Hello`` arrived): what a data
        connection names its control connection by, in ``pair``."""
        if self.initiator:
            return self._nonce
        return self._peer_nonce

    def frame_keys(self) -> tuple[bytes, bytes]:
        """``(send key, receive key)`` of this end for sealing the lane's frames
        (``meshllm.wire.seal``); only once the handshake is done."""
        if not self.done or self.peer is None or self._peer_nonce is None:
            raise LocalProtocolError("frame keys exist only after a completed handshake")
        if self.initiator:
            i, r, nonce_i, nonce_r = self.node_id, self.peer, self._nonce, self._peer_nonce
        else:
            i, r, nonce_i, nonce_r = self.peer, self.node_id, self._peer_nonce, self._nonce
        i2r, r2i = derive_keys(self._key, mesh=self.mesh_id, initiator=i, responder=r, nonce_i=nonce_i,
                               nonce_r=nonce_r, lane=self.lane)
        return (i2r, r2i) if self.initiator else (r2i, i2r)

    def _check_peer(self, node_id: str, mesh: str, nonce: bytes) -> None:
        if mesh != self.mesh_id:
            raise RemoteProtocolError(f"peer {node_id!r} is in another mesh ({mesh!r})")
        if node_id == self.node_id or not node_id:
            raise RemoteProtocolError(f"peer claims node id {node_id!r}")
        if len(nonce) < NONCE_BYTES:
            raise RemoteProtocolError(f"peer nonce shorter than {NONCE_BYTES} bytes")

    def receive(self, msg: Message) -> list[Message]:
        if self.done:
            raise RemoteProtocolError(f"unexpected {msg.TYPE} after the handshake")
        if self.initiator:
            if not self._started or not isinstance(msg, HelloReply):
                raise RemoteProtocolError(f"expected hello_reply, got {msg.TYPE}")
            self._check_peer(msg.node_id, msg.mesh_id, msg.nonce)
            want = proof(self._key, "responder", self.mesh_id, self.node_id, msg.node_id,
                         self._nonce, msg.nonce, self.lane, self.pair)
            if not hmac.compare_digest(want, msg.proof):
                raise RemoteProtocolError(f"peer {msg.node_id!r} failed authentication (wrong mesh key)")
            self.peer, self.peer_name, self.peer_port, self.done = msg.node_id, msg.name, msg.port, True
            self._peer_nonce = msg.nonce
            mine = proof(self._key, "initiator", self.mesh_id, self.node_id, msg.node_id,
                         self._nonce, msg.nonce, self.lane, self.pair)
            return [AuthProof(self.node_id, mine)]
        if self._peer_nonce is None:
            if not isinstance(msg, Hello):
                raise RemoteProtocolError(f"expected hello, got {msg.TYPE}")
            self._check_peer(msg.node_id, msg.mesh_id, msg.nonce)
            if msg.lane not in LANES:
                raise RemoteProtocolError(f"peer asked for lane {msg.lane!r}, not one of {LANES}")
            self._peer_nonce = msg.nonce
            self.peer, self.peer_name, self.peer_port = msg.node_id, msg.name, msg.port
            self.lane, self.pair = msg.lane, msg.pair
            mine = proof(self._key, "responder", self.mesh_id, msg.node_id, self.node_id,
                         msg.nonce, self._nonce, self.lane, self.pair)
            return [HelloReply(self.node_id, self.mesh_id, self._nonce, mine, self._name, self._port)]
        if not isinstance(msg, AuthProof) or msg.node_id != self.peer:
            raise RemoteProtocolError(f"expected auth_proof from {self.peer!r}, got {msg.TYPE}")
        assert self.peer is not None
        want = proof(self._key, "initiator", self.mesh_id, self.peer, self.node_id,
                     self._peer_nonce, self._nonce, self.lane, self.pair)
        if not hmac.compare_digest(want, msg.proof):
            raise RemoteProtocolError(f"peer {self.peer!r} failed authentication (wrong mesh key)")
        self.done = True
        return []
