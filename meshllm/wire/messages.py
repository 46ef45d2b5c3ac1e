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
# 3: every data-plane frame about a request names its attempt; decode steps are numbered; Progress.
# 4: the prompt goes out beside the reservation (decoder stages keep KV that comes first);
#    Progress carries how long the prompt waited at the prefill replica's first stage.
# 5: a reservation says how many prompt tokens may be queued ahead (Reserve.max_ahead) and a stage
#    may hand the prompt back (Reserved code "busy", with ahead); a split BOTH replica's later
#    stages keep the prompt's activations that come before its reservation.
PROTOCOL_VERSION = 5


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
    attention: str = ""  # the attention kind of the sender's active plan ("": none), so a leader keeps it


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
# The serving protocol (docs/serving.md has the sequence diagram). Every message names the plan
# epoch it was routed under; replicas and stages are named by their index in that epoch's plan, so
# a receiver checks them against the plan it loaded. ``first_block`` names the block range the
# receiver must run: a node holding another range under that epoch refuses the frame. Every frame
# about a request names its ``attempt`` (0, then 1, 2, ... each time the entry resumes it on
# another replica): a frame of an attempt other than the one a node holds is dropped and counted,
# so nothing of a failed attempt can land on the next one.


@data("reserve")
@dataclass(frozen=True, slots=True)
class Reserve(Message):
    """Admission, entry -> a decoder replica's stage 0 -> stage 1 -> ... -> last stage -> entry
    (``Reserved``): each stage reserves KV room for ``tokens`` positions, or the chain stops and the
    refusing stage answers the entry. Carries what the decoder's stages need later (the head samples)."""

    req: RequestId
    epoch: int
    replica: int
    stage: int  # the receiving stage's index in the replica
    tokens: int  # prompt + max_tokens positions to reserve
    prompt_len: int
    entry: NodeId
    sampling: dict[str, Any]  # SamplingParams.to_dict()
    seed: int
    micro: int = -1  # the decode micro-batch the request will join (chosen by stage 0)
    # a resumed request: the tokens already streamed to its client. The decoder feeds them through
    # its steps instead of sampling (the head sends none of them), so the request recomputes
    # exactly what it computed before and samples the next token as the lost replica would have.
    replay: tuple[int, ...] = ()
    attempt: int = 0
    # the prompt's token ids, for stage 0's draft proposals (speculative decoding); only the entry's
    # frame to stage 0 carries them
    prompt: tuple[int, ...] = ()
    # a replica that prefills its own requests: stage 0 answers "busy" (with the tokens ahead)
    # rather than queue the prompt behind more than this many prompt tokens; -1: no limit
    max_ahead: int = -1


@data("reserved")
@dataclass(frozen=True, slots=True)
class Reserved(Message):
    """Last decoder stage (ok) or a refusing stage (not ok) -> entry."""

    req: RequestId
    epoch: int
    replica: int
    ok: bool
    error: str = ""
    code: str = ""  # "capacity" (try another decoder or wait), "too_large" (never fits), "busy", "bad_request", ...
    attempt: int = 0
    ahead: int = -1  # "busy": the prompt tokens queued ahead at stage 0


@data("prefill")
@dataclass(frozen=True, slots=True)
class PrefillChunk(Message):
    """The prompt through a prefill replica: entry -> stage 0 (``ids``, the whole prompt), then one
    frame per chunk from stage s to s + 1 (``hidden`` for positions [offset, offset + len))."""

    req: RequestId
    epoch: int
    replica: int
    first_block: int
    offset: int
    last: bool  # the final chunk of the prompt
    prompt_len: int
    decoder: int  # the decoder replica the KV goes to (== replica: stay here, no hand-off)
    entry: NodeId
    sampling: dict[str, Any]
    seed: int
    ids: Tensor | None = None  # (T,) int64 token ids (to stage 0)
    hidden: Tensor | None = None  # (T, H) hidden states (between stages)
    forced: int = -1  # a resumed request's token 0: the head takes it instead of sampling
    attempt: int = 0
    # the head reports the prompt's own logprobs (completions' echo + logprobs); the frames then
    # carry the whole prompt's ids to every stage, since the head's targets are the next tokens
    prompt_logprobs: bool = False


@data("kv")
@dataclass(frozen=True, slots=True)
class KVChunk(Message):
    """KV of one layer for positions [offset, offset + len): prefill stage -> the decoder stage that
    owns the layer. k, v: (len, kv_heads, head_dim). ``end`` is the prompt length: the layer is
    complete once ``offset + len == end``."""

    req: RequestId
    epoch: int
    replica: int  # the decoder replica
    block: int
    offset: int
    end: int
    k: Tensor
    v: Tensor
    attempt: int = 0


@data("kv_ready")
@dataclass(frozen=True, slots=True)
class KVReady(Message):
    """A decoder stage -> its replica's stage 0: every layer of mine holds the prompt's KV."""

    req: RequestId
    epoch: int
    replica: int
    stage: int
    attempt: int = 0


@data("decode_start")
@dataclass(frozen=True, slots=True)
class DecodeStart(Message):
    """The prefill replica's head -> the decoder's stage 0: the token sampled at the end of the
    prompt (index ``index``); the request joins decoding once every stage holds its KV."""

    req: RequestId
    epoch: int
    replica: int
    token: int
    index: int
    attempt: int = 0


@data("decode_batch")
@dataclass(frozen=True, slots=True)
class DecodeBatch(Message):
    """One decode step of a micro-batch from stage s to s + 1 of a decoder replica: reqs[i] (of
    attempt attempts[i]) feeds the token of index indexes[i]; hidden: (B, H). ``step`` numbers the
    micro-batch's steps at stage 0, so an answer to a step given up on is recognised and dropped.
    Small and latency-critical: it rides the control lane, never behind KV."""

    epoch: int
    replica: int
    micro: int
    first_block: int
    reqs: tuple[RequestId, ...]
    indexes: tuple[int, ...]
    hidden: Tensor
    attempts: tuple[int, ...] = ()
    step: int = 0
    tokens: tuple[int, ...] = ()  # the token ids stage 0 fed (the head's history, for penalties)
    # speculation: the draft tokens row i feeds after tokens[i] (positions indexes[i] + 1, ...);
    # ``hidden`` then holds sum(1 + len(drafts[i])) rows, row i's positions in order
    drafts: tuple[tuple[int, ...], ...] = ()


@data("token_batch")
@dataclass(frozen=True, slots=True)
class TokenBatch(Message):
    """The head of a decoder ring -> its stage 0: the tokens sampled for a micro-batch (index
    indexes[i] + 1) and which requests ended with them."""

    epoch: int
    replica: int
    micro: int
    reqs: tuple[RequestId, ...]
    tokens: tuple[int, ...]
    done: tuple[bool, ...]
    step: int = 0
    # speculation: how many of row i's drafts the head kept; the row's new tokens are those drafts
    # followed by tokens[i]
    accepted: tuple[int, ...] = ()


@data("token")
@dataclass(frozen=True, slots=True)
class Token(Message):
    """A sampled token -> the request's entry. ``index`` counts generated tokens from 0."""

    req: RequestId
    token: int
    index: int
    finished: bool = False
    reason: str = ""  # "stop" (EOS) or "length" when finished
    attempt: int = 0
    # when the request asked for logprobs: the token's, and the likeliest n tokens' (ids, logprobs)
    logprob: float | None = None
    top_ids: tuple[int, ...] = ()
    top_lps: tuple[float, ...] = ()
    # with token 0 of a request that asked for its prompt's logprobs: one per prompt token after
    # the first, each with the likeliest n (flattened, n per row)
    prompt_lps: tuple[float, ...] = ()
    prompt_top_ids: tuple[int, ...] = ()
    prompt_top_lps: tuple[float, ...] = ()


@data("progress")
@dataclass(frozen=True, slots=True)
class Progress(Message):
    """A prefill stage -> the request's entry: ``done`` of the prompt's ``of`` tokens went through
    stage ``stage``. A long prompt on a slow device is slow, not dead: the entry judges a stall by
    the time since the last sign of progress, not since the prompt was sent. ``queued_s``: at the
    first stage, how long the prompt waited there before its first chunk began (the rest of the
    request's waiting time, after the entry's own)."""

    req: RequestId
    attempt: int
    stage: int
    done: int
    of: int
    queued_s: float = 0.0


@data("free")
@dataclass(frozen=True, slots=True)
class Free(Message):
    """Release everything held for a request's attempts up to ``attempt`` (KV, queue places);
    idempotent, unknown ids are fine. The receiver keeps a short tombstone, so a frame of those
    attempts that arrives later (the control lane overtakes the data lane) allocates nothing."""

    req: RequestId
    epoch: int = 0
    reason: str = ""
    attempt: int = 0


@data("load_report")
@dataclass(frozen=True, slots=True)
class LoadReport(Message):
    """A replica's stage 0 -> every node: its load, for the entries' routers."""

    node_id: NodeId
    epoch: int
    replica: int
    load: dict[str, Any]


@data("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A stage that cannot go on with a request -> its entry (and the entry frees it everywhere)."""

    req: RequestId
    message: str
    code: str = ""
    attempt: int = 0


__all__ = ["MESSAGE_TYPES", "PROTOCOL_VERSION", "Message"] + [c.__name__ for c in MESSAGE_TYPES.values()]
