"""The stage's serving core, sans-IO: what a node does with the requests that pass through its blocks.

``StageCore`` takes frames (``step``), lost links, unloaded epochs and time (``tick``) and returns
outputs (frames to send, on which lane; requests that begin or end holding something here). It
never touches a socket, a clock or a runner: a runner is an opaque handle it got from its port,
and every call into one is an op of an ``Iteration`` that ``schedule()`` returns. The shell runs
the iteration's ops in order on the inference thread and hands the results to
``update_from_output`` (vLLM v1's ``schedule()`` / ``update_from_output()``). One iteration runs at
a time per node; frames that arrive meanwhile wait in the core.

**The scheduler.** Each iteration runs, in this order:

1. every pending metadata op — frees, allocations (admission), KV imports — in arrival order;
2. every decode step that is ready: each idle micro-batch of each decode ring this node is stage
   0 of, and each ``DecodeBatch`` that reached a later stage; one row each of the token budget;
3. prefill chunks, one per request in round-robin order, while the token budget
   (``ServeConfig.step_token_budget``) lasts — and always at least one, so prefill is never starved.

So a long answer never holds a new prompt back (its chunks run between decode steps) and a long
prompt never stalls the streams (a step waits for at most one iteration's chunks): chunked
prefill interleaved with decoding, as Sarathi-Serve and vLLM do. Chunks keep the fixed boundaries
of ``prefill_chunk``, so a mesh does the arithmetic of one process.

**Per request and stage** a ``Hold`` records a KV sequence in the stage's runner: a decoder stage
reserves ``prompt + max_tokens`` positions on ``Reserve``, imports the prompt's KV layer by layer
(``KVChunk``) and tells its replica's stage 0 when its layers are complete (``KVReady``); a
prefill-only stage holds the prompt while it computes it. A decoder replica's stage 0 runs the
**ring**: requests whose first token came (``DecodeStart``) and whose KV is complete everywhere join
a micro-batch; each micro-batch steps stage 0 -> ... -> head (``DecodeBatch``, numbered), the head
samples every row and answers ``TokenBatch``. A step that gets no answer within
``step_timeout_s`` fails its rows instead of stalling the micro-batch.

**Attempts and tombstones.** Every frame names (request, attempt). A frame of an attempt other
than the one held is dropped and counted; ``Free`` leaves a bounded, expiring tombstone, so a
``Reserve`` or a prefill chunk that arrives after it (the control lane overtakes the data lane)
allocates nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from meshllm.errors import ContextLengthError, MeshError, PlanError
from meshllm.runtime.sampling import SamplingParams, logprobs_of, prompt_logprobs, sample_one, token_rng
from meshllm.serve.config import ServeConfig
from meshllm.serve.request import finish_reason
from meshllm.serve.routes import Routes, StageRef, layer_blocks
from meshllm.serve.spec import DraftLength, PromptLookup, StepCost, expected_kept
from meshllm.wire.ids import NodeId, RequestId
from meshllm.wire.limits import chunk_tokens
from meshllm.wire.messages import (
    DecodeBatch,
    DecodeStart,
    Error,
    Free,
    KVChunk,
    KVReady,
    LoadReport,
    Message,
    PrefillChunk,
    Progress,
    Reserve,
    Reserved,
    Token,
    TokenBatch,
)
from meshllm.wire.tensor import Tensor

log = logging.getLogger("meshllm.serve.stage")

Key = tuple[str, int, int]  # (request, replica, stage index)
INF = float("inf")
TOMBSTONES = 4096  # at most this many freed requests remembered


# --- outputs -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message
    lane: str = "control"  # "data": bulk (KV, a prompt's activations), bounded and awaited
    held: bool = False  # the shell held it already (the lab's per-hop delay)


@dataclass(frozen=True, slots=True)
class Begin:
    """This node holds something of ``req`` under ``epoch`` now (drives epoch draining)."""

    epoch: int
    req: str


@dataclass(frozen=True, slots=True)
class End:
    epoch: int
    req: str


Output = Send | Begin | End


# --- the ops of an iteration (run on the inference thread, in order) ------------------------------

@dataclass(slots=True)
class AllocOp:
    hold: Hold
    tokens: int
    group: int | None


@dataclass(slots=True)
class FreeOp:
    runner: Any
    seq: str


@dataclass(slots=True)
class ImportOp:
    hold: Hold
    block: int
    k: np.ndarray
    v: np.ndarray
    start: int
    end: int  # the prompt's length


@dataclass(slots=True)
class PrefillOp:
    hold: Hold
    chunk: Chunk
    export: list[int]  # the layer blocks whose KV goes to a decoder replica
    kv_dtype: Any
    all_rows: bool = False  # the head returns every row's logits (the prompt's logprobs), not the last


@dataclass(slots=True)
class DecodeOp:
    runner: Any
    seqs: list[str]
    x: np.ndarray  # (B,) token ids at a replica's first stage, else (B, H) hidden states
    ring: Ring | None = None  # stage 0 of a ring: the micro-batch this step is for
    micro: int = -1
    step: int = 0
    batch: DecodeBatch | None = None  # a later stage: the frame this step continues
    ref: StageRef | None = None
    holds: list[Hold] = field(default_factory=list)
    # speculation: positions per row (1 + its drafts; x holds them row after row), and where each
    # row's first position goes (a row longer than that drops its rejected drafts' KV first)
    counts: list[int] | None = None
    starts: list[int] | None = None


Op = AllocOp | FreeOp | ImportOp | PrefillOp | DecodeOp


@dataclass(slots=True)
class Iteration:
    ops: list[Op]
    decode_rows: int = 0
    prefill_tokens: int = 0


@dataclass(slots=True)
class Result:
    """What one op gave: ``value`` (prefill: (out, kvs); decode: (out, ok rows, row errors)) or
    ``error`` (the message of what it raised) with ``kind`` ("capacity", "too_large", "error")."""

    value: Any = None
    error: str | None = None
    kind: str = ""


class Runners(Protocol):
    """What the core may ask about this node's loaded blocks (the stage host answers)."""

    def has_epoch(self, epoch: int) -> bool: ...
    def runner(self, epoch: int, first_block: int) -> Any: ...
    def capacity_tokens(self, runner: Any) -> int | None: ...
    def free_tokens(self, runner: Any) -> int | None: ...


# --- state ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Chunk:
    offset: int
    x: np.ndarray  # (n,) token ids at a replica's first stage, else (n, H)
    last: bool
    msg: PrefillChunk


@dataclass(slots=True)
class Hold:
    req: str
    attempt: int
    epoch: int
    replica: int
    stage: StageRef
    runner: Any
    entry: str
    decode: bool  # reserved for decoding (prompt + max_tokens), else a prefill-only stage
    prompt_len: int
    params: SamplingParams | None = None
    seed: int = 0
    decoder: int = -1  # the decoder replica a prefill-only stage sends KV to
    replay: tuple[int, ...] = ()  # a resumed request's tokens so far: fed, not sampled
    allocated: bool = False  # its AllocOp has gone into an iteration (and not failed)
    layers_done: set[int] = field(default_factory=set)
    ready_sent: bool = False
    deadline: float = INF  # the hand-off must make progress by then
    chunks: deque[Chunk] = field(default_factory=deque)  # prefill chunks waiting here
    prefilled: int = 0
    t_arrived: float = 0.0  # the prompt's start came (the start of its wait here)
    queued_s: float = 0.0  # how long it waited for its first chunk's iteration
    history: list[int] = field(default_factory=list)  # the head: tokens generated so far (penalties)
    prompt_lps: list[tuple[float, tuple[tuple[int, float], ...]]] = field(default_factory=list)


@dataclass(slots=True)
class Early:
    """Frames of a hand-off that reached a decoder stage before its reservation (the entry sent the
    prompt together with the reservation): taken in when the reservation lands, dropped at ``deadline``."""
    deadline: float
    kv: list[tuple[str, KVChunk]] = field(default_factory=list)
    start: DecodeStart | None = None  # the first token, at stage 0
    nbytes: int = 0
    # a split BOTH replica's prompt activations from the stage before (the entry sends the prompt
    # with the reservation, which goes on the control lane, the activations on the data lane)
    prefill: list[PrefillChunk] = field(default_factory=list)


@dataclass(slots=True)
class Member:
    req: str
    attempt: int
    micro: int
    entry: str
    ready: set[int] = field(default_factory=set)  # stages whose KV is complete
    token: int = -1  # the next token to feed (-1 until the prefill's head sent it)
    index: int = 0
    started: bool = False
    replay: tuple[int, ...] = ()
    max_tokens: int = 0
    prompt_len: int = 0  # tokens of the prompt the lookup holds
    lookup: PromptLookup | None = None  # speculation: the prompt and tokens so far, for drafts
    length: DraftLength | None = None
    drafts: tuple[int, ...] = ()  # the drafts of the step in flight
    guessed: bool = False  # they came from the lookup (not a resumed request's replay)
    matched: int = 0  # the length of the match the lookup's drafts continue


class Ring:
    """Stage 0 of a decoder replica: its members and micro-batches."""

    def __init__(self, epoch: int, replica: int, routes: Routes, max_batch: int) -> None:
        self.epoch = epoch
        self.replica = replica
        self.routes = routes
        self.stages = routes.stages(replica)
        self.nmicro = max(1, len(self.stages))
        self.max_batch = max_batch
        self.members: dict[str, Member] = {}
        self.micro: list[list[str]] = [[] for _ in range(self.nmicro)]  # started members per micro
        self.busy: list[int] = [0] * self.nmicro  # the step in flight (0: idle)
        self.deadline: list[float] = [INF] * self.nmicro
        self.inflight: list[list[str]] = [[] for _ in range(self.nmicro)]
        self.steps = 0
        self.sent: list[tuple[float, int]] = [(0.0, 0)] * self.nmicro  # when the step in flight left, its drafts
        self.cost = StepCost()  # speculation: what a step costs, by the drafts it carries

    def pick_micro(self) -> int:
        counts = [0] * self.nmicro
        for m in self.members.values():
            counts[m.micro] += 1
        return int(np.argmin(counts))

    def remove(self, req: str) -> None:
        m = self.members.pop(req, None)
        if m is not None and req in self.micro[m.micro]:
            self.micro[m.micro].remove(req)


_GREEDY_RNG = np.random.Generator(np.random.Philox(0))  # passed for greedy rows, never drawn from


def _stats() -> dict[str, Any]:
    return {"prefill_tokens": 0, "decode_steps": 0, "decode_rows": 0, "kv_in_bytes": 0, "kv_out_bytes": 0,
            "refused": 0, "busy": 0, "unreserved_kv": 0, "stale": 0, "stale_attempt": 0, "after_free": 0, "errors": 0,
            "iterations": 0, "step_timeouts": 0, "decode_compute_s": 0.0, "decode_calls": 0,
            # speculation at a ring's stage 0: steps whose row carried drafts, drafts sent, drafts kept
            "spec_rows": 0, "spec_drafted": 0, "spec_accepted": 0, "spec_truncated": 0,
            # hand-off frames that came before their reservation: kept, dropped for room, expired
            "early_kv": 0, "early_starts": 0, "early_prefill": 0, "early_dropped": 0, "early_expired": 0,
            "kv_dropped_bytes": 0}


class StageCore:
    def __init__(self, node_id: str, runners: Runners, routes_for: Callable[[int], Routes | None],
                 config: ServeConfig, *, num_layers: int, eos_ids: tuple[int, ...], hidden_size: int) -> None:
        self.node_id = node_id
        self.runners = runners
        self.routes_for = routes_for
        self.config = config
        self.num_layers = num_layers
        self.eos = frozenset(eos_ids)
        self.hidden_size = hidden_size
        self.holds: dict[Key, Hold] = {}
        self.rings: dict[tuple[int, int], Ring] = {}
        self.tombs: OrderedDict[str, tuple[int, float]] = OrderedDict()  # req -> (attempt, expires)
        self._meta: deque[Op] = deque()  # frees, allocations, imports, in arrival order
        self._fwd: deque[tuple[DecodeBatch, StageRef, Any]] = deque()  # decode steps at a later stage
        self._rr: deque[Key] = deque()  # holds with prefill chunks waiting, round-robin
        self._in_flight: dict[str, int] = {}  # req -> holds here (for Begin/End)
        self._reserve_msg: dict[Key, Reserve] = {}  # admission to pass on once the allocation is done
        self._early: dict[Key, Early] = {}  # hand-off frames waiting for their reservation
        self._early_bytes = 0
        self.running = False
        self.now = 0.0
        self.stats = _stats()
        self._out: list[Output] = []

    # --- entry points ----------------------------------------------------------------------------------
    def step(self, peer: str, msg: Message, now: float) -> list[Output]:
        self.now = now
        if isinstance(msg, Reserve):
            self._on_reserve(msg)
        elif isinstance(msg, PrefillChunk):
            self._on_prefill(msg)
        elif isinstance(msg, KVChunk):
            self._on_kv(peer, msg)
        elif isinstance(msg, KVReady):
            self._on_kv_ready(msg)
        elif isinstance(msg, DecodeStart):
            self._on_decode_start(msg)
        elif isinstance(msg, DecodeBatch):
            self._on_decode_batch(msg)
        elif isinstance(msg, TokenBatch):
            self._on_token_batch(msg)
        elif isinstance(msg, Free):
            self._free(msg.req, msg.attempt, now)
        return self._flush()

    def tick(self, now: float) -> list[Output]:
        self.now = now
        for key, h in list(self.holds.items()):
            if h.deadline <= now and self.holds.get(key) is h:
                log.warning("request %s: the prompt's KV stopped arriving for %.0f s; freeing its reservation",
                            h.req, self.config.handoff_timeout_s)
                self._fail(h.entry, h.req, h.attempt, "the KV hand-off did not complete in time", "handoff_timeout")
        for ring in list(self.rings.values()):
            for micro in range(ring.nmicro):
                if ring.busy[micro] and ring.deadline[micro] <= now:
                    self.stats["step_timeouts"] += 1
                    rows = [r for r in ring.inflight[micro] if r in ring.members]
                    log.warning("decode step %d of replica %d got no answer in %.0f s; failing its %d rows",
                                ring.busy[micro], ring.replica, self.config.step_timeout_s, len(rows))
                    ring.busy[micro] = 0
                    ring.deadline[micro] = INF
                    ring.inflight[micro] = []
                    for r in rows:
                        self._fail_member(ring, r, "a decode step got no answer from the ring", "stalled")
        for key, e in list(self._early.items()):
            if e.deadline <= now:
                self.stats["early_expired"] += 1
                log.warning("request %s: its hand-off reached stage %d of replica %d but no reservation did in "
                            "%.0f s; dropped", key[0], key[2], key[1], self.config.handoff_timeout_s)
                self._drop_early(key)
        while self.tombs:
            _, (_, exp) = next(iter(self.tombs.items()))
            if exp > now:
                break
            self.tombs.popitem(last=False)
        return self._flush()

    def next_deadline(self) -> float:
        d = min((h.deadline for h in self.holds.values()), default=INF)
        for ring in self.rings.values():
            d = min(d, *ring.deadline)
        if self.tombs:
            d = min(d, next(iter(self.tombs.values()))[1])
        return min(d, *(e.deadline for e in self._early.values())) if self._early else d

    def link_down(self, peer: str, now: float) -> list[Output]:
        """A link went down: whatever depends on ``peer`` cannot complete."""
        self.now = now
        for key, h in list(self.holds.items()):
            if self.holds.get(key) is not h:
                continue
            routes = self.routes_for(h.epoch)
            nodes: set[str] = set()
            if routes is not None:
                try:
                    nodes = routes.nodes(h.replica) | (routes.nodes(h.decoder) if h.decoder >= 0 else set())
                except PlanError:
                    nodes = set()
            if h.entry == peer:
                self._release_req(h.req, h.attempt)
            elif peer in nodes:
                self._fail(h.entry, h.req, h.attempt, f"node {peer[:12]} of its replica is gone", "node_lost")
        for ring in list(self.rings.values()):
            if peer in ring.routes.nodes(ring.replica):
                for r in list(ring.members):
                    self._fail_member(ring, r, f"node {peer[:12]} of the decoder replica is gone", "node_lost")
                ring.busy = [0] * ring.nmicro
                ring.deadline = [INF] * ring.nmicro
        return self._flush()

    def epoch_unloaded(self, epoch: int, now: float) -> list[Output]:
        self.now = now
        for key, h in list(self.holds.items()):
            if h.epoch == epoch and self.holds.get(key) is h:
                self._fail(h.entry, h.req, h.attempt, f"plan epoch {epoch} was unloaded before the request finished",
                           "epoch_unloaded")
        for k in [k for k in self.rings if k[0] == epoch]:
            del self.rings[k]
        return self._flush()

    def undeliverable(self, to: str, msg: Message, now: float) -> list[Output]:
        """A frame this core asked to send could not go out (no link to ``to``)."""
        self.now = now
        req = getattr(msg, "req", None)
        attempt = getattr(msg, "attempt", 0)
        if isinstance(msg, (Token, Error, Progress, Reserved)):
            if req is not None:
                self._release_req(req, attempt)  # the entry is gone: nobody wants the rest
        elif isinstance(msg, Reserve):
            h = self._any_hold(req, attempt)
            if h is not None:
                self._fail(h.entry, h.req, attempt, f"no link to decoder stage {msg.stage} ({to[:12]})", "unreachable",
                           reserved=(msg.epoch, msg.replica))
        elif isinstance(msg, DecodeBatch):
            ring = self.rings.get((msg.epoch, msg.replica))
            if ring is not None and 0 <= msg.micro < ring.nmicro and ring.busy[msg.micro] == msg.step:
                self._ring_clear(ring, msg.micro)
            for r, a in zip(msg.reqs, msg.attempts or (0,) * len(msg.reqs), strict=False):
                h = self._any_hold(r, a)
                if h is not None:
                    self._fail(h.entry, r, a, f"no link to the next decoder stage ({to[:12]})", "unreachable")
        elif isinstance(msg, TokenBatch):
            pass  # stage 0 is gone: the link's loss fails what depended on it
        elif isinstance(req, str):
            h = self._any_hold(req, attempt)
            if h is not None:
                self._fail(h.entry, req, attempt, f"no link to {to[:12]} for {msg.TYPE}", "unreachable")
        return self._flush()

    # --- the scheduler -----------------------------------------------------------------------------------
    def schedule(self, now: float) -> Iteration | None:
        """The next iteration's ops, or None (one is running, or there is nothing to do)."""
        self.now = now
        if self.running:
            return None
        ops: list[Op] = []
        while self._meta:
            ops.append(self._meta.popleft())
        rows = 0
        for ring in self.rings.values():
            for micro in range(ring.nmicro):
                dop = self._ring_op(ring, micro)
                if dop is not None:
                    ops.append(dop)
                    rows += sum(dop.counts) if dop.counts else len(dop.seqs)
        while self._fwd:
            m, ref, runner = self._fwd.popleft()
            dop = self._fwd_op(m, ref, runner)
            if dop is not None:
                ops.append(dop)
                rows += sum(dop.counts) if dop.counts else len(dop.seqs)
        budget = self.config.step_token_budget - rows
        prefill = 0
        for _ in range(len(self._rr)):
            if not self._rr:
                break
            key = self._rr[0]
            h = self.holds.get(key)
            if h is None or not h.chunks:
                self._rr.popleft()
                continue
            if not h.allocated:
                self._rr.rotate(-1)
                continue
            n = int(h.chunks[0].x.shape[0])
            if prefill and n > budget - prefill:
                break
            c = h.chunks.popleft()
            if c.offset == 0:
                h.queued_s = max(0.0, now - h.t_arrived)
            ops.append(self._prefill_op(h, c))
            prefill += n
            self._rr.popleft()
            if h.chunks:
                self._rr.append(key)
        if not ops:
            return None
        self.running = True
        self.stats["iterations"] += 1
        return Iteration(ops, rows, prefill)

    def update_from_output(self, it: Iteration, results: list[Result], now: float) -> list[Output]:
        self.now = now
        self.running = False
        for op, res in zip(it.ops, results, strict=True):
            try:
                if isinstance(op, AllocOp):
                    self._alloc_done(op, res)
                elif isinstance(op, ImportOp):
                    self._import_done(op, res)
                elif isinstance(op, PrefillOp):
                    self._prefill_done(op, res)
                elif isinstance(op, DecodeOp):
                    if op.ring is not None:
                        self._ring_done(op, res)
                    else:
                        self._fwd_done(op, res)
            except (MeshError, ValueError, TypeError, IndexError) as e:  # a bad result fails its request only
                self.stats["errors"] += 1
                log.exception("serving op %s failed: %s", type(op).__name__, e)
                for h in _op_holds(op):
                    self._fail(h.entry, h.req, h.attempt, f"stage error: {e}", "stage_error")
        return self._flush()

    def _ring_op(self, ring: Ring, micro: int) -> DecodeOp | None:
        if ring.busy[micro]:
            return None
        reqs = [r for r in ring.micro[micro] if r in ring.members]
        if not reqs:
            return None
        holds = [self.holds.get((r, ring.replica, 0)) for r in reqs]
        live = [(r, h) for r, h in zip(reqs, holds, strict=True) if h is not None]
        if not live:
            return None
        ring.steps += 1
        step = ring.steps
        ring.busy[micro] = step
        ring.deadline[micro] = self.now + self.config.step_timeout_s
        ring.inflight[micro] = [r for r, _ in live]
        mems = [ring.members[r] for r, _ in live]
        plain = self.config.spec_cost_aware and ring.cost.plain_due()
        expect, planned = float(len(mems)), 0  # the step so far: expected tokens, drafts
        for mem in mems:
            mem.drafts, mem.guessed = ((), False) if plain else self._drafts(ring, mem, expect, planned)
            planned += len(mem.drafts)
            expect += (expected_kept(len(mem.drafts), mem.length.hold_rate(mem.matched)) if mem.guessed and mem.length
                       else len(mem.drafts))  # a replay's drafts are all kept
        counts = [1 + len(mem.drafts) for mem in mems]
        ring.sent[micro] = (self.now, planned)
        tokens = np.array([t for mem in mems for t in (mem.token, *mem.drafts)], dtype=np.int64)  # (sum counts,)
        starts = [h.prompt_len + mem.index for (_, h), mem in zip(live, mems, strict=True)]
        return DecodeOp(live[0][1].runner, [r for r, _ in live], tokens, ring=ring, micro=micro, step=step,
                        holds=[h for _, h in live], counts=counts, starts=starts)

    def _drafts(self, ring: Ring, mem: Member, expect: float = 1.0,
                planned: int = 0) -> tuple[tuple[int, ...], bool]:
        """The tokens a member's next step feeds after its token: a resumed request's replay (known
        tokens, all kept), else the lookup's proposal at its adapted length (cost-aware: at what
        pays for the step, whose rows so far give ``expect`` tokens with ``planned`` drafts);
        never past the last position its reservation holds (token max_tokens - 1 is never fed)."""
        if mem.length is None:
            return (), False
        room = mem.max_tokens - 2 - mem.index
        if room <= 0:
            return (), False
        if mem.index + 1 < len(mem.replay):
            return tuple(mem.replay[mem.index + 1:mem.index + 1 + min(room, mem.length.max_k)]), False
        if mem.lookup is None:
            return (), False
        if not self.config.spec_cost_aware:
            k = min(room, mem.length.want())
            drafts = mem.lookup.propose(k) if k > 0 else ()
            mem.matched = mem.lookup.matched
            return (drafts, True) if drafts else ((), False)
        # what pays: the proposal at full length, cut to the k that pays for the match behind it
        drafts = mem.lookup.propose(min(room, mem.length.max_k))
        mem.matched = mem.lookup.matched
        k = ring.cost.best_k(len(drafts), mem.length.hold_rate(mem.matched), expect, planned)
        return (drafts[:k], True) if k > 0 else ((), False)

    def _fwd_op(self, m: DecodeBatch, ref: StageRef, runner: Any) -> DecodeOp | None:
        seqs: list[str] = []
        rows: list[int] = []
        holds: list[Hold] = []
        attempts = m.attempts or (0,) * len(m.reqs)
        for i, (r, a) in enumerate(zip(m.reqs, attempts, strict=True)):
            h = self.holds.get((r, m.replica, ref.index))
            if h is None or h.attempt != a:
                self.stats["stale_attempt" if h is not None else "stale"] += 1
                continue
            seqs.append(r)
            rows.append(i)
            holds.append(h)
        d0 = self._d0(m.epoch, m.replica)
        if not seqs:
            if d0 is not None:
                self._send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), (), m.step))
            return None
        x = m.hidden.array()
        counts = [1 + len(m.drafts[i]) for i in rows] if m.drafts else [1] * len(rows)
        if len(rows) != len(m.reqs):
            at = np.concatenate([[0], np.cumsum([1 + len(d) for d in m.drafts])]) if m.drafts else np.arange(len(m.reqs) + 1)
            x = x[np.concatenate([np.arange(at[i], at[i + 1]) for i in rows])]
        sub = DecodeBatch(m.epoch, m.replica, m.micro, m.first_block, tuple(RequestId(s) for s in seqs),
                          tuple(m.indexes[i] for i in rows), m.hidden, tuple(attempts[i] for i in rows), m.step,
                          tuple(m.tokens[i] for i in rows) if m.tokens else (),
                          tuple(m.drafts[i] for i in rows) if m.drafts else ())
        starts = [h.prompt_len + m.indexes[i] for h, i in zip(holds, rows, strict=True)]
        return DecodeOp(runner, seqs, x, batch=sub, ref=ref, holds=holds, counts=counts, starts=starts)

    def _prefill_op(self, h: Hold, c: Chunk) -> PrefillOp:
        handoff = c.msg.decoder != c.msg.replica
        blocks = layer_blocks(h.stage, self.num_layers) if handoff else []
        kv_dtype = np.float16 if self.config.kv_wire_dtype == "float16" else np.float32
        head = h.stage.end == self.num_layers + 2
        return PrefillOp(h, c, blocks, kv_dtype, all_rows=head and c.msg.prompt_logprobs)

    # --- admission (decoder stages) --------------------------------------------------------------------
    def _routes(self, epoch: int) -> Routes | None:
        r = self.routes_for(epoch)
        if r is None or not self.runners.has_epoch(epoch):
            self.stats["stale"] += 1
            return None
        return r

    def _freed(self, req: str, attempt: int) -> bool:
        """A tombstone says this attempt of ``req`` was freed here: a late frame of it allocates nothing."""
        t = self.tombs.get(req)
        if t is not None and attempt <= t[0]:
            self.stats["after_free"] += 1
            return True
        return False

    def _my_stage(self, routes: Routes, replica: int, *, index: int | None = None,
                  first_block: int | None = None) -> StageRef:
        ref = routes.stage(replica, index) if index is not None else routes.stage_at(replica, int(first_block or 0))
        if ref.node != self.node_id:
            raise PlanError(f"stage {ref.index} of replica {replica} is on {ref.node[:12]}, not here")
        return ref

    def _on_reserve(self, m: Reserve) -> None:
        def refuse(error: str, code: str) -> None:
            self._send(m.entry, Reserved(m.req, m.epoch, m.replica, False, error, code, m.attempt))

        if self._freed(m.req, m.attempt):
            return
        routes = self._routes(m.epoch)
        if routes is None:
            refuse(f"epoch {m.epoch} is not loaded on {self.node_id[:12]}", "stale_epoch")
            return
        try:
            ref = self._my_stage(routes, m.replica, index=m.stage)
            params = SamplingParams.from_dict(m.sampling)
            runner = self.runners.runner(m.epoch, ref.first)
            if runner is None:
                raise PlanError(f"blocks [{ref.first}, {ref.end}) of epoch {m.epoch} are not loaded here")
            if m.tokens < m.prompt_len or m.prompt_len < 1:
                raise PlanError(f"cannot reserve {m.tokens} positions for a {m.prompt_len}-token prompt")
        except (MeshError, TypeError, ValueError) as e:
            refuse(str(e), "bad_request")
            return
        cap = self.runners.capacity_tokens(runner)
        if cap is not None and m.tokens > cap:
            self.stats["refused"] += 1
            refuse(f"{m.tokens} positions can never fit stage {ref.index} of replica {m.replica}, which holds "
                   f"{cap} at most", "too_large")
            self._tomb(m.req, m.attempt)  # its prompt may follow (sent with the reservation): dropped
            return
        key = (m.req, m.replica, ref.index)
        old = self.holds.get(key)
        if old is not None:
            if old.attempt > m.attempt:
                self.stats["stale_attempt"] += 1  # a late frame of an attempt the entry gave up on
                return
            if old.attempt == m.attempt:
                refuse(f"request {m.req} attempt {m.attempt} is already held here", "bad_request")
                return
            self._release_req(m.req, old.attempt)  # an older attempt the entry gave up on
        micro = m.micro
        if ref.index == 0:
            ring = self._ring(m.epoch, m.replica, routes)
            ring.remove(m.req)  # an older attempt's place, if it still had one
            if len(ring.members) >= ring.max_batch:
                self.stats["refused"] += 1
                refuse(f"replica {m.replica} decodes {len(ring.members)} requests, its limit", "capacity")
                self._tomb(m.req, m.attempt)  # its prompt may follow (sent with the reservation): dropped
                return
            if m.max_ahead >= 0:
                ahead = self.prompt_tokens_ahead(m.epoch, m.replica, m.req)
                if ahead > m.max_ahead:
                    # prompts other entries sent a moment before: the entry may start this one
                    # sooner elsewhere. Its prompt, on its way behind this frame, is dropped here
                    self.stats["busy"] += 1
                    self._send(m.entry, Reserved(m.req, m.epoch, m.replica, False,
                                                 f"replica {m.replica} has {ahead} prompt tokens queued, "
                                                 f"over the {m.max_ahead} this request allowed", "busy", m.attempt,
                                                 ahead=ahead))
                    self._tomb(m.req, m.attempt)
                    return
            micro = ring.pick_micro()
            mem = ring.members[m.req] = Member(m.req, m.attempt, micro, m.entry, replay=tuple(m.replay),
                                               max_tokens=params.max_tokens)
            on = self.config.speculate if params.speculate is None else params.speculate
            if on and self.config.spec_max_draft > 0:
                mem.lookup = PromptLookup(m.prompt)
                mem.prompt_len = len(mem.lookup)
                mem.length = DraftLength(self.config.spec_max_draft)
        h = Hold(m.req, m.attempt, m.epoch, m.replica, ref, runner, m.entry, True, m.prompt_len, params, m.seed,
                 replay=tuple(m.replay))
        self._hold(key, h)
        h.allocated = True
        self._meta.append(AllocOp(h, m.tokens, micro if micro >= 0 else None))
        self._reserve_msg[key] = Reserve(m.req, m.epoch, m.replica, m.stage, m.tokens, m.prompt_len, m.entry,
                                         m.sampling, m.seed, micro, m.replay, m.attempt)
        self._take_early(key, h)

    def _alloc_done(self, op: AllocOp, res: Result) -> None:
        h = op.hold
        key = (h.req, h.replica, h.stage.index)
        m = self._reserve_msg.pop(key, None) if h.decode else None
        if self.holds.get(key) is not h:
            return  # freed meanwhile (its FreeOp follows)
        if res.error is not None:
            self.stats["refused"] += 1
            h.allocated = False
            code = "too_large" if res.kind == "too_large" else "capacity"
            if h.decode:
                self._send(h.entry, Reserved(RequestId(h.req), h.epoch, h.replica, False, res.error, code, h.attempt))
                self._drop(key)
                self._tomb(h.req, h.attempt)  # its prompt may follow (sent with the reservation): dropped
                ring = self.rings.get((h.epoch, h.replica))
                if ring is not None and h.stage.index == 0:
                    ring.remove(h.req)
            else:
                self._fail(h.entry, h.req, h.attempt, f"prefill stage {h.stage.index}: {res.error}", "capacity")
            return
        if not h.decode:
            return
        log.debug("request %s: reserved %d positions on stage %d of decoder replica %d (epoch %d)", h.req,
                  op.tokens, h.stage.index, h.replica, h.epoch, extra={"request_id": h.req})
        if not layer_blocks(h.stage, self.num_layers):
            self._layers_complete(h)  # nothing of the prompt to receive here
        routes = self.routes_for(h.epoch)
        nxt = routes.next_stage(h.stage) if routes is not None else None
        if nxt is not None and m is not None:
            self._send(nxt.node, Reserve(m.req, m.epoch, m.replica, nxt.index, m.tokens, m.prompt_len, m.entry,
                                         m.sampling, m.seed, m.micro, m.replay, m.attempt))
        elif nxt is None:
            self._send(h.entry, Reserved(RequestId(h.req), h.epoch, h.replica, True, attempt=h.attempt))

    def _hold(self, key: Key, h: Hold) -> None:
        self.holds[key] = h
        n = self._in_flight.get(h.req, 0)
        self._in_flight[h.req] = n + 1
        if n == 0:
            self._out.append(Begin(h.epoch, h.req))

    def _ring(self, epoch: int, replica: int, routes: Routes) -> Ring:
        ring = self.rings.get((epoch, replica))
        if ring is None:
            ring = self.rings[(epoch, replica)] = Ring(epoch, replica, routes, self.config.max_batch)
        return ring

    # --- prefill ---------------------------------------------------------------------------------------
    def _on_prefill(self, m: PrefillChunk) -> None:
        if self._freed(m.req, m.attempt):
            return
        routes = self._routes(m.epoch)
        if routes is None:
            self._send(m.entry, Error(m.req, f"epoch {m.epoch} is not loaded on {self.node_id[:12]}", "stale_epoch",
                                      m.attempt))
            return
        try:
            ref = self._my_stage(routes, m.replica, first_block=m.first_block)
            runner = self.runners.runner(m.epoch, ref.first)
            if runner is None:
                raise PlanError(f"blocks [{ref.first}, {ref.end}) of epoch {m.epoch} are not loaded here")
            params = SamplingParams.from_dict(m.sampling)
            routes.replica(m.decoder)
            x = self._prefill_input(ref, m)
            if m.offset < 0 or m.offset + x.shape[0] > m.prompt_len:
                raise PlanError(f"chunk [{m.offset}, {m.offset + x.shape[0]}) outside a {m.prompt_len}-token prompt")
        except (MeshError, TypeError, ValueError) as e:
            self._send(m.entry, Error(m.req, f"bad prefill frame: {e}", "bad_request", m.attempt))
            return
        key = (m.req, m.replica, ref.index)
        h = self.holds.get(key)
        if h is not None and h.attempt != m.attempt:
            if h.attempt > m.attempt:
                self.stats["stale_attempt"] += 1
                return
            self._release_req(m.req, h.attempt)
            h = None
        if m.decoder == m.replica:
            if h is None and ref.index > 0 and self._keep_early(key, m, ""):
                return  # its reservation, on the control lane, is still on its way
            if h is None:
                self._send(m.entry, Error(m.req, f"prefill of {m.req} on replica {m.replica}, which reserved "
                                                 "nothing for it", "bad_request", m.attempt))
                return
        elif h is None:
            if m.offset != 0:
                self.stats["stale"] += 1  # the prompt's start never came here (freed, or a lost frame)
                return
            h = Hold(m.req, m.attempt, m.epoch, m.replica, ref, runner, m.entry, False, m.prompt_len, params,
                     m.seed, m.decoder)
            self._hold(key, h)
            h.allocated = True
            self._meta.append(AllocOp(h, m.prompt_len, None))
        # stage 0 gets the whole prompt and cuts it into chunks; later stages get one chunk a frame
        c = self.config.prefill_chunk
        cuts = [(a, min(a + c, x.shape[0])) for a in range(0, x.shape[0], c)] if ref.index == 0 else [(0, x.shape[0])]
        if m.offset == 0:
            h.t_arrived = self.now
        for a, b in cuts:
            h.chunks.append(Chunk(m.offset + a, x[a:b], m.last and b == x.shape[0], m))
        if key not in self._rr:
            self._rr.append(key)

    def _prefill_input(self, ref: StageRef, m: PrefillChunk) -> np.ndarray:
        if ref.first == 0:
            if m.ids is None:
                raise PlanError("the first stage needs token ids")
            x = m.ids.array()
            if x.ndim != 1 or x.dtype.kind not in "iu" or x.shape[0] == 0:
                raise PlanError(f"token ids must be a non-empty 1-D integer array, got {x.dtype} {x.shape}")
            return x.astype(np.int64)
        if m.hidden is None:
            raise PlanError("a later stage needs hidden states")
        x = m.hidden.array()
        if x.ndim != 2 or x.shape[1] != self.hidden_size or x.shape[0] == 0:
            raise PlanError(f"hidden states must be (n, {self.hidden_size}), got {x.shape}")
        return x

    def _prefill_done(self, op: PrefillOp, res: Result) -> None:
        h, c, m = op.hold, op.chunk, op.chunk.msg
        key = (h.req, h.replica, h.stage.index)
        if self.holds.get(key) is not h:
            return
        if res.error is not None:
            self._fail(h.entry, h.req, h.attempt, f"prefill failed on stage {h.stage.index}: {res.error}",
                       "stage_error")
            return
        out, kvs = res.value
        n = int(c.x.shape[0])
        self.stats["prefill_tokens"] += n
        h.prefilled = c.offset + n
        log.debug("request %s: prefilled tokens [%d, %d) on stage %d of replica %d", h.req, c.offset, c.offset + n,
                  h.stage.index, h.replica, extra={"request_id": h.req})
        routes = self.routes_for(h.epoch)
        if routes is None:
            self._fail(h.entry, h.req, h.attempt, f"plan epoch {h.epoch} is gone", "epoch_unloaded")
            return
        # the prompt's KV to the decoder stages that own each layer (the data lane: bulk)
        for b, (k, v) in kvs.items():
            owner = routes.owner(m.decoder, b)
            step = chunk_tokens(k[0].nbytes * 2)
            for a in range(0, k.shape[0], step):
                self.stats["kv_out_bytes"] += k[a:a + step].nbytes * 2
                self._send(owner.node, KVChunk(m.req, m.epoch, m.decoder, b, c.offset + a, m.prompt_len,
                                               Tensor.from_array(k[a:a + step]), Tensor.from_array(v[a:a + step]),
                                               h.attempt), "data")
        nxt = routes.next_stage(h.stage)
        if nxt is not None:
            self._send(nxt.node, PrefillChunk(m.req, m.epoch, m.replica, nxt.first, c.offset, c.last, m.prompt_len,
                                              m.decoder, m.entry, m.sampling, m.seed,
                                              ids=m.ids if m.prompt_logprobs else None, hidden=Tensor.from_array(out),
                                              forced=m.forced, attempt=h.attempt, prompt_logprobs=m.prompt_logprobs),
                       "data")
        self._send(h.entry, Progress(RequestId(h.req), h.attempt, h.stage.index, h.prefilled, h.prompt_len,
                                     h.queued_s if h.stage.index == 0 else 0.0))
        if op.all_rows:  # the head's (n, V) rows: row i predicts prompt token offset + i + 1
            self._prompt_logprobs(h, m, c, np.asarray(out))
        if not c.last:
            return
        if m.decoder != m.replica:
            self._release(key)  # the prompt went on to the decoder; nothing more to do here
        else:
            self._layers_complete(h)
        if nxt is None:
            self._first_token(routes, m, h, np.asarray(out)[-1] if op.all_rows else np.asarray(out).reshape(-1))

    def _prompt_logprobs(self, h: Hold, m: PrefillChunk, c: Chunk, rows: np.ndarray) -> None:
        if m.ids is None:
            return
        prompt = m.ids.array()  # (P,) the whole prompt
        a = c.offset
        targets = [int(t) for t in prompt[a + 1:a + rows.shape[0] + 1]]  # the last row predicts none
        params = h.params
        n = (params.logprobs or 0) if params is not None else 0
        h.prompt_lps += prompt_logprobs(rows[:len(targets)], targets, n)

    def _head_sample(self, h: Hold, logits: np.ndarray, index: int) -> tuple[int, dict[str, Any]]:
        """A head samples token ``index``: from ``token_rng(seed, index)`` only, with the penalties
        of what it generated so far; its logprobs when the request asked for them."""
        params = h.params
        assert params is not None
        # a greedy token draws nothing: no generator is made for it (one costs ~15 us a token)
        rng = _GREEDY_RNG if params.greedy else token_rng(h.seed, index)
        tok = sample_one(logits, params, rng, history=h.history)
        extra: dict[str, Any] = {}
        if params.logprobs is not None:
            lp, top = logprobs_of(logits, params, tok, history=h.history)
            extra = {"logprob": lp, "top_ids": tuple(t for t, _ in top), "top_lps": tuple(x for _, x in top)}
        return tok, extra

    def _try_sample(self, h: Hold, req: RequestId, logits: np.ndarray,
                    index: int) -> tuple[int, dict[str, Any]] | None:
        """``_head_sample``, or None after telling the request's entry why its token could not be
        sampled (the request fails alone; the other rows of the step and the node go on)."""
        try:
            return self._head_sample(h, logits, index)
        except (MeshError, ArithmeticError, ValueError, IndexError) as e:
            log.exception("request %s: token %d could not be sampled", req, index)
            self._send(h.entry, Error(req, f"token {index} could not be sampled: {type(e).__name__}: {e}",
                                      "sampling", h.attempt))
            return None

    def _first_token(self, routes: Routes, m: PrefillChunk, h: Hold, logits: np.ndarray) -> None:
        """The prefill replica's head: sample the token after the prompt, hand it to the decoder."""
        index = 0
        if h.params is None:
            h.params = SamplingParams.from_dict(m.sampling)
        if m.forced >= 0:  # resumed: token 0 was streamed already; replay it
            tok = m.forced
        else:
            got = self._try_sample(h, m.req, logits, index)
            if got is None:
                return
            tok, extra = got
            if m.prompt_logprobs:
                extra["prompt_lps"] = tuple(lp for lp, _ in h.prompt_lps)
                extra["prompt_top_ids"] = tuple(t for _, top in h.prompt_lps for t, _ in top)
                extra["prompt_top_lps"] = tuple(x for _, top in h.prompt_lps for _, x in top)
            reason = finish_reason(tok, index, h.params, self.eos)
            self._send(m.entry, Token(m.req, tok, index, reason is not None, reason or "", h.attempt, **extra))
            if reason is not None:
                return
        d0 = routes.stage(m.decoder, 0)
        self._send(d0.node, DecodeStart(m.req, m.epoch, m.decoder, tok, index, h.attempt))

    # --- KV hand-off (decoder stages) ------------------------------------------------------------------
    def _on_kv(self, peer: str, m: KVChunk) -> None:
        if self._freed(m.req, m.attempt):
            self._kv_dropped(m)  # the request ended (or moved on) while its KV was on the way
            return
        routes = self._routes(m.epoch)
        try:
            if routes is None:
                raise PlanError(f"epoch {m.epoch} is not loaded here")
            ref = routes.owner(m.replica, m.block)
            if ref.node != self.node_id:
                raise PlanError(f"block {m.block} of replica {m.replica} is not held here")
            k, v = m.k.array(), m.v.array()
            if k.shape != v.shape or k.ndim != 3 or m.offset < 0 or m.offset + k.shape[0] > m.end:
                raise PlanError(f"KV of shape {k.shape}/{v.shape} at offset {m.offset} for a {m.end}-token prompt")
        except (MeshError, TypeError, ValueError) as e:
            log.warning("dropped KV from %s for %s: %s", peer[:12], m.req, e)
            self.stats["unreserved_kv"] += 1
            self._kv_dropped(m)
            return
        h = self.holds.get((m.req, m.replica, ref.index))
        if h is None and self._keep_early((m.req, m.replica, ref.index), m, peer):
            return  # the prompt went out with the reservation, which has not landed here yet
        if h is None or not h.decode or h.attempt != m.attempt:
            # a stage keeps only what it reserved (or is about to), for this attempt
            self.stats["unreserved_kv" if h is None or not h.decode else "stale_attempt"] += 1
            log.warning("dropped KV from %s for %s (attempt %d): no reservation for it here", peer[:12], m.req,
                        m.attempt)
            self._kv_dropped(m)
            return
        self.stats["kv_in_bytes"] += k.nbytes + v.nbytes
        h.deadline = self.now + self.config.handoff_timeout_s
        self._meta.append(ImportOp(h, m.block, k, v, m.offset, m.end))

    def _kv_dropped(self, m: KVChunk) -> None:
        """Hand-off KV that arrived and was not kept: counted, so that what a prefill replica sent
        equals what its decoders took in plus this (``meshllm_kv_transfer_bytes{direction=dropped}``)."""
        with contextlib.suppress(AttributeError, TypeError, ValueError):  # a malformed frame: nothing to count
            self.stats["kv_dropped_bytes"] += m.k.nbytes + m.v.nbytes

    def _import_done(self, op: ImportOp, res: Result) -> None:
        h = op.hold
        if self.holds.get((h.req, h.replica, h.stage.index)) is not h:
            return
        if res.error is not None:
            self._fail(h.entry, h.req, h.attempt, f"KV import failed: {res.error}", "stage_error")
            return
        if op.start + op.k.shape[0] == op.end:
            h.layers_done.add(op.block)
            if h.layers_done >= set(layer_blocks(h.stage, self.num_layers)):
                self._layers_complete(h)

    def _layers_complete(self, h: Hold) -> None:
        if h.ready_sent:
            return
        h.ready_sent = True
        h.deadline = INF
        d0 = self._d0(h.epoch, h.replica)
        if d0 is not None:
            self._send(d0.node, KVReady(RequestId(h.req), h.epoch, h.replica, h.stage.index, h.attempt))

    def _d0(self, epoch: int, replica: int) -> StageRef | None:
        routes = self.routes_for(epoch)
        if routes is None:
            return None
        try:
            return routes.stage(replica, 0)
        except PlanError:
            return None

    # --- the decode ring (stage 0) -----------------------------------------------------------------------
    def _member(self, epoch: int, replica: int, req: str, attempt: int) -> tuple[Ring, Member] | None:
        ring = self.rings.get((epoch, replica))
        mem = ring.members.get(req) if ring is not None else None
        if ring is None or mem is None:
            self.stats["stale"] += 1
            return None
        if mem.attempt != attempt:
            self.stats["stale_attempt"] += 1
            return None
        return ring, mem

    def _on_kv_ready(self, m: KVReady) -> None:
        found = self._member(m.epoch, m.replica, m.req, m.attempt)
        if found is not None:
            found[1].ready.add(m.stage)
            self._maybe_join(*found)

    def _on_decode_start(self, m: DecodeStart) -> None:
        ring = self.rings.get((m.epoch, m.replica))
        if (ring is None or m.req not in ring.members) and not self._freed(m.req, m.attempt) \
                and self._keep_early((m.req, m.replica, 0), m, ""):
            return  # the prefill finished before the reservation reached this stage
        found = self._member(m.epoch, m.replica, m.req, m.attempt)
        if found is not None:
            ring, mem = found
            mem.token, mem.index = (mem.replay[0] if mem.replay else m.token), m.index
            if mem.lookup is not None and len(mem.lookup) == mem.prompt_len:
                mem.lookup.extend([mem.token])
            self._maybe_join(ring, mem)

    def _maybe_join(self, ring: Ring, mem: Member) -> None:
        if mem.started or mem.token < 0 or len(mem.ready) < len(ring.stages):
            return
        mem.started = True
        ring.micro[mem.micro].append(mem.req)

    def _ring_done(self, op: DecodeOp, res: Result) -> None:
        ring = op.ring
        assert ring is not None
        micro = op.micro
        if self.rings.get((ring.epoch, ring.replica)) is not ring or ring.busy[micro] != op.step:
            return
        if res.error is not None:  # the whole step failed: every row of the micro-batch fails
            self._ring_clear(ring, micro)
            for r in op.seqs:
                self._fail_member(ring, r, f"decode step failed: {res.error}", "stage_error")
            return
        out, ok, errors = res.value
        self._row_errors(errors, ring.replica, 0)
        counts = op.counts or [1] * len(op.seqs)
        keep = [i for i, j in enumerate(ok) if op.seqs[j] in ring.members]  # not freed meanwhile
        if len(keep) != len(ok):
            out = _select(out, [counts[j] for j in ok], keep)
            ok = [ok[i] for i in keep]
        okreqs = [op.seqs[i] for i in ok]
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(ok)
        if not okreqs:
            self._ring_tokens(ring, micro, op.step, [], [], [])
            return
        okidx = tuple(ring.members[r].index for r in okreqs)
        drafts = tuple(ring.members[r].drafts for r in okreqs)
        drafts = drafts if any(drafts) else ()
        nxt = ring.routes.next_stage(ring.stages[0])
        if nxt is None:  # stage 0 holds the head too: sample here
            fed = tuple(int(ring.members[r].token) for r in okreqs)
            toks, done, acc = self._sample_rows(ring.replica, 0, okreqs, okidx, out, fed, drafts)
            self._ring_tokens(ring, micro, op.step, okreqs, toks, done, acc)
            return
        ring.inflight[micro] = okreqs
        attempts = tuple(ring.members[r].attempt for r in okreqs)
        fed = tuple(int(ring.members[r].token) for r in okreqs)
        self._send(nxt.node, DecodeBatch(ring.epoch, ring.replica, micro, nxt.first,
                                         tuple(RequestId(r) for r in okreqs), okidx, Tensor.from_array(out),
                                         attempts, op.step, fed, drafts))

    def _ring_clear(self, ring: Ring, micro: int) -> None:
        ring.busy[micro] = 0
        ring.deadline[micro] = INF
        ring.inflight[micro] = []

    def _row_errors(self, errors: dict[Any, Any], replica: int, stage: int) -> None:
        for r, e in errors.items():
            h = self.holds.get((r, replica, stage))
            if h is not None:
                self._fail(h.entry, r, h.attempt, f"decode failed: {e}", "stage_error")

    def _fail_member(self, ring: Ring, req: str, why: str, code: str) -> None:
        mem = ring.members.get(req)
        if mem is not None:
            self._fail(mem.entry, req, mem.attempt, why, code)
        else:
            self._release_req(req, None)

    def _on_token_batch(self, m: TokenBatch) -> None:
        ring = self.rings.get((m.epoch, m.replica))
        if ring is None or not 0 <= m.micro < ring.nmicro:
            self.stats["stale"] += 1
            return
        if ring.busy[m.micro] != m.step:
            self.stats["stale"] += 1  # an answer to a step given up on
            return
        if not (len(m.reqs) == len(m.tokens) == len(m.done)) or (m.accepted and len(m.accepted) != len(m.reqs)):
            log.warning("malformed token batch (%d reqs, %d tokens): failing its rows", len(m.reqs), len(m.tokens))
            rows = list(ring.inflight[m.micro])
            self._ring_clear(ring, m.micro)
            for r in rows:
                self._fail_member(ring, r, "the head answered a malformed token batch", "stage_error")
            return
        self._ring_tokens(ring, m.micro, m.step, list(m.reqs), list(m.tokens), list(m.done), list(m.accepted))

    def _ring_tokens(self, ring: Ring, micro: int, step: int, reqs: list[str], tokens: list[int],
                     done: list[bool], accepted: list[int] | None = None) -> None:
        got = set(reqs)
        for r in ring.inflight[micro]:
            if r not in got and r in ring.members:
                # dropped on the way: the stage that dropped it told the entry (or the request was freed)
                ring.remove(r)
                self._release_req(r, None)
        if reqs and ring.busy[micro] == step:
            t0, drafts = ring.sent[micro]
            ring.cost.observe(drafts, self.now - t0)
        self._ring_clear(ring, micro)
        for i, (r, t, d) in enumerate(zip(reqs, tokens, done, strict=True)):
            mem = ring.members.get(r)
            if mem is None:
                continue
            a = min(max(0, int(accepted[i])), len(mem.drafts)) if accepted else 0
            if mem.drafts:
                if mem.guessed and mem.length is not None:
                    mem.length.update(len(mem.drafts), a, mem.matched)
                    self.stats["spec_rows"] += 1
                    self.stats["spec_drafted"] += len(mem.drafts)
                    self.stats["spec_accepted"] += a
                if a < len(mem.drafts) and not d:
                    self.stats["spec_truncated"] += 1  # the next step drops the rejected drafts' KV
            new = (*mem.drafts[:a], int(t))
            mem.drafts = ()
            if d:
                ring.remove(r)
                self._release_req(r, None)
            else:
                mem.token = int(t)
                mem.index += len(new)
                if mem.lookup is not None:
                    mem.lookup.extend(new)

    # --- later decoder stages --------------------------------------------------------------------------
    def _on_decode_batch(self, m: DecodeBatch) -> None:
        routes = self._routes(m.epoch)
        try:
            if routes is None:
                raise PlanError(f"epoch {m.epoch} is not loaded here")
            ref = self._my_stage(routes, m.replica, first_block=m.first_block)
            runner = self.runners.runner(m.epoch, ref.first)
            x = m.hidden.array()
            if m.drafts and len(m.drafts) != len(m.reqs):
                raise PlanError(f"{len(m.drafts)} draft rows for {len(m.reqs)} requests")
            n = len(m.reqs) + sum(len(d) for d in m.drafts)
            if x.ndim != 2 or x.shape != (n, self.hidden_size) or len(m.indexes) != len(m.reqs):
                raise PlanError(f"hidden {x.shape} for {len(m.reqs)} requests ({n} positions)")
            if m.attempts and len(m.attempts) != len(m.reqs):
                raise PlanError(f"{len(m.attempts)} attempts for {len(m.reqs)} requests")
            if runner is None:
                raise PlanError("blocks not loaded")
        except (MeshError, TypeError, ValueError) as e:
            # answer anyway, so the ring's micro-batch goes on; the rows held here fail explicitly
            log.warning("dropped a decode batch: %s", e)
            for r in m.reqs:
                for key in [k for k in self.holds if k[0] == r and k[1] == m.replica]:
                    h = self.holds.get(key)
                    if h is not None:
                        self._fail(h.entry, r, h.attempt, f"bad decode frame: {e}", "stage_error")
            d0 = self._d0(m.epoch, m.replica)
            if d0 is not None:
                self._send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), (), m.step))
            return
        self._fwd.append((m, ref, runner))

    def _fwd_done(self, op: DecodeOp, res: Result) -> None:
        m, ref = op.batch, op.ref
        assert m is not None and ref is not None
        d0 = self._d0(m.epoch, m.replica)
        routes = self.routes_for(m.epoch)
        if res.error is not None or routes is None or d0 is None:
            for h in op.holds:
                if self.holds.get((h.req, h.replica, h.stage.index)) is h:
                    self._fail(h.entry, h.req, h.attempt, f"decode step failed on stage {ref.index}: {res.error}",
                               "stage_error")
            if d0 is not None:
                self._send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), (), m.step))
            return
        out, ok, errors = res.value
        self._row_errors(errors, m.replica, ref.index)
        okreqs = [m.reqs[i] for i in ok]
        okidx = tuple(m.indexes[i] for i in ok)
        oka = tuple(m.attempts[i] for i in ok) if m.attempts else ()
        fed = tuple(m.tokens[i] for i in ok) if m.tokens else ()
        drafts = tuple(m.drafts[i] for i in ok) if m.drafts else ()
        nxt = routes.next_stage(ref)
        if not okreqs:
            self._send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), (), m.step))
            return
        if nxt is None:
            toks, done, acc = self._sample_rows(m.replica, ref.index, okreqs, okidx, out, fed, drafts)
            self._send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, tuple(okreqs), tuple(toks), tuple(done),
                                           m.step, tuple(acc) if drafts else ()))
            for r, d in zip(okreqs, done, strict=True):
                if d:
                    self._release((r, m.replica, ref.index))
            return
        self._send(nxt.node, DecodeBatch(m.epoch, m.replica, m.micro, nxt.first, tuple(okreqs), okidx,
                                         Tensor.from_array(out), oka, m.step, fed, drafts))

    def _sample_rows(self, replica: int, stage: int, reqs: list[str], indexes: tuple[int, ...],
                     logits: np.ndarray, fed: tuple[int, ...] = (),
                     drafts: tuple[tuple[int, ...], ...] = ()) -> tuple[list[int], list[bool], list[int]]:
        """The head of a decoder replica: sample each row's next token, send it to its entry.
        ``fed``: the tokens stage 0 fed this step (token ``indexes[i]`` of each row), which extend the
        head's history of the request (the penalties). ``drafts``: what each row fed after its token;
        ``logits`` then holds 1 + len(drafts[i]) rows for row i, and position j samples token
        indexes[i] + 1 + j exactly as a one-token step would (``token_rng(seed, index)``, the history
        so far); a draft is kept only while it equals the token sampled before it. Returns each row's
        last token, whether it ended, and how many drafts it kept (the tokens before the last)."""
        toks, done, kept = [], [], []
        at = 0
        for i, r in enumerate(reqs):
            d = drafts[i] if drafts else ()
            rows = logits[at:at + 1 + len(d)]
            at += 1 + len(d)
            h = self.holds.get((r, replica, stage))
            if h is None or h.params is None:
                toks.append(-1)
                done.append(True)
                kept.append(0)
                continue
            if fed:
                del h.history[indexes[i]:]
                h.history.extend([h.replay[j] if j < len(h.replay) else -1 for j in range(len(h.history), indexes[i])])
                h.history.append(int(fed[i]))
            for j in range(1 + len(d)):
                if j:
                    h.history.append(int(d[j - 1]))  # the draft fed at this position was kept
                index = indexes[i] + 1 + j
                if index < len(h.replay):  # resumed: this token was streamed before; feed it again
                    tok, reason = h.replay[index], None
                else:
                    got = self._try_sample(h, RequestId(r), rows[j], index)
                    if got is None:  # the entry was told; it frees the request everywhere
                        toks.append(-1)
                        done.append(True)
                        kept.append(j)
                        break
                    tok, extra = got
                    reason = finish_reason(tok, index, h.params, self.eos)
                    self._send(h.entry, Token(RequestId(r), tok, index, reason is not None, reason or "", h.attempt,
                                              **extra))
                if reason is not None or j == len(d) or tok != d[j]:
                    toks.append(tok)
                    done.append(reason is not None)
                    kept.append(j)
                    break
        return toks, done, kept

    # --- freeing ---------------------------------------------------------------------------------------
    def free(self, req: str, attempt: int, now: float) -> list[Output]:
        """Release what this node holds for ``req`` up to ``attempt`` (idempotent) and remember it."""
        self._free(req, attempt, now)
        return self._flush()

    def release_all(self) -> None:
        """The node is closing: forget every hold (nothing will run or be sent any more)."""
        for req in {k[0] for k in self.holds}:
            self._release_req(req, None)
        self._meta.clear()
        self._early.clear()
        self._early_bytes = 0
        self._flush()

    def _free(self, req: str, attempt: int, now: float) -> None:
        self.now = now
        self._release_req(req, attempt)
        self._tomb(req, attempt)

    def _tomb(self, req: str, attempt: int) -> None:
        t = self.tombs.pop(req, None)
        self.tombs[req] = (max(attempt, t[0] if t else attempt), self.now + self.config.tombstone_s)
        while len(self.tombs) > TOMBSTONES:
            self.tombs.popitem(last=False)

    def _fail(self, entry: str, req: str, attempt: int, message: str, code: str,
              reserved: tuple[int, int] | None = None) -> None:
        """This node cannot go on with the request: tell its entry, release what is held here."""
        if reserved is not None:
            self._send(entry, Reserved(RequestId(req), reserved[0], reserved[1], False, message, code, attempt))
        else:
            self._send(entry, Error(RequestId(req), message, code, attempt))
        self._release_req(req, attempt)

    def _any_hold(self, req: str | None, attempt: int) -> Hold | None:
        for k, h in self.holds.items():
            if k[0] == req and h.attempt == attempt:
                return h
        return None

    def _release_req(self, req: str, attempt: int | None) -> None:
        """Every hold of ``req`` here (of attempts up to ``attempt``; None: any)."""
        for ring in self.rings.values():
            mem = ring.members.get(req)
            if mem is not None and (attempt is None or mem.attempt <= attempt):
                ring.remove(req)
        for key in [k for k in self.holds if k[0] == req]:
            h = self.holds[key]
            if attempt is None or h.attempt <= attempt:
                self._release(key)
        for key in [k for k in self._early if k[0] == req]:
            self._drop_early(key, attempt)

    # --- hand-off frames before their reservation --------------------------------------------------------
    def _keep_early(self, key: Key, m: KVChunk | DecodeStart | PrefillChunk, peer: str) -> bool:
        """Keep a hand-off frame (or a split BOTH replica's prompt activations) for a reservation
        not here yet, within the node's budget."""
        if not self.config.eager_handoff:
            return False
        e = self._early.get(key)
        if isinstance(m, DecodeStart):
            if e is None:
                e = self._early[key] = Early(self.now + self.config.handoff_timeout_s)
            e.start = m
            self.stats["early_starts"] += 1
            return True
        n = _early_bytes(m)
        if self._early_bytes + n > self.config.early_kv_mib * 2**20:
            self.stats["early_dropped"] += 1
            log.warning("request %s: dropped %d KiB of %s that came before its reservation (%.0f MiB already "
                        "wait here)", m.req, n >> 10, "hand-off KV" if isinstance(m, KVChunk) else "prompt activations",
                        self._early_bytes / 2**20)
            return False
        if e is None:
            e = self._early[key] = Early(self.now + self.config.handoff_timeout_s)
        if isinstance(m, KVChunk):
            e.kv.append((peer, m))
            self.stats["early_kv"] += 1
        else:
            e.prefill.append(m)
            self.stats["early_prefill"] += 1
        e.nbytes += n
        self._early_bytes += n
        return True

    def _take_early(self, key: Key, h: Hold) -> None:
        """The reservation landed: what of its hand-off came first goes in after its allocation
        (frames of an older attempt are dropped; a newer one's wait for its own reservation)."""
        e = self._early.pop(key, None)
        if e is None:
            return
        self._early_bytes -= e.nbytes
        for peer, m in e.kv:
            if m.attempt == h.attempt:
                self._on_kv(peer, m)
            elif m.attempt > h.attempt:
                self._keep_early(key, m, peer)
            else:
                self._kv_dropped(m)
        if e.start is not None and e.start.attempt == h.attempt:
            self._on_decode_start(e.start)
        elif e.start is not None and e.start.attempt > h.attempt:
            self._keep_early(key, e.start, "")
        for c in e.prefill:
            if c.attempt == h.attempt:
                self._on_prefill(c)
            elif c.attempt > h.attempt:
                self._keep_early(key, c, "")

    def _drop_early(self, key: Key, attempt: int | None = None) -> None:
        """Forget the frames kept at ``key`` (of attempts up to ``attempt``; None: all)."""
        e = self._early.get(key)
        if e is None:
            return
        keep = [(p, m) for p, m in e.kv if attempt is not None and m.attempt > attempt]
        gone = sum(_early_bytes(m) for _, m in e.kv) - sum(_early_bytes(m) for _, m in keep)
        self.stats["kv_dropped_bytes"] += gone
        kept = [c for c in e.prefill if attempt is not None and c.attempt > attempt]
        gone += sum(_early_bytes(c) for c in e.prefill) - sum(_early_bytes(c) for c in kept)
        e.kv, e.prefill = keep, kept
        e.nbytes -= gone
        self._early_bytes -= gone
        if e.start is not None and (attempt is None or e.start.attempt <= attempt):
            e.start = None
        if not e.kv and e.start is None and not e.prefill:
            del self._early[key]

    def _release(self, key: Key) -> None:
        h = self.holds.pop(key, None)
        if h is None:
            return
        log.debug("request %s: released on stage %d of replica %d", h.req, h.stage.index, h.replica,
                  extra={"request_id": h.req})
        self._reserve_msg.pop(key, None)
        if h.allocated:
            self._meta.append(FreeOp(h.runner, h.req))
        self._after_release(h)

    def _drop(self, key: Key) -> None:
        """A hold whose allocation failed: nothing to free in the runner."""
        h = self.holds.pop(key, None)
        if h is not None:
            self._after_release(h)

    def _after_release(self, h: Hold) -> None:
        h.chunks.clear()
        n = self._in_flight.get(h.req, 0) - 1
        if n <= 0:
            self._in_flight.pop(h.req, None)
            self._out.append(End(h.epoch, h.req))
        else:
            self._in_flight[h.req] = n

    # --- output ------------------------------------------------------------------------------------------
    def _send(self, to: str, msg: Message, lane: str = "control") -> None:
        self._out.append(Send(to, msg, lane))

    def _flush(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # --- load ------------------------------------------------------------------------------------------
    def load_reports(self) -> list[LoadReport]:
        out = []
        for (epoch, replica), ring in self.rings.items():
            runner = self.runners.runner(epoch, ring.stages[0].first)
            free = self.runners.free_tokens(runner) if runner is not None else None
            out.append(LoadReport(NodeId(self.node_id), epoch, replica,
                                  {"decoding": len(ring.members), "started": sum(len(x) for x in ring.micro),
                                   "max_batch": ring.max_batch, "free_tokens": -1 if free is None else int(free),
                                   "steps": ring.steps}))
        return out

    def prompt_tokens_ahead(self, epoch: int, replica: int, req: str) -> int:
        """Prompt tokens reserved at this replica's stage 0 and not prefilled yet (queued, running,
        or still on their way behind their reservation), other than ``req``'s."""
        return sum(h.prompt_len - h.prefilled for (r, rep, idx), h in self.holds.items()
                   if rep == replica and idx == 0 and h.epoch == epoch and r != req and h.decode
                   and h.prefilled < h.prompt_len)

    def queued_prefill_tokens(self) -> int:
        return sum(int(c.x.shape[0]) for h in self.holds.values() for c in h.chunks)

    def view(self) -> dict[str, Any]:
        return {"held": len(self.holds), "rings": {f"{e}/{r}": len(g.members) for (e, r), g in self.rings.items()},
                "queued_ops": len(self._meta) + len(self._fwd), "queued_prefill_tokens": self.queued_prefill_tokens(),
                "requests": len(self._in_flight), **self.stats}


def _early_bytes(m: KVChunk | PrefillChunk) -> int:
    """The bytes a frame kept for its reservation holds (the early budget counts them)."""
    if isinstance(m, KVChunk):
        return m.k.nbytes + m.v.nbytes
    return m.hidden.nbytes if m.hidden is not None else 0


def _select(out: np.ndarray, counts: list[int], rows: list[int]) -> np.ndarray:
    """The positions of ``rows`` out of an output holding ``counts[i]`` positions per row, in order."""
    at = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    if not rows:
        return out[:0]
    return out[np.concatenate([np.arange(at[i], at[i + 1]) for i in rows])]


def _op_holds(op: Op) -> list[Hold]:
    if isinstance(op, (AllocOp, ImportOp, PrefillOp)):
        return [op.hold]
    if isinstance(op, DecodeOp):
        return list(op.holds)
    return []


# --- what runs on the inference thread -------------------------------------------------------------

def run_op(op: Op, stats: dict[str, Any], clock: Callable[[], float]) -> Result:
    """One op against its runner. Errors become results: one request's failure is not the batch's."""
    try:
        if isinstance(op, AllocOp):
            h = op.hold
            if op.group is None:
                h.runner.alloc(h.req, op.tokens)
            else:
                h.runner.alloc(h.req, op.tokens, group=op.group)
            return Result()
        if isinstance(op, FreeOp):
            if op.runner.has_seq(op.seq):
                op.runner.free(op.seq)
            return Result()
        if isinstance(op, ImportOp):
            op.hold.runner.kv_import(op.hold.req, op.block, op.k, op.v, start=op.start)
            return Result()
        if isinstance(op, PrefillOp):
            h, c = op.hold, op.chunk
            out = np.array(h.runner.prefill(h.req, c.x, last_only=not op.all_rows), copy=True)
            kvs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for b in op.export:
                k, v = h.runner.kv_export(h.req, b, c.offset, c.offset + c.x.shape[0])
                kvs[b] = (np.ascontiguousarray(k, dtype=op.kv_dtype), np.ascontiguousarray(v, dtype=op.kv_dtype))
            return Result((out, kvs))
        t0 = clock()
        if op.starts is not None or (op.counts is not None and any(c > 1 for c in op.counts)):
            out, ok, errors = _decode_positions(op, stats)
        else:
            out, ok, errors = op.runner.decode_rows(op.seqs, op.x)
        stats["decode_compute_s"] += clock() - t0  # this stage's share of a token's time
        stats["decode_calls"] += 1
        return Result((np.array(out, copy=True), list(ok), {k: str(e) for k, e in dict(errors).items()}))
    except ContextLengthError as e:
        return Result(error=str(e), kind="too_large")
    except MeshError as e:
        return Result(error=str(e), kind="capacity")
    except (ValueError, TypeError, IndexError, RuntimeError) as e:  # onnxruntime raises RuntimeError subclasses
        log.exception("serving op %s raised", type(op).__name__)
        return Result(error=f"{type(e).__name__}: {e}", kind="error")


def _decode_positions(op: DecodeOp, stats: dict[str, Any]) -> tuple[np.ndarray, list[int], dict[Any, Any]]:
    """A decode step whose rows may carry several positions (a token and its drafts).

    First each row whose sequence is longer than where its step starts (drafts the head rejected
    last step) drops those positions' KV (``truncate``). Then every row's positions run in one
    pass (``decode_rows(..., counts=)``): the runner computes each position bit for bit as a
    one-position step would (``runtime/attention``), so the tokens cannot differ from decoding
    without drafts. Where its runner does not (``runner.one_pass_exact`` false: int4 "exact",
    whose matrix kernel rounds a one-row product differently from a several-row one; a runner
    of fused attention, GroupQueryAttention: a mesh that does not speculate by default, whose
    requests may still ask for it), position j of every row that has one runs
    as a batched one-position step instead, j = 0, 1, ...: each stage keeps its own promise, so a ring whose stages differ keeps
    its tokens too (it gains only where every stage verifies in one pass).
    Returns (the rows' outputs, their positions in order; the indices of the rows that ran;
    seq -> error of those that did not)."""
    runner = op.runner
    counts = op.counts or [1] * len(op.seqs)
    errors: dict[Any, Any] = {}
    if op.starts is not None:
        for s, start in zip(op.seqs, op.starts, strict=True):
            try:
                if runner.has_seq(s) and runner.seq_len(s) > start:
                    runner.truncate(s, start)
            except MeshError as e:
                errors[s] = e
    at = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    x = np.asarray(op.x)
    live = [i for i, s in enumerate(op.seqs) if s not in errors]
    no_drafts = all(c == 1 for c in counts)
    if no_drafts or getattr(runner, "one_pass_exact", False):  # one pass (without drafts: one step)
        if not live:
            return np.empty((0, 0), np.float32), [], errors
        xs = x if len(live) == len(op.seqs) else x[np.concatenate([np.arange(at[i], at[i + 1]) for i in live])]
        seqs = [op.seqs[i] for i in live]
        out, ok, errs = (runner.decode_rows(seqs, xs) if no_drafts
                         else runner.decode_rows(seqs, xs, counts=[counts[i] for i in live]))
        errors.update(errs)
        return out, [live[k] for k in ok], errors
    parts: dict[int, list[np.ndarray]] = {i: [] for i in live}
    steps = [[i for i in live if counts[i] > j] for j in range(max((counts[i] for i in live), default=0))]
    for j, rows in enumerate(steps):
        rows = [i for i in rows if op.seqs[i] not in errors]
        if not rows:
            continue
        pos = at[rows] + j
        out, ok, errs = runner.decode_rows([op.seqs[i] for i in rows], x[pos])
        errors.update(errs)
        for n, k in enumerate(ok):
            parts[rows[k]].append(np.array(out[n:n + 1], copy=True))
    ok_rows = [i for i in live if op.seqs[i] not in errors]
    if not ok_rows:
        width = x.shape[1] if x.ndim == 2 else 0
        return np.empty((0, width), np.float32), [], errors
    return np.concatenate([a for i in ok_rows for a in parts[i]]), ok_rows, errors
