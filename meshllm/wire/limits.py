"""Sizes every layer agrees on: the one message-size cap and the data-chunk size derived from it.

``MAX_MESSAGE_BYTES`` is the largest frame the codec encodes or decodes and the largest message a
link (WebSocket or in-memory) accepts; a bigger frame is a broken or hostile peer and closes the
link. Senders never come near it: bulk data (KV, a long prompt's activations) is cut into frames
of at most ``DATA_CHUNK_BYTES``.

Why 1 MiB chunks: a chunk is the unit of head-of-line blocking on a link's data lane (a decode
step's frame queued behind KV waits for at most the chunk being written, 170 ms at 50 Mbit/s,
8 ms at 1 Gbit/s), the unit of overlap between a stage computing a layer and the next stage
receiving it, and per-frame costs (header, a Python call, a WebSocket frame) are under 1% of a
1 MiB copy. It is 1/16 of the cap, so headers and alignment never push a chunk over it.
Control frames do not wait behind chunks at all: they travel on their own lane (see
``docs/serving.md``, "Links").
"""

from __future__ import annotations

from meshllm.errors import LocalProtocolError

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DATA_CHUNK_BYTES = 1024 * 1024
# Room left in a chunk for the msgpack header (type, ids, offsets, tensor descriptors) and the
# alignment padding before each tensor buffer.
HEADER_HEADROOM = 4096


def chunk_tokens(bytes_per_token: int, cap: int = DATA_CHUNK_BYTES) -> int:
    """How many token positions of KV (or activations) fit in one data frame of at most ``cap``
    bytes, header included. ``bytes_per_token`` counts every tensor of the frame (K and V).
    At least 1: a token wider than a chunk goes alone, as long as it fits under the cap."""
    if isinstance(bytes_per_token, bool) or not isinstance(bytes_per_token, int) or bytes_per_token <= 0:
        raise LocalProtocolError(f"bytes per token must be a positive int, got {bytes_per_token!r}")
    if bytes_per_token + HEADER_HEADROOM > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"one token of {bytes_per_token} bytes does not fit a "
                                 f"{MAX_MESSAGE_BYTES}-byte message")
    return max(1, (min(cap, MAX_MESSAGE_BYTES) - HEADER_HEADROOM) // bytes_per_token)
