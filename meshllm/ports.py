"""The ports between a node and the parts that read it or serve on it: pure typing, no behaviour.

``node.py`` builds one ``NodePorts`` (its ``Node.ports``) out of the parts it composes; the views
(``GET /v1/mesh``, ``GET /v1/profile``), the dashboard and the metrics collector read a node
through it, never through the ``Node`` class, so none of them imports ``node.py`` and ``node.py``
can import all of them. Each port is what one part of the house owns, as values fixed at
construction and callables read at the moment they are needed:

- ``Identity``: who the node is (id, name, model, mesh, codec, its address once bound);
- ``Plans``: the control plane's state (term, leader, members, plans by epoch), read only, and
  the data-plane gate;
- ``Peers``: links, the peers the dialer knows (address, fetched profile), link measurements, and
  GET-JSON to a peer;
- ``Profiles``: this node's measured profile and the model's per-block costs;
- ``Stages``: the stage host's loaded epochs, runners and memory budget (read side);
- ``Stats``: the node's frame and link counters;
- ``serving_view``: the serving layer's part of ``/v1/mesh``.

``ServingPorts`` is what the serving layer takes from the node (``serve.service.Serving``): the
ports above plus the two seams it plugs into (its frame handler for the data plane, and link
losses).

Imports below are for types only: nothing here runs at import time but the dataclass
definitions, so any shell (``obs/`` included) may import this module without pulling the rest of
the house in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshllm.control.node import ControlNode
    from meshllm.model.manifest import Manifest
    from meshllm.net.base import Transport
    from meshllm.net.dialer import PeerInfo
    from meshllm.planner.cost import ModelProfile
    from meshllm.wire.codec import Codec
    from meshllm.wire.messages import Message

PlaneHandler = Callable[[str, "Message"], None]  # (peer node id, decoded message)


class Stages(Protocol):
    """This node's loaded stages, read side (``serve.stages.StageHost`` has it)."""

    @property
    def budget_bytes(self) -> int: ...

    def epochs(self) -> list[int]: ...

    def runners(self, epoch: int) -> list[Any]: ...

    def ranges(self, epoch: int) -> list[tuple[int, int]]: ...

    def has_epoch(self, epoch: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    name: str
    manifest: Manifest
    mesh_id: str
    codec: Codec
    addr: Callable[[], str]  # "host:port" peers reach this node at (the port is bound at start)
    mesh_keyed: bool  # False: the default mesh key, anyone on the network may join
    api_key_required: bool


@dataclass(frozen=True, slots=True)
class Plans:
    control: Callable[[], ControlNode | None]  # read only (never step it); None before start
    accepts_epoch: Callable[[int], bool]  # the data-plane gate: loaded here, or active or draining
    observe_request: Callable[[int, int], None]  # a finished request's (input, output) lengths


@dataclass(frozen=True, slots=True)
class Peers:
    transport: Callable[[], Transport | None]  # None before start
    known: Callable[[], Mapping[str, PeerInfo]]  # node id -> address and fetched /v1/profile
    link_stats: Callable[[], Mapping[str, Mapping[str, float]]]  # node id -> {mbps, rtt_ms} measured here
    linked_addresses: Callable[[], dict[str, str]]  # linked node id -> "host:port" (what peers exchange)
    fetch_json: Callable[[str, int, str], Awaitable[dict[str, Any] | None]]  # (host, port, path)


@dataclass(frozen=True, slots=True)
class Profiles:
    own: Callable[[], dict[str, Any] | None]  # this node's measured profile (None until measured)
    progress: Callable[[], str]  # "not started", "3/26 blocks", "done", "failed: ..."
    model: ModelProfile  # the planner's per-block costs of the model


@dataclass(frozen=True, slots=True)
class Stats:
    bad_frames: int = 0  # frames from peers that failed to decode or validate
    handler_errors: int = 0  # bugs of ours: a plane handler or a hook raised
    rejected_plans: int = 0
    links_dropped: int = 0


@dataclass(frozen=True, slots=True)
class NodePorts:
    identity: Identity
    plans: Plans
    peers: Peers
    profiles: Profiles
    stages: Stages
    stats: Callable[[], Stats]
    serving_view: Callable[[], dict[str, Any] | None]  # None: no serving layer on this node


@dataclass(frozen=True, slots=True)
class ServingPorts:
    identity: Identity
    plans: Plans
    peers: Peers
    register_plane: Callable[[str, PlaneHandler], None]  # ("data", handler)
    on_link_down: Callable[[Callable[[str], None]], None]  # subscribe: a peer's link or liveness is lost
