"""Discrete-event simulation of a plan serving a request stream.

What is modelled (DESIGN §3, EdgeShard Fig. 5):

* **Routing.** At arrival the entry picks a prefill-capable replica under the configured
  policy (``SimConfig.routing``, see ``meshllm.sim.routing``): least predicted completion, or
  earliest predicted start when the objective is waiting time. The decoder is bound when the prefill is admitted: the
  least-predicted-completion decoder that has KV room for the whole request (prompt plus output,
  preallocated as EdgeShard does). No room anywhere: the prompt waits at the head of its
  prefill queue — so a plan short of decode memory shows up as waiting time, not as a free lunch.
* **Prefill** runs as a pipeline over the replica's stages: each stage is a server, prompts are
  cut into micro-batches of ``prefill_chunk_tokens``; stage ``s`` works on one micro-batch while
  stage ``s+1`` works on the previous one. Activations cross stage boundaries over the network.
* **KV hand-off** (prefill replica → decoder replica) is layer-wise and overlapped: as soon as a
  stage finishes a micro-batch, the KV of its layers goes to whichever decoder node owns those
  layers (the partitions may differ). Decoding starts when every KV piece and the first token
  have arrived.
* **Decode** uses continuous batching: sequences join and leave between iterations. A batch is
  split into up to S micro-batches (S = stages) that circulate the stage ring. "No-Bubbles": a
  micro-batch starts its next token as soon as it is back at stage 0. "Bubbles": an iteration
  barrier — no micro-batch starts token k+1 until all have finished token k.
* **BOTH** replicas run prefill micro-batches and decode micro-batches on the same stage servers,
  interleaved first-come first-served.
* **A node holding several stages** of its replica (the source with the embedding and the head)
  is one server for all of them: work on it is reserved in non-overlapping intervals.
* **Links** are per directed node pair, first-come first-served: a transfer occupies the link for
  bytes/bandwidth and arrives one latency later.

Every duration comes from the ``Timing`` object; nothing here knows FLOPs or bandwidths. The
router's predictions (prefill time, step time, slot wait, hand-off) are ``meshllm.sim.estimates``,
which the serving router calls with the same inputs.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from meshllm.sim import estimates
from meshllm.sim.engine import EventQueue, SimError
from meshllm.sim.metrics import RequestRecord, Summary, summarise
from meshllm.sim.model import SimConfig, SimModel, SimReplica
from meshllm.sim.routing import Candidate, choose
from meshllm.sim.workload import Request

TOKEN_BYTES = estimates.TOKEN_BYTES  # a sampled token id on the wire
# a node with nothing to do for longer than this before a stage's work starts was idle: the work
# takes Timing.idle_s more (cold caches; measured even after half a millisecond's pause)
IDLE_GAP_S = 1e-4


class _Req:
    __slots__ = ("chunks", "ctx", "d", "entry", "finish", "first_token", "generated", "p",
                 "pending", "prefill_done", "prefill_start", "r", "seq")

    def __init__(self, r: Request, seq: int, chunk: int) -> None:
        self.r = r
        self.seq = seq  # FIFO priority at stage 0
        self.p = -1
        self.d = -1
        self.entry = ""  # node the prompt came in at and the tokens go back to
        self.chunks = max(1, math.ceil(r.input_tokens / chunk))
        self.prefill_start = -1.0
        self.first_token = -1.0
        self.finish = -1.0
        self.generated = 0
        self.ctx = r.input_tokens
        self.pending = 0
        self.prefill_done = False


class _Group:
    __slots__ = ("id", "last", "seqs")

    def __init__(self, gid: int, seqs: list[_Req]) -> None:
        self.id = gid
        self.seqs = seqs
        self.last = -1.0  # when its previous token came out of the last stage


@dataclass(slots=True)
class _Stage:
    node: str
    queue: list[tuple[int, int, tuple]] = field(default_factory=list)  # heap (prio, tie, job)
    busy: bool = False  # stage 0: serving a job now


class _Rep:
    __slots__ = ("admitting", "backlog_s", "groups", "joiners", "kv_used", "pending", "pre_tokens", "ready",
                 "returned", "s0_end", "seqs", "spec", "stages", "tpot_obs")

    def __init__(self, spec: SimReplica) -> None:
        self.spec = spec
        self.stages = [_Stage(s.node) for s in spec.stages]
        self.pending: list[tuple[int, _Req]] = []  # heap of prompts not yet admitted (seq, req)
        self.backlog_s = 0.0  # predicted bottleneck work of the prompts in ``pending``
        self.kv_used = 0  # KV tokens reserved by sequences bound to this decoder
        self.seqs = 0  # sequences bound to this decoder
        self.groups: list[_Group] = []
        self.joiners: list[_Req] = []
        self.returned: set[int] = set()  # group ids waiting at the Bubbles barrier
        self.tpot_obs = 0.0  # observed seconds per token of its sequences (moving average)
        self.s0_end = 0.0  # when the job its first stage is running ends
        self.pre_tokens = 0  # prompt tokens its first stage prefilled since its last decode step
        self.ready: list[tuple] = []  # iterations: prompt micro-batches admitted, to run (round-robin)
        self.admitting: list[tuple] = []  # iterations: prompts whose decoder reserved their room


@dataclass(frozen=True, slots=True)
class SimResult:
    records: tuple[RequestRecord, ...]
    busy_s: dict[str, float]
    events: int
    summary: Summary
    # per node: stage jobs booked, their rows (prompt micro-batches, decode sequences), and the
    # serving path's CPU seconds counted for them (``SimConfig.serve_cpu``, shared cores only)
    jobs: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    serve_s: dict[str, float] = field(default_factory=dict)


def _rows(job: tuple) -> int:
    """A stage job's rows: 1 for a prompt micro-batch, its sequences for a decode micro-batch,
    the sum for an iteration."""
    if job[0] == "iter":
        return sum(_rows(j) for j in job[1])
    return 1 if job[0] == "prefill" else len(job[1].seqs)


class _Sim:
    def __init__(self, model: SimModel, config: SimConfig, trace: list | None) -> None:
        self.m = model
        self.t = model.timing
        self.cfg = config
        self.q = EventQueue()
        self.reps = {r.id: _Rep(r) for r in model.replicas}
        if len(self.reps) != len(model.replicas):
            raise SimError("replica ids must be unique")
        self.front = [r for r in self.reps.values() if r.spec.role in ("prefill", "both")]
        self.decoders = [r for r in self.reps.values() if r.spec.role == "decoder"]
        self.busy: dict[str, float] = {}
        owner: dict[str, int] = {}
        for r in self.reps.values():
            for st in r.spec.stages:
                # a node may hold several stages of one replica (e.g. embedding and head on the
                # source): it is one server for all of them; two replicas never share a node
                if owner.setdefault(st.node, r.spec.id) != r.spec.id:
                    raise SimError(f"node {st.node} serves two replicas")
                self.busy[st.node] = 0.0
        self.jobs = dict.fromkeys(self.busy, 0)
        self.rows = dict.fromkeys(self.busy, 0)
        self.serve_s = dict.fromkeys(self.busy, 0.0)
        self.serve_cpu = dict(config.serve_cpu) if config.shared_cores > 0 else {}
        self.serve_frac: dict[str, float] = {}  # a node's serving CPU over its compute, in its last job
        # when the work last reserved on each node ends (a node's stages share its compute)
        self.node_free: dict[str, float] = {}
        # nodes holding several stages of their replica keep their reserved intervals instead:
        # work is reserved ahead (a job's whole passage is computed when it leaves stage 0), and
        # a node must still take stage-0 work that fits before a later stage's reservation
        self.node_iv: dict[str, list[tuple[float, float]]] = {}
        self.iv_last: dict[str, float] = {}  # the latest end of a node's reservations already past
        for r in self.reps.values():
            names = [st.node for st in r.spec.stages]
            for node in names:
                if names.count(node) > 1:
                    self.node_iv[node] = []
        self.link_free: dict[tuple[str, str], float] = {}
        self.share = dict(config.core_share)
        self.trace = trace
        self.tie = 0
        self.gid = 0
        self.finished: list[RequestRecord] = []
        self._pcache: dict[tuple[int, int], tuple[float, float]] = {}
        self._scache: dict[tuple[int, int, int], float] = {}
        self._lcache: dict[int, list[tuple[str, str, float, float, int]]] = {}
        self._dcache: dict[tuple[int, int, float], tuple[float, ...]] = {}

    # --- helpers ----------------------------------------------------------------------------
    def _log(self, kind: str, rid: int) -> None:
        if self.trace is not None:
            self.trace.append((self.q.now, kind, rid))

    def _send(self, src: str, dst: str, nbytes: float, at: float | None = None) -> float:
        """Arrival time at ``dst`` of ``nbytes`` sent at ``at`` (default now) over the (src, dst)
        link. Each directed link is used by one replica's pipeline (or one prefill stage's KV),
        in the order its sends are computed, so reserving it ahead of time is FIFO."""
        now = self.q.now if at is None else at
        if src == dst:
            return now
        lat = self.t.transfer_s(src, dst, 0)
        total = self.t.transfer_s(src, dst, nbytes)
        key = (src, dst)
        start = max(now, self.link_free.get(key, 0.0))
        self.link_free[key] = start + (total - lat)
        return start + total

    def _book(self, node: str, ready: float, dur: float, idle: Callable[[float], float] | None = None,
              rows: int = 1) -> float:
        """Reserve ``dur`` seconds of ``node`` from ``ready`` on; returns when that work ends.
        A node with one stage serves in reservation order; a node with several takes the first
        gap long enough among its reservations (work-conserving, never overlapping). Work that
        starts on a node idle just before it takes ``idle(pause)`` seconds more (its stage's
        ``Timing.idle_s`` after a pause that long; counted busy too). ``rows``: the job's prompt
        micro-batches and decode sequences, each of which costs the node's serving path
        ``serve_cpu`` of a core beside it (shared cores)."""
        self.jobs[node] = self.jobs.get(node, 0) + 1
        self.rows[node] = self.rows.get(node, 0) + rows
        serve = self.serve_cpu.get(node, 0.0) * rows
        self.serve_s[node] = self.serve_s.get(node, 0.0) + serve
        iv = self.node_iv.get(node)
        if iv is None:
            nf = self.node_free.get(node)
            start = ready if nf is None or ready > nf else nf
            if idle is not None and (nf is None or start > nf + IDLE_GAP_S):
                dur = self._idle(node, dur, idle(math.inf if nf is None else start - nf))
            end = start + self._stretch(node, dur, start, serve)
            self.node_free[node] = end
            return end
        now = self.q.now
        while iv and iv[0][1] <= now:  # past reservations cannot hold anything up any more
            self.iv_last[node] = max(self.iv_last.get(node, -math.inf), iv.pop(0)[1])
        stretched = self._stretch(node, dur, ready, serve)
        t, k = self._gap(iv, ready, stretched)
        last = max([b for _, b in iv[:k]] + [self.iv_last.get(node, -math.inf)])
        if idle is not None and t > last + IDLE_GAP_S:  # nothing ran on the node just before: it comes back cold
            stretched = self._stretch(node, self._idle(node, dur, idle(t - last)), ready, serve)
            t, k = self._gap(iv, ready, stretched)
        iv.insert(k, (t, t + stretched))
        return t + stretched

    @staticmethod
    def _gap(iv: list[tuple[float, float]], ready: float, dur: float) -> tuple[float, int]:
        """The first start from ``ready`` on where ``dur`` fits between the reservations ``iv``
        (sorted, not overlapping), and the index to insert it at."""
        t = ready
        k = 0
        while k < len(iv):
            a, b = iv[k]
            if b <= t:
                k += 1
                continue
            if a >= t + dur:
                break
            t = b
            k += 1
        return t, k

    def _idle(self, node: str, dur: float, extra: float) -> float:
        """``dur`` seconds of work on ``node`` after it idled: ``extra`` more, busy too."""
        self.busy[node] += extra
        return dur + extra

    def _stretch(self, node: str, dur: float, start: float, serve: float = 0.0) -> float:
        """How long ``dur`` seconds of work on ``node`` from ``start`` take when the nodes share
        ``config.shared_cores`` cores: the cores the nodes computing then ask for (each its
        ``core_share``, this one included) and other work on the machine (``background_cores``)
        over the cores, applied to this node's computing share. ``serve``: the seconds of CPU its
        serving path takes with this work (on its event loop, beside the thread that computes):
        it asks for ``serve / dur`` of a core more while the work runs, which stretches the work
        only where the cores are short."""
        cores = self.cfg.shared_cores
        if cores <= 0:
            return dur
        share = self.share
        sf = self.serve_frac
        own = min(1.0, serve / dur) if dur > 0 else 0.0
        sf[node] = own
        k = share.get(node, 1.0) + own + self.cfg.background_cores
        k += sum(share.get(n, 1.0) + sf.get(n, 0.0) for n, f in self.node_free.items() if n != node and f > start)
        k += sum(share.get(n, 1.0) + sf.get(n, 0.0) for n, iv in self.node_iv.items()
                 if n != node and any(a <= start < b for a, b in iv))
        mine = share.get(node, 1.0)
        sharing = max(1.0, k / cores)
        return dur * (mine * sharing + (1.0 - mine))

    def _hop(self, src: str, dst: str, nbytes: float = TOKEN_BYTES) -> float:
        """A small control message: latency only, no link queueing."""
        return 0.0 if src == dst else self.t.transfer_s(src, dst, nbytes)

    def _entry(self, rep: _Rep, r: Request | None) -> str:
        if r is not None and r.entry is not None:
            return r.entry
        return self.m.entry if self.m.entry is not None else rep.spec.stages[0].node

    def _enqueue(self, rep: _Rep, s: int, prio: int, job: tuple) -> None:
        self.tie += 1
        heapq.heappush(rep.stages[s].queue, (prio, self.tie, job))
        self._try_start(rep, s)

    # --- predictions for routing (``sim.estimates``, shared with the serving router; cached) ---
    def _prefill_est(self, rep: _Rep, tokens: int) -> tuple[float, float]:
        """(latency, bottleneck stage time) of a prompt alone on ``rep``."""
        key = (rep.spec.id, tokens)
        got = self._pcache.get(key)
        if got is None:
            got = self._pcache[key] = estimates.prefill_estimate(self.t, rep.spec, tokens)
        return got

    def _step_est(self, rep: _Rep, batch: int, ctx: int) -> float:
        """Predicted time per token of a sequence in a batch of ``batch`` on ``rep``."""
        ctx_b = estimates.bucket_ctx(ctx)  # bucket contexts: cache stays small
        key = (rep.spec.id, batch, ctx_b)
        got = self._scache.get(key)
        if got is None:
            got = self._scache[key] = estimates.step_estimate(self.t, rep.spec, batch, ctx_b,
                                                              self.cfg.max_groups)
        return got

    def _tpot(self, rep: _Rep, batch: int, ctx: int) -> float:
        return estimates.tpot(self._step_est(rep, batch, ctx), rep.tpot_obs, rep.seqs)

    def _max_groups(self, rep: _Rep) -> int:
        return estimates.max_groups(rep.spec, self.cfg.max_groups)

    def _decode_candidate(self, rep: _Rep, rq: _Req, prefill_rep: _Rep | None) -> Candidate:
        r = rq.r
        return estimates.decode_candidate(
            self.t, rep.spec, input_tokens=r.input_tokens, output_tokens=r.output_tokens,
            kv_used=rep.kv_used, seqs=rep.seqs, tpot_s=lambda batch, ctx: self._tpot(rep, batch, ctx),
            prefill=None if prefill_rep is None else prefill_rep.spec)

    def _slot_wait(self, reps: Sequence[_Rep], waiting: int) -> float:
        """Predicted wait for a decode slot among ``reps`` when ``waiting`` prompts are already
        queued for them (at the mean output length seen so far)."""
        return estimates.slot_wait(
            [(r.seqs, r.spec.max_batch) for r in reps], waiting, self.out_sum / max(self.out_n, 1),
            lambda i, ctx: self._tpot(reps[i], reps[i].spec.max_batch, ctx))

    # --- arrivals and admission -------------------------------------------------------------
    def arrive(self, rq: _Req) -> None:
        r = rq.r
        self._log("arrive", r.id)
        self.out_sum += r.output_tokens
        self.out_n += 1
        cands = []
        pool_wait = self._slot_wait(self.decoders, sum(len(f.pending) for f in self.front
                                                       if f.spec.role == "prefill"))
        need = r.input_tokens + r.output_tokens
        # where it could never be held (a BOTH replica's room, every decoder's for a PREFILL
        # replica) it is not a candidate: its reservation there would be refused for good
        fits_pool = any(d.spec.kv_capacity_tokens >= need for d in self.decoders)
        for f in self.front:
            if not (f.spec.kv_capacity_tokens >= need if f.spec.role == "both" else fits_pool):
                continue
            lat, _ = self._prefill_est(f, r.input_tokens)
            if f.spec.role == "both":
                dec, handoff = self._decode_candidate(f, rq, f).decode_s, 0.0
                queue = f.backlog_s + self._slot_wait([f], len(f.pending))
            else:
                queue = f.backlog_s + pool_wait
                # the decoder is bound later; predict with the best one for this prefill replica,
                # hand-off included (over a slow link it can dwarf the prefill itself)
                dec, handoff = min(((c.decode_s, c.handoff_s) for c in
                                    (self._decode_candidate(d, rq, f) for d in self.decoders)),
                                   key=lambda x: x[0] + x[1])
            # the router scores the trip from the model's entry (the serving router, which runs at
            # each request's own entry, ignores it); the request's own trip is timed below
            reach = self._hop(self._entry(f, None), f.spec.stages[0].node, r.input_tokens * TOKEN_BYTES)
            cands.append(Candidate(f.spec.id, queue, lat, dec, handoff,
                                   busy_s=max(0.0, f.s0_end - self.q.now), reach_s=reach))
        pid = choose(cands, policy=self.cfg.routing)
        if pid is None:
            raise SimError(f"request {r.id} needs {need} KV tokens; no replica can hold it")
        rep = self.reps[pid]
        rq.p = pid
        entry = rq.entry = self._entry(rep, r)
        t = self.q.now + self._hop(entry, rep.spec.stages[0].node, r.input_tokens * TOKEN_BYTES)
        self.q.push(t, "at_prefill", rq)

    def at_prefill(self, rq: _Req) -> None:
        rep = self.reps[rq.p]
        _, worst = self._prefill_est(rep, rq.r.input_tokens)
        rep.backlog_s += worst
        heapq.heappush(rep.pending, (rq.seq, rq))
        self._try_start(rep)

    def _admit(self, rep: _Rep, rq: _Req) -> bool:
        r = rq.r
        need = r.input_tokens + r.output_tokens
        if rep.spec.role == "both":
            d = rep if (rep.kv_used + need <= rep.spec.kv_capacity_tokens
                        and rep.seqs < rep.spec.max_batch) else None
        else:
            did = choose((self._decode_candidate(x, rq, rep) for x in self.decoders), need_room=True,
                         policy=self.cfg.routing)
            d = None if did is None else self.reps[did]
        if d is None:
            return False
        d.kv_used += need
        d.seqs += 1
        rq.d = d.spec.id
        return True

    # --- stage servers ----------------------------------------------------------------------
    # Stage 0 of a replica is an event-driven server: it chooses among prompts waiting for
    # admission and decode micro-batches coming back. Stages 1..S-1 only ever receive jobs from
    # the stage before, FIFO, over FIFO links — a tandem line that preserves order — so a job's
    # passage through them is computed in one step when it leaves stage 0 (exactly what
    # stage-by-stage events would give, with two events per job instead of two per stage).
    def _dur(self, rep: _Rep, s: int, job: tuple) -> float:
        if job[0] == "iter":
            return sum(self._dur(rep, s, j) for j in job[1])
        if job[0] == "prefill":
            rq, k = job[1], job[2]
            c = self.cfg.prefill_chunk_tokens
            tokens = min(c, rq.r.input_tokens - k * c)
            return self.t.prefill_s(rep.spec, s, tokens, k * c)
        return self._decode_durs(rep, job[1])[s]

    def _admit_next(self, rep: _Rep) -> tuple | None:
        """The first prompt waiting on ``rep`` as a job, if a decoder has room for it."""
        rq = rep.pending[0][1]
        if not self._admit(rep, rq):
            return None
        heapq.heappop(rep.pending)
        _, worst = self._prefill_est(rep, rq.r.input_tokens)
        rep.backlog_s = max(0.0, rep.backlog_s - worst)
        rq.prefill_start = self.q.now
        self._log("prefill_start", rq.r.id)
        return ("prefill", rq, 0)

    def _try_start(self, rep: _Rep, s: int = 0) -> None:
        st = rep.stages[0]
        if st.busy:
            return
        if self.cfg.iterations:
            self._start_iteration(rep)
            return
        job = None
        budget = self.cfg.step_token_budget
        if budget > 0 and rep.pre_tokens >= budget:
            # the serving core's iteration: the decode steps that are back go before more prompt
            k = next((i for i, e in enumerate(st.queue) if e[2][0] == "decode"), None)
            if k is not None:
                job = st.queue.pop(k)[2]
                heapq.heapify(st.queue)
        if job is not None:
            pass
        elif budget > 0 and (rep.pending or any(e[2][0] == "prefill" for e in st.queue)):
            # within the budget: prompt work first (a chunk already started, else a new prompt)
            k = next((i for i, e in enumerate(st.queue) if e[2][0] == "prefill"), None)
            if k is not None and (not rep.pending or st.queue[k][0] <= rep.pending[0][0]):
                job = st.queue.pop(k)[2]
                heapq.heapify(st.queue)
            elif rep.pending:
                job = self._admit_next(rep)
                if job is None and k is not None:
                    job = st.queue.pop(k)[2]
                    heapq.heapify(st.queue)
        elif rep.pending and (not st.queue or rep.pending[0][0] < st.queue[0][0]):
            job = self._admit_next(rep)
        if job is None and st.queue:
            job = heapq.heappop(st.queue)[2]
        if job is None:
            return
        if job[0] == "prefill":
            c = self.cfg.prefill_chunk_tokens
            rep.pre_tokens += min(c, job[1].r.input_tokens - job[2] * c)
        else:
            rep.pre_tokens = 0
        dur = self._dur(rep, 0, job)
        st.busy = True
        self.busy[st.node] += dur
        # the node may be working on a later stage of this replica reserved earlier
        rep.s0_end = self._book(st.node, self.q.now, dur, partial(self.t.idle_s, rep.spec, 0), _rows(job))
        self.q.push(rep.s0_end, "done", (rep, job))

    def _start_iteration(self, rep: _Rep) -> None:
        """Stage 0 of ``rep`` is idle: its next iteration, as the serving core schedules one."""
        st = rep.stages[0]
        while True:
            # metadata first: every waiting prompt that has room is admitted; it runs from the
            # next iteration on (its allocation is this iteration's op)
            admitted, rep.admitting = rep.admitting, []
            while rep.pending and self._admit(rep, rep.pending[0][1]):
                rq = heapq.heappop(rep.pending)[1]
                _, worst = self._prefill_est(rep, rq.r.input_tokens)
                rep.backlog_s = max(0.0, rep.backlog_s - worst)
                d = self.reps[rq.d]
                at = self._reserved_at(d, rep) if d is not rep else self.q.now
                if at > self.q.now and not self.cfg.eager_handoff:  # its decoder reserves the room first
                    self.q.push(at, "reserved", (rep, ("prefill", rq, 0)))
                    continue
                admitted.append(("prefill", rq, 0))
                if at > self.q.now:  # beside the reservation: the decoder takes its KV and first
                    rq.pending += 1  # token when the reservation is done (a piece that comes then)
                    self.q.push(at, "piece", rq)
            jobs = [e[2] for e in st.queue]  # every decode micro-batch that is back
            st.queue.clear()
            budget = self.cfg.step_token_budget - sum(len(j[1].seqs) for j in jobs)
            c = self.cfg.prefill_chunk_tokens
            tokens = 0
            while rep.ready:
                rq, k = rep.ready[0][1], rep.ready[0][2]
                n = min(c, rq.r.input_tokens - k * c)
                if tokens and n > budget - tokens:
                    break
                jobs.append(rep.ready.pop(0))
                tokens += n
                if k == 0:
                    rq.prefill_start = self.q.now
                    self._log("prefill_start", rq.r.id)
            rep.ready.extend(admitted)
            if jobs:
                break
            if not admitted:
                return
            # an iteration of allocations only takes no compute: the next one starts now
        job = ("iter", tuple(jobs))
        dur = self._dur(rep, 0, job)
        st.busy = True
        self.busy[st.node] += dur
        rep.s0_end = self._book(st.node, self.q.now, dur, partial(self.t.idle_s, rep.spec, 0), _rows(job))
        self.q.push(rep.s0_end, "done", (rep, job))

    def _reserved_at(self, d: _Rep, rep: _Rep) -> float:
        """When decoder ``d`` has reserved a prompt's room, asked now from ``rep``'s first stage:
        its stage 0 allocates in its next iteration (after the one it is running), which also
        steps the micro-batches that are back; the answer goes back over the link."""
        hop = self._hop(rep.spec.stages[0].node, d.spec.stages[0].node)
        t = self.q.now + hop
        if d.stages[0].busy and d.s0_end > t:
            t = d.s0_end
        t += sum(self._decode_durs(d, g)[0] for g in d.groups if g.seqs)
        return t + hop

    def reserved(self, rep: _Rep, job: tuple) -> None:
        """A prompt's decoder reserved its room: the prompt is allocated in ``rep``'s next iteration."""
        rep.admitting.append(job)
        self._try_start(rep)

    def _at(self, t: float, kind: str, payload: object) -> None:
        """An event at ``t``; with iterations, one due now is handled now, so that what an
        iteration's end makes ready (a one-stage replica's decode micro-batch, a prompt's first
        token on a BOTH replica) is in the next iteration, as the serving core schedules it."""
        if self.cfg.iterations and t <= self.q.now:
            if kind == "decoded":
                self.decoded(*payload)  # type: ignore[misc]
            elif kind == "back":
                self.back(*payload)  # type: ignore[misc]
            elif kind == "prefilled":
                self.prefilled(*payload)  # type: ignore[misc]
            else:
                self.piece(payload)  # type: ignore[arg-type]
            return
        self.q.push(t, kind, payload)

    def done(self, rep: _Rep, job: tuple) -> None:
        if job[0] == "iter":
            for j in job[1]:
                if j[0] == "prefill" and j[2] + 1 < j[1].chunks:
                    rep.ready.append(("prefill", j[1], j[2] + 1))  # round-robin: to the back
            # stage 0 stays taken while the iteration's outputs are handled: what they make
            # ready joins the next iteration, which starts once they are all in
            self._passage(rep, job)
            rep.stages[0].busy = False
            self._try_start(rep)
            return
        rep.stages[0].busy = False
        if job[0] == "prefill":
            rq, k = job[1], job[2]
            if k + 1 < rq.chunks:
                # the rest of this prompt goes straight after it: same priority as the prompt
                self.tie += 1
                heapq.heappush(rep.stages[0].queue, (rq.seq, self.tie, ("prefill", rq, k + 1)))
        self._passage(rep, job)
        self._try_start(rep)

    def _links(self, rep: _Rep) -> list[tuple[str, str, float, float, int]]:
        """Per stage boundary s -> s+1: (src, dst, latency, seconds per byte, act bytes/token).
        ``Timing.transfer_s`` is affine in bytes (latency + bytes / bandwidth)."""
        links = self._lcache.get(rep.spec.id)
        if links is None:
            links = []
            stages = rep.spec.stages
            for a, b in itertools.pairwise(stages):
                lat = self.t.transfer_s(a.node, b.node, 0)
                per_byte = (self.t.transfer_s(a.node, b.node, 1 << 20) - lat) / (1 << 20)
                links.append((a.node, b.node, lat, per_byte, self.t.act_bytes_per_token(a.end - 1)))
            self._lcache[rep.spec.id] = links
        return links

    def _decode_durs(self, rep: _Rep, g: _Group) -> tuple[float, ...]:
        batch = len(g.seqs)
        ctx = sum(x.ctx for x in g.seqs) / batch
        key = (rep.spec.id, batch, ctx)
        durs = self._dcache.get(key)
        if durs is None:
            durs = self._dcache[key] = tuple(self.t.decode_s(rep.spec, s, batch, ctx)
                                             for s in range(len(rep.spec.stages)))
        return durs

    def _passage(self, rep: _Rep, job: tuple) -> None:
        """Carry ``job`` (just finished on stage 0) through the remaining stages."""
        t = self.q.now
        stages = rep.stages
        n = len(stages)
        if job[0] == "iter":
            self._passage_iteration(rep, job[1])
            return
        is_prefill = job[0] == "prefill"
        if is_prefill:
            rq, k = job[1], job[2]
            c = self.cfg.prefill_chunk_tokens
            tokens = min(c, rq.r.input_tokens - k * c)
            self._send_kv(rep, 0, rq, k, t)
        else:
            tokens = len(job[1].seqs)
            durs = self._decode_durs(rep, job[1]) if n > 1 else ()
        if n > 1:
            links = self._links(rep)
            link_free = self.link_free
            busy = self.busy
            for s in range(1, n):
                src, dst, lat, per_byte, act = links[s - 1]
                occ = tokens * act * per_byte
                lk = (src, dst)
                start = max(t, link_free.get(lk, 0.0))
                link_free[lk] = start + occ
                arrive = start + occ + lat
                st = stages[s]
                dur = self._dur(rep, s, job) if is_prefill else durs[s]
                t = self._book(st.node, arrive, dur, partial(self.t.idle_s, rep.spec, s), _rows(job))
                busy[st.node] += dur
                if is_prefill:
                    self._send_kv(rep, s, rq, k, t)
        if is_prefill:
            if k + 1 == rq.chunks:
                self.q.push(t, "prefilled", (rep, rq))
        else:
            self.q.push(t, "decoded", (rep, job[1]))

    def _passage_iteration(self, rep: _Rep, jobs: tuple) -> None:
        """Carry an iteration's work (just finished on stage 0) through the remaining stages: at
        each, its outputs cross the link together and are computed together; each prompt
        micro-batch's KV leaves as its stage's iteration ends."""
        c = self.cfg.prefill_chunk_tokens
        pre = [j for j in jobs if j[0] == "prefill"]
        tokens = sum(min(c, j[1].r.input_tokens - j[2] * c) for j in pre)
        tokens += sum(len(j[1].seqs) for j in jobs if j[0] == "decode")
        t = self.q.now
        for j in pre:
            self._send_kv(rep, 0, j[1], j[2], t)
        if len(rep.stages) > 1:
            links = self._links(rep)
            for s in range(1, len(rep.stages)):
                src, dst, lat, per_byte, act = links[s - 1]
                occ = tokens * act * per_byte
                start = max(t, self.link_free.get((src, dst), 0.0))
                self.link_free[(src, dst)] = start + occ
                node = rep.stages[s].node
                dur = sum(self._dur(rep, s, j) for j in jobs)
                t = self._book(node, start + occ + lat, dur, partial(self.t.idle_s, rep.spec, s), _rows(("iter", jobs)))
                self.busy[node] += dur
                for j in pre:
                    self._send_kv(rep, s, j[1], j[2], t)
        for j in jobs:
            if j[0] == "decode":
                self._at(t, "decoded", (rep, j[1]))
            elif j[2] + 1 == j[1].chunks:
                self._at(t, "prefilled", (rep, j[1]))

    def _send_kv(self, rep: _Rep, s: int, rq: _Req, k: int, t: float) -> None:
        """Layer-wise KV of micro-batch ``k`` from prefill stage ``s`` (done at ``t``) to the
        decoder nodes that own those layers."""
        d = self.reps[rq.d]
        if d is rep or rq.r.output_tokens < 2:
            return
        st = rep.spec.stages[s]
        c = self.cfg.prefill_chunk_tokens
        tokens = min(c, rq.r.input_tokens - k * c)
        for dst in d.spec.stages:
            lo, hi = max(st.first, dst.first), min(st.end, dst.end)
            if lo >= hi:
                continue
            nbytes = tokens * self.t.kv_bytes_per_token(lo, hi)
            if nbytes <= 0:
                continue
            rq.pending += 1
            self.q.push(self._send(st.node, dst.node, nbytes, at=t), "piece", rq)

    def prefilled(self, rep: _Rep, rq: _Req) -> None:
        """The last stage produced the first token."""
        last = rep.spec.stages[-1].node
        d = self.reps[rq.d]
        rq.generated = 1
        rq.ctx = rq.r.input_tokens + 1
        rq.first_token = self.q.now + self._hop(last, rq.entry)
        if rq.r.output_tokens == 1:
            self._finish(d, rq, rq.first_token)
            return
        rq.prefill_done = True
        rq.pending += 1
        self._at(self.q.now + self._hop(last, d.spec.stages[0].node), "piece", rq)

    def piece(self, rq: _Req) -> None:
        rq.pending -= 1
        if rq.pending == 0 and rq.prefill_done:
            self._join(self.reps[rq.d], rq)

    # --- decode -----------------------------------------------------------------------------
    def _new_group(self, rep: _Rep, seqs: list[_Req]) -> _Group:
        self.gid += 1
        g = _Group(self.gid, seqs)
        rep.groups.append(g)
        return g

    def _join(self, rep: _Rep, rq: _Req) -> None:
        if self.cfg.pipeline == "no-bubbles":
            if len(rep.groups) < self._max_groups(rep):
                g = self._new_group(rep, [rq])
                self._enqueue(rep, 0, self._prio(), ("decode", g))
            else:
                rep.joiners.append(rq)
        elif not rep.groups:
            g = self._new_group(rep, [rq])
            self._enqueue(rep, 0, self._prio(), ("decode", g))
        else:
            rep.joiners.append(rq)

    def _prio(self) -> int:
        # decode micro-batches queue behind prompts that arrived before them (FIFO by time):
        # request seqs are arrival ranks, so take the rank of the next unseen arrival
        return self.next_seq

    def decoded(self, rep: _Rep, g: _Group) -> None:
        """Micro-batch ``g`` left the last stage: one token for each of its sequences."""
        spec = rep.spec
        last = spec.stages[-1].node
        if g.last >= 0:
            # what a replica reports to the router: its recent time per token, queueing at its
            # stages (prompts first on BOTH replicas) included
            dt = self.q.now - g.last
            rep.tpot_obs = dt if rep.tpot_obs == 0 else 0.8 * rep.tpot_obs + 0.2 * dt
        g.last = self.q.now
        keep = []
        for rq in g.seqs:
            rq.generated += 1
            rq.ctx += 1
            if rq.generated >= rq.r.output_tokens:
                self._finish(rep, rq, self.q.now + self._hop(last, rq.entry))
            else:
                keep.append(rq)
        g.seqs = keep
        back = self.q.now + self._hop(last, spec.stages[0].node, TOKEN_BYTES * max(1, len(keep)))
        self._at(back, "back", (rep, g))

    def back(self, rep: _Rep, g: _Group) -> None:
        if self.cfg.pipeline == "no-bubbles":
            g.seqs.extend(rep.joiners)
            rep.joiners = []
            if g.seqs:
                self._enqueue(rep, 0, self._prio(), ("decode", g))
            else:
                rep.groups.remove(g)
            return
        rep.returned.add(g.id)
        if len(rep.returned) < len(rep.groups):
            return
        # Bubbles barrier: every micro-batch is back; form the next iteration
        rep.returned.clear()
        rep.groups = [x for x in rep.groups if x.seqs]
        for rq in rep.joiners:
            if len(rep.groups) < self._max_groups(rep):
                self._new_group(rep, [rq])
            else:
                min(rep.groups, key=lambda x: (len(x.seqs), x.id)).seqs.append(rq)
        rep.joiners = []
        for x in rep.groups:
            self._enqueue(rep, 0, self._prio(), ("decode", x))

    def _finish(self, d: _Rep, rq: _Req, at: float) -> None:
        r = rq.r
        rq.finish = at
        d.kv_used -= r.input_tokens + r.output_tokens
        d.seqs -= 1
        self.finished.append(RequestRecord(r.id, r.arrival, r.input_tokens, r.output_tokens, rq.p,
                                       rq.d, rq.prefill_start, rq.first_token, at))
        self._log("finish", r.id)
        # freed KV room may unblock prompts waiting for admission anywhere
        for f in self.front:
            if f.pending:
                self._try_start(f)

    # --- main loop ----------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> SimResult:
        order = sorted(requests, key=lambda r: (r.arrival, r.id))
        ids = [r.id for r in order]
        if len(set(ids)) != len(ids):
            raise SimError("request ids must be unique")
        holders = self.decoders + [f for f in self.front if f.spec.role == "both"]  # who decodes
        caps = [r.spec.kv_capacity_tokens for r in holders]
        bats = [r.spec.max_batch for r in holders]
        if max(bats, default=0) < 1:
            raise SimError("no decoder can hold a single sequence")
        for r in order:
            if r.input_tokens + r.output_tokens > max(caps):
                raise SimError(f"request {r.id} needs {r.input_tokens + r.output_tokens} KV tokens;"
                               f" the largest decoder holds {max(caps)}")
        self.next_seq = 0
        self.out_sum = 0
        self.out_n = 0
        c = self.cfg.prefill_chunk_tokens
        pending = [_Req(r, i, c) for i, r in enumerate(order)]
        for rq in pending:
            self.q.push(rq.r.arrival, "arrive", rq)
        q = self.q
        while len(q):
            _, kind, p = q.pop()
            if kind == "done":
                self.done(*p)
            elif kind == "decoded":
                self.decoded(*p)
            elif kind == "back":
                self.back(*p)
            elif kind == "piece":
                self.piece(p)
            elif kind == "prefilled":
                self.prefilled(*p)
            elif kind == "arrive":
                self.next_seq = p.seq + 1
                self.arrive(p)
            elif kind == "at_prefill":
                self.at_prefill(p)
            elif kind == "reserved":
                self.reserved(*p)
            else:  # pragma: no cover - every push above uses one of these kinds
                raise SimError(f"unknown event {kind!r}")
        if len(self.finished) != len(order):
            raise SimError(f"{len(order) - len(self.finished)} requests never finished "
                           "(the plan cannot admit them)")
        recs = tuple(sorted(self.finished, key=lambda x: x.id))
        return SimResult(recs, dict(self.busy), self.q.popped, summarise(list(recs), self.busy),
                         dict(self.jobs), dict(self.rows), dict(self.serve_s))


def simulate(model: SimModel, requests: Sequence[Request], config: SimConfig | None = None, *,
             trace: list | None = None, warmup: int = 0) -> SimResult:
    """Run ``requests`` through ``model``; pure and deterministic. ``trace``, if given, receives
    ``(time, kind, request_id)`` for every arrival, prefill start and finish, in event order."""
    sim = _Sim(model, config or SimConfig(), trace)
    res = sim.run(requests)
    if warmup:
        res = dataclasses.replace(res, summary=summarise(list(res.records), res.busy_s, warmup=warmup))
    return res
