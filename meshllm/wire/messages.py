"""Every message the mesh exchanges, control plane and data plane, as frozen slotted dataclasses.

Each class has a ``TYPE`` tag (the ``t`` of the envelope, see ``codec``) and a ``PLANE``
("control" or "data"). Fields use only wire-native types: ``int``, ``float``, ``bool``, ``str``,
``bytes``, ``None`` unions, ``tuple[...]`` (a msgpack array), ``dict[str, Any]`` (an opaque map
the receiver validates: plans, profiles, sampling parameters) and ``Tensor``.

Leadership is named by a *ballot*: the pair ``(term, leader)``. See ``docs/control.md`` for why.
Epochs name plans; every data-plane message carries the epoch it was routed under.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from meshllm.errors import LocalProtocolError
from meshllm.wire.ids import NodeId, RequestId
from meshllm.wire.tensor import Tensor

# 2: tensors travel as raw buffers after the msgpack header (zero-copy); links have two lanes.
PROTOCOL_VERSION = 2


class Message:
    """Base of every wire message (the dataclasses below)."""

    __slots__ = ()
    TYPE: ClassVar[str]
    PLANE: ClassVar[str]


MESSAGE_TYPES: dict[str, type[Message]] = {}


def _register(tag: str, plane: str):
    def deco(cls):
        if tag in MESSAGE_TYPES:
            raise LocalProtocolError(f"message type {tag!r} registered twice")
        cls.TYPE = tag
        cls.PLANE = plane
        MESSAGE_TYPES[tag] = cls
        return cls

    return deco


def control(tag: str):
    return _register(tag, "control")


def data(tag: str):
    return _register(tag, "data")


# --- authentication (see wire/auth.py for the handshake) -----------------------------------------


@control("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Initiator -> responder: who I am, which mesh, and a fresh challenge nonce. ``lane`` says
    which connection of a link this is ("control" or "data"); a data connection names in ``pair``
    the nonce of the control connection it belongs to. Both are covered by the proofs."""

    node_id: NodeId
    mesh_id: str
    nonce: bytes
    name: str = ""
    port: int = 0
    lane: str = "control"
    pair: bytes = b""


@control("hello_reply")
@dataclass(frozen=True, slots=True)
class HelloReply(Message):
    """Responder -> initiator: its own nonce and its proof of the mesh key over both nonces."""

    node_id: NodeId
    mesh_id: str
    nonce: bytes
    proof: bytes
    name: str = ""
    port: int = 0


@control("auth_proof")
@dataclass(frozen=True, slots=True)
class AuthProof(Message):
    """Initiator -> responder: its proof of the mesh key over both nonces."""

    node_id: NodeId
    proof: bytes


# --- membership and election ---------------------------------------------------------------------


@control("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Sent to every peer each heartbeat interval; also gossips the sender's ballot and epoch."""

    node_id: NodeId
    term: int
    leader: NodeId | None
    priority: int
    seq: int
    epoch: int = 0  # the sender's active plan epoch (0: none)
    name: str = ""


@control("request_vote")
@dataclass(frozen=True, slots=True)
class RequestVote(Message):
    term: int
    candidate: NodeId
    priority: int


@control("vote")
@dataclass(frozen=True, slots=True)
class Vote(Message):
    term: int
    candidate: NodeId
    voter: NodeId
    granted: bool
    reason: str = ""


@control("leader_announce")
@dataclass(frozen=True, slots=True)
class LeaderAnnounce(Message):
    term: int
    leader: NodeId


@control("leave")
@dataclass(frozen=True, slots=True)
class Leave(Message):
    """A graceful goodbye: drop me now rather than waiting for me to be declared dead."""

    node_id: NodeId


# --- profiles and plans -----------------------------------------------------------------------


@control("profile_request")
@dataclass(frozen=True, slots=True)
class ProfileRequest(Message):
    term: int
    leader: NodeId
    round: int


@control("profile")
@dataclass(frozen=True, slots=True)
class Profile(Message):
    node_id: NodeId
    term: int
    round: int
    profile: dict[str, Any]


@control("plan_propose")
@dataclass(frozen=True, slots=True)
class PlanPropose(Message):
    """The leader's plan for ``epoch``; ``plan`` is ``Plan.to_dict()`` of the planner."""

    term: int
    leader: NodeId
    epoch: int
    plan: dict[str, Any]


@control("plan_ack")
@dataclass(frozen=True, slots=True)
class PlanAck(Message):
    """A node has loaded its blocks for ``epoch`` (ok) or cannot (error says why)."""

    term: int
    epoch: int
    node_id: NodeId
    ok: bool
    error: str = ""


@control("plan_activate")
@dataclass(frozen=True, slots=True)
class PlanActivate(Message):
    term: int
    leader: NodeId
    epoch: int


@control("plan_abort")
@dataclass(frozen=True, slots=True)
class PlanAbort(Message):
    term: int
    leader: NodeId
    epoch: int
    reason: str = ""


@control("island_work")
@dataclass(frozen=True, slots=True)
class IslandWork(Message):
    """Evolve ``individuals`` for ``generations`` with ``seed``; ``problem`` is the planner's input."""

    term: int
    leader: NodeId
    round: int
    island: int
    individuals: tuple[tuple[int, ...], ...]
    generations: int
    seed: int
    problem: dict[str, Any]


@control("island_result")
@dataclass(frozen=True, slots=True)
class IslandResult(Message):
    term: int
    round: int
    island: int
    node_id: NodeId
    individuals: tuple[tuple[int, ...], ...]
    fitness: tuple[float, ...]


@control("replan_request")
@dataclass(frozen=True, slots=True)
class ReplanRequest(Message):
    node_id: NodeId
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


# --- data plane ------------------------------------------------------------------------------------


@data("prefill")
@dataclass(frozen=True, slots=True)
class Prefill(Message):
    """Entry -> a prefill replica's first stage. ``decoder`` names the decoder replica."""

    req: RequestId
    epoch: int
    token_ids: tuple[int, ...]
    sampling: dict[str, Any]
    decoder: str
    entry: NodeId | None = None  # where tokens stream back to
    max_tokens: int = 0


@data("activations")
@dataclass(frozen=True, slots=True)
class Activations(Message):
    """Hidden states between the stages of a replica. hidden: (T, H); positions: T ids."""

    req: RequestId
    epoch: int
    hidden: Tensor
    positions: tuple[int, ...]
    decode: bool = False
    first_block: int = -1  # the first block the receiver must run (-1: unchecked); a stage holding
    # another range under this epoch refuses, which catches a sender routing by a stale plan


@data("decode_batch")
@dataclass(frozen=True, slots=True)
class DecodeBatch(Message):
    """One decode step of a micro-batch between the stages of a decoder replica: one new token per
    request. hidden: (B, H); reqs and positions: B entries."""

    epoch: int
    micro: int
    reqs: tuple[RequestId, ...]
    positions: tuple[int, ...]
    hidden: Tensor
    first_block: int = -1


@data("token_batch")
@dataclass(frozen=True, slots=True)
class TokenBatch(Message):
    """The last stage of a decoder ring back to its first: the tokens sampled for a micro-batch."""

    epoch: int
    micro: int
    reqs: tuple[RequestId, ...]
    tokens: tuple[int, ...]


@data("kv_chunk")
@dataclass(frozen=True, slots=True)
class KVChunk(Message):
    """KV of one block for tokens [offset, offset + len); k, v: (len, kv_heads, head_dim)."""

    req: RequestId
    epoch: int
    block: int
    k: Tensor
    v: Tensor
    offset: int
    last: bool = False


@data("decode_start")
@dataclass(frozen=True, slots=True)
class DecodeStart(Message):
    req: RequestId
    first_token: int
    epoch: int = 0
    prompt_len: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    entry: NodeId | None = None
    max_tokens: int = 0


@data("token")
@dataclass(frozen=True, slots=True)
class Token(Message):
    req: RequestId
    token: int
    index: int = 0
    finished: bool = False
    reason: str = ""  # "stop", "length", ... when finished


@data("free")
@dataclass(frozen=True, slots=True)
class Free(Message):
    req: RequestId


@data("load_report")
@dataclass(frozen=True, slots=True)
class LoadReport(Message):
    """A replica's load for the routers of entry nodes (queue length, active sequences, free KV...)."""

    node_id: NodeId
    epoch: int
    replica: int
    load: dict[str, Any]


@data("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    req: RequestId
    message: str
    code: str = ""


__all__ = ["MESSAGE_TYPES", "PROTOCOL_VERSION", "Message"] + [c.__name__ for c in MESSAGE_TYPES.values()]
