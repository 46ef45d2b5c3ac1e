"""Wire: message types, msgpack codec, auth. Pure (no I/O, no clock, no global randomness).

- ``messages``: every control- and data-plane message (frozen slotted dataclasses, ``TYPE`` tags).
- ``codec``: ``Codec(max_message_bytes=...)`` with ``encode(msg) -> bytes`` / ``decode(bytes) -> msg``
  (tensors as raw buffers after a msgpack header, decoded as views of the frame);
  ``RemoteProtocolError`` for anything a peer got wrong.
- ``tensor``: ``Tensor`` (``from_array`` / ``array``) with a dtype allow-list.
- ``limits``: ``MAX_MESSAGE_BYTES`` (the one cap), ``DATA_CHUNK_BYTES`` and ``chunk_tokens``.
- ``auth``: ``mesh_id(model_id, key)`` and the ``Handshake`` state machine.
"""

from meshllm.wire.auth import Handshake, mesh_id
from meshllm.wire.codec import DEFAULT_MAX_MESSAGE_BYTES, EXT, Codec, ExtRegistry, decode, encode
from meshllm.wire.ids import Epoch, NodeId, RequestId, Term
from meshllm.wire.limits import DATA_CHUNK_BYTES, MAX_MESSAGE_BYTES, chunk_tokens
from meshllm.wire.messages import *  # noqa: F403
from meshllm.wire.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message
from meshllm.wire.tensor import DTYPES, Tensor

__all__ = [
    "DATA_CHUNK_BYTES", "DEFAULT_MAX_MESSAGE_BYTES", "DTYPES", "EXT", "MAX_MESSAGE_BYTES", "MESSAGE_TYPES",
    "PROTOCOL_VERSION", "Codec", "Epoch", "ExtRegistry", "Handshake", "Message", "NodeId", "RequestId",
    "Tensor", "Term", "chunk_tokens", "decode", "encode", "mesh_id",
]
