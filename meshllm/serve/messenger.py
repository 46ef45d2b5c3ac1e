"""Sending data-plane messages: over a peer link, or to this node itself without a hop.

Small frames that steer a request (admission, tokens, frees, errors, ring tokens) go on the link's
control lane: they never wait behind bulk data. Activations and KV go on the data lane, whose
bounded queue makes a sender wait when the link cannot keep up (backpressure). A message to
this node is handed to the local handler on the next loop iteration, not encoded: a one-node mesh
or a replica whose next stage is on the same node runs the same code with no network hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from meshllm.errors import LocalProtocolError
from meshllm.wire.codec import Codec
from meshllm.wire.messages import Message

log = logging.getLogger("meshllm.serve")

Handler = Callable[[str, Message], None]


class Messenger:
    def __init__(self, node_id: str, codec: Codec, transport: Callable[[], Any], local: Handler) -> None:
        self.node_id = node_id
        self.codec = codec
        self._transport = transport  # the node's transport (set once the node has started)
        self._local = local
        self.sent_frames = 0
        self.sent_bytes = 0
        self.undeliverable = 0

    def _encode(self, msg: Message) -> bytes | None:
        try:
            data = self.codec.encode(msg)
        except LocalProtocolError as e:
            log.error("cannot send %s: %s", msg.TYPE, e)
            return None
        self.sent_frames += 1
        self.sent_bytes += len(data)
        return data

    def send(self, to: str, msg: Message) -> bool:
        """Control lane: never blocks. False when there is no link to ``to``."""
        if to == self.node_id:
            asyncio.get_running_loop().call_soon(self._local, to, msg)
            return True
        data = self._encode(msg)
        t = self._transport()
        ok = data is not None and t is not None and bool(t.send(to, data))
        if not ok:
            self.undeliverable += 1
        return ok

    async def send_data(self, to: str, msg: Message) -> bool:
        """Data lane: waits while the link's data queue is full. False when there is no link."""
        if to == self.node_id:
            asyncio.get_running_loop().call_soon(self._local, to, msg)
            return True
        data = self._encode(msg)
        t = self._transport()
        if data is None or t is None:
            self.undeliverable += 1
            return False
        ok = bool(await t.send_data(to, data))
        if not ok:
            self.undeliverable += 1
        return ok
