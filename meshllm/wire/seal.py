"""Sealed link frames: AES-256-GCM with per-direction keys and counter nonces, sans-IO.

After a lane's handshake (``meshllm.wire.auth``) both ends derive two keys with HKDF-SHA256: the
input key material is the mesh key, the salt both handshake nonces, and the info names the
direction (initiator to responder, or back), the lane, the mesh and both node ids. Each key seals
one direction of one lane of one link, so a frame cannot be moved to another lane, another
direction or another link (or a later link of the same pair: its nonces differ).

A sealed frame is ``ciphertext || 16-byte tag`` of exactly one plaintext frame. The AEAD nonce is a
64-bit counter, 0 for the first frame of a direction and one more for each frame after it; it is
never sent, because both ends count: a lane is a reliable, ordered stream, so a replayed, dropped,
reordered, truncated or altered frame fails the tag check at the receiver (``open`` raises
``RemoteProtocolError``) and the shell closes the link. Nothing of a frame that fails reaches
the decoder.

An open mesh (no ``--mesh-key-file``: the key is public) does not seal: a key everyone knows
hides nothing from an eavesdropper, so its frames go in the clear, and the node says so.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshllm.errors import LocalProtocolError, RemoteProtocolError

TAG_BYTES = 16  # what sealing adds to a frame
KEY_BYTES = 32
_DOMAIN = b"meshllm-seal-v1"
_MAX_COUNTER = (1 << 64) - 1
_NONCE_PREFIX = bytes(4)  # 96-bit GCM nonce: 4 zero bytes then the 64-bit big-endian counter


def _field(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def derive_keys(key: bytes, *, mesh: str, initiator: str, responder: str, nonce_i: bytes, nonce_r: bytes,
                lane: str) -> tuple[bytes, bytes]:
    """``(initiator→responder key, responder→initiator key)`` for one lane of one link."""
    out = []
    for direction in (b"i2r", b"r2i"):
        info = b"".join(_field(x) for x in (_DOMAIN, direction, lane.encode(), mesh.encode(),
                                              initiator.encode(), responder.encode()))
        out.append(HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=_field(nonce_i) + _field(nonce_r),
                        info=info).derive(key))
    return out[0], out[1]


def _nonce(counter: int) -> bytes:
    if counter > _MAX_COUNTER:  # 2**64 frames: never in practice, but never reuse a nonce
        raise LocalProtocolError("a link sealed 2**64 frames; it must be re-established")
    return _NONCE_PREFIX + counter.to_bytes(8, "big")


class Sealer:
    """Seals the frames of one direction of one lane, in order."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.counter = 0

    def seal(self, frame: bytes | bytearray | memoryview) -> bytes:
        out = self._aead.encrypt(_nonce(self.counter), frame, None)
        self.counter += 1
        return out


class Opener:
    """Opens the frames of one direction of one lane, in the order they were sealed. After a
    frame fails, every later one fails too (the link must close)."""

    __slots__ = ("_aead", "counter", "failed")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.counter = 0
        self.failed = False

    def open(self, sealed: bytes | bytearray | memoryview) -> bytes:
        if self.failed:
            raise RemoteProtocolError("sealed lane already failed")
        if len(sealed) < TAG_BYTES:
            self.failed = True
            raise RemoteProtocolError(f"sealed frame {self.counter} of {len(sealed)} bytes is shorter "
                                      f"than its tag")
        try:
            out = self._aead.decrypt(_nonce(self.counter), sealed, None)
        except InvalidTag:
            self.failed = True
            raise RemoteProtocolError(f"sealed frame {self.counter} failed authentication "
                                      f"(altered, truncated, replayed, reordered or dropped)") from None
        self.counter += 1
        return out


def pair(key_out: bytes, key_in: bytes) -> tuple[Sealer, Opener]:
    return Sealer(key_out), Opener(key_in)
