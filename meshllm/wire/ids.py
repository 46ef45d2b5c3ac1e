"""Identifier types shared by the wire and the control plane.

``NewType`` keeps them plain ``str``/``int`` on the wire and at runtime while letting the type
checker tell a node id from a request id.
"""

from __future__ import annotations

from typing import NewType

NodeId = NewType("NodeId", str)
RequestId = NewType("RequestId", str)
Term = NewType("Term", int)
Epoch = NewType("Epoch", int)
