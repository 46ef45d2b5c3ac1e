"""The stage side of serving: what a node does with the requests that pass through its blocks.

Per request and per stage it holds (``_Held``) a KV sequence in the stage's runner:

* a **decoder stage** reserves ``prompt + max_tokens`` positions on ``Reserve`` (admission: the
  chain runs stage 0 -> 1 -> ... -> last, which answers the entry), imports the prompt's KV
  layer by layer as prefill stages stream it (``KVChunk``), tells its replica's stage 0 when every
  layer it owns is complete (``KVReady``), then runs decode steps;
* a **prefill-only stage** holds the prompt while computing it and frees it as soon as the last
  chunk's KV has been sent on (a BOTH replica keeps the reservation and decodes in place).

A decoder replica's stage 0 runs the **ring** (``_Ring``): requests whose first token arrived
(``DecodeStart``) and whose KV is complete on every stage join a micro-batch; each micro-batch goes
stage 0 -> ... -> head as ``DecodeBatch`` frames, the head samples (it knows every request's
parameters from ``Reserve``; token ``i``'s randomness comes from ``token_rng(seed, i)``) and sends
``TokenBatch`` back to stage 0, which starts the micro-batch's next step. With as many
micro-batches as stages, every stage has work (EdgeShard's No-Bubbles). Requests join and leave
between steps (continuous batching).

Every call into a runner goes through one job queue per node, executed on the stage host's
inference thread: decode steps and KV imports first, prefill chunks after, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshllm.errors import MeshError, PlanError, SamplingError
from meshllm.obs.logs import bound, node_var, request_var
from meshllm.runtime.sampling import SamplingParams, sample_one, token_rng
from meshllm.serve.config import ServeConfig
from meshllm.serve.messenger import Messenger
from meshllm.serve.routes import Routes, StageRef, layer_blocks
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
    Reserve,
    Reserved,
    Token,
    TokenBatch,
)
from meshllm.wire.tensor import Tensor

log = logging.getLogger("meshllm.serve.stage")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

Key = tuple[str, int, int]  # (request, replica, stage index)


@dataclass(slots=True)
class _Held:
    req: str
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
    layers_done: set[int] = field(default_factory=set)
    ready_sent: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Member:
    req: str
    micro: int
    entry: str
    ready: set[int] = field(default_factory=set)  # stages whose KV is complete
    token: int = -1  # the next token to feed (-1 until the prefill's head sent it)
    index: int = 0  # its index among the generated tokens
    started: bool = False
    replay: tuple[int, ...] = ()


class _Ring:
    """Stage 0 of a decoder replica: membership and micro-batches."""

    def __init__(self, epoch: int, replica: int, routes: Routes, max_batch: int) -> None:
        self.epoch = epoch
        self.replica = replica
        self.routes = routes
        self.stages = routes.stages(replica)
        self.nmicro = max(1, len(self.stages))
        self.max_batch = max_batch
        self.members: dict[str, _Member] = {}
        self.micro: list[list[str]] = [[] for _ in range(self.nmicro)]  # started members per micro
        self.busy: list[bool] = [False] * self.nmicro
        self.inflight: list[list[str]] = [[] for _ in range(self.nmicro)]
        self.steps = 0

    def pick_micro(self) -> int:
        counts = [0] * self.nmicro
        for m in self.members.values():
            counts[m.micro] += 1
        return int(np.argmin(counts))

    def remove(self, req: str) -> None:
        m = self.members.pop(req, None)
        if m is not None and req in self.micro[m.micro]:
            self.micro[m.micro].remove(req)


class StageServer:
    def __init__(self, node_id: str, host: Any, messenger: Messenger, routes_for: Callable[[int], Routes | None],
                 config: ServeConfig, *, num_layers: int, eos_ids: tuple[int, ...],
                 hidden_size: int) -> None:
        self.node_id = node_id
        self.host = host
        self.net = messenger
        self.routes_for = routes_for
        self.config = config
        self.num_layers = num_layers
        self.eos = frozenset(eos_ids)
        self.hidden_size = hidden_size
        self.held: dict[Key, _Held] = {}
        self.rings: dict[tuple[int, int], _Ring] = {}  # (epoch, replica) -> ring (we are its stage 0)
        # jobs with the node and request they were queued for, so what they log says so
        self._hi: deque[tuple[Callable[[], Awaitable[None]], tuple[str | None, str | None]]] = deque()
        self._lo: deque[tuple[Callable[[], Awaitable[None]], tuple[str | None, str | None]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "decode_rows": 0, "kv_in_bytes": 0,
                      "kv_out_bytes": 0, "refused": 0, "unreserved_kv": 0, "stale": 0, "errors": 0,
                      "decode_compute_s": 0.0, "decode_calls": 0}
        self.queued_prefill_tokens = 0

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._worker())

    async def close(self) -> None:
        self.closed = True
        for key in list(self.held):
            self._release(key)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def held_count(self) -> int:
        return len(self.held)

    # --- the job queue ---------------------------------------------------------------------------
    def _submit(self, job: Callable[[], Awaitable[None]], hi: bool) -> None:
        (self._hi if hi else self._lo).append((job, (node_var.get(), request_var.get())))
        self._wake.set()

    async def _worker(self) -> None:
        while True:
            if not self._hi and not self._lo:
                self._wake.clear()
                await self._wake.wait()
                continue
            job, (node, req) = self._hi.popleft() if self._hi else self._lo.popleft()
            try:
                with bound(node=node, request_id=req):
                    await job()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a job must not stop the stage
                self.stats["errors"] += 1
                log.exception("bug in a serving job")

    # --- dispatch ---------------------------------------------------------------------------------
    def handle(self, peer: str, msg: Message) -> None:
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
            self.free(msg.req)

    def _routes(self, epoch: int) -> Routes | None:
        r = self.routes_for(epoch)
        if r is None or not self.host.has_epoch(epoch):
            self.stats["stale"] += 1
            return None
        return r

    def _my_stage(self, routes: Routes, replica: int, *, index: int | None = None,
                  first_block: int | None = None) -> StageRef:
        ref = routes.stage(replica, index) if index is not None else routes.stage_at(replica, int(first_block or 0))
        if ref.node != self.node_id:
            raise PlanError(f"stage {ref.index} of replica {replica} is on {ref.node[:12]}, not here")
        return ref

    def _error(self, entry: str, req: str, message: str, code: str = "stage_error") -> None:
        self.net.send(entry, Error(RequestId(req), message, code))

    # --- admission (decoder stages) -------------------------------------------------------------
    def _on_reserve(self, m: Reserve) -> None:
        routes = self._routes(m.epoch)
        if routes is None:
            self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, False,
                                            f"epoch {m.epoch} is not loaded on {self.node_id[:12]}", "stale_epoch"))
            return
        try:
            ref = self._my_stage(routes, m.replica, index=m.stage)
            params = SamplingParams.from_dict(m.sampling)
            runner = self.host.runner(m.epoch, ref.first)
            if runner is None:
                raise PlanError(f"blocks [{ref.first}, {ref.end}) of epoch {m.epoch} are not loaded here")
            if m.tokens < m.prompt_len or m.prompt_len < 1:
                raise SamplingError(f"cannot reserve {m.tokens} positions for a {m.prompt_len}-token prompt")
        except (MeshError, TypeError, ValueError) as e:
            self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, False, str(e), "bad_request"))
            return
        micro = m.micro
        if ref.index == 0:
            ring = self._ring(m.epoch, m.replica, routes)
            if m.req in ring.members:
                self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, False,
                                                f"request {m.req} is already decoding here", "bad_request"))
                return
            if len(ring.members) >= ring.max_batch:
                self.stats["refused"] += 1
                self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, False,
                                                f"replica {m.replica} decodes {len(ring.members)} requests, its limit",
                                                "capacity"))
                return
            micro = ring.pick_micro()
            ring.members[m.req] = _Member(m.req, micro, m.entry, replay=tuple(m.replay))
        key = (m.req, m.replica, ref.index)

        async def job() -> None:
            try:
                await self.host.call(_alloc, runner, m.req, m.tokens, micro)
            except MeshError as e:
                self.stats["refused"] += 1
                if ref.index == 0:
                    self.rings[(m.epoch, m.replica)].remove(m.req)
                self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, False, str(e), "capacity"))
                return
            h = _Held(m.req, m.epoch, m.replica, ref, runner, m.entry, True, m.prompt_len, params, m.seed,
                      replay=tuple(m.replay))
            self._hold(key, h)
            log.debug("request %s: reserved %d positions on stage %d of decoder replica %d (epoch %d)", m.req,
                      m.tokens, ref.index, m.replica, m.epoch)
            h.timer = asyncio.get_running_loop().call_later(self.config.handoff_timeout_s, self._handoff_expired, key)
            if not layer_blocks(ref, self.num_layers):
                self._layers_complete(h)  # nothing of the prompt to receive here
            nxt = routes.next_stage(ref)
            if nxt is not None:
                fwd = Reserve(m.req, m.epoch, m.replica, nxt.index, m.tokens, m.prompt_len, m.entry, m.sampling,
                              m.seed, micro, m.replay)
                if not self.net.send(nxt.node, fwd):
                    self.free(m.req)
                    self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, False,
                                                    f"no link to stage {nxt.index} ({nxt.node[:12]})", "unreachable"))
            else:
                self.net.send(m.entry, Reserved(m.req, m.epoch, m.replica, True))

        self._submit(job, hi=True)

    def _hold(self, key: Key, h: _Held) -> None:
        first = not any(k[0] == h.req for k in self.held)
        self.held[key] = h
        if first:
            self.host.begin(h.epoch, h.req)

    def _handoff_expired(self, key: Key) -> None:
        h = self.held.get(key)
        if h is None or h.ready_sent:
            return
        log.warning("request %s: the prompt's KV did not arrive within %.0f s; freeing its reservation",
                    h.req, self.config.handoff_timeout_s)
        self._error(h.entry, h.req, "the KV hand-off did not complete in time", "handoff_timeout")
        self.free(h.req)

    def _ring(self, epoch: int, replica: int, routes: Routes) -> _Ring:
        ring = self.rings.get((epoch, replica))
        if ring is None:
            ring = self.rings[(epoch, replica)] = _Ring(epoch, replica, routes, self.config.max_batch)
        return ring

    # --- prefill ------------------------------------------------------------------------------------
    def _on_prefill(self, m: PrefillChunk) -> None:
        routes = self._routes(m.epoch)
        if routes is None:
            self._error(m.entry, m.req, f"epoch {m.epoch} is not loaded on {self.node_id[:12]}", "stale_epoch")
            return
        try:
            ref = self._my_stage(routes, m.replica, first_block=m.first_block)
            runner = self.host.runner(m.epoch, ref.first)
            if runner is None:
                raise PlanError(f"blocks [{ref.first}, {ref.end}) of epoch {m.epoch} are not loaded here")
            params = SamplingParams.from_dict(m.sampling)
            routes.replica(m.decoder)
            x = self._prefill_input(ref, m)
            if m.offset < 0 or m.offset + x.shape[0] > m.prompt_len:
                raise PlanError(f"chunk [{m.offset}, {m.offset + x.shape[0]}) outside a "
                                f"{m.prompt_len}-token prompt")
        except (MeshError, TypeError, ValueError) as e:
            self._error(m.entry, m.req, f"bad prefill frame: {e}", "bad_request")
            return
        key = (m.req, m.replica, ref.index)
        if m.decoder == m.replica and key not in self.held:
            self._error(m.entry, m.req, f"prefill of {m.req} on replica {m.replica}, which reserved nothing for it",
                        "bad_request")
            return
        # stage 0 gets the whole prompt and cuts it into chunks; later stages get one chunk a frame
        c = self.config.prefill_chunk
        cuts = [(a, min(a + c, x.shape[0])) for a in range(0, x.shape[0], c)] if ref.index == 0 else [(0, x.shape[0])]
        for a, b in cuts:
            last = m.last and b == x.shape[0]
            self.queued_prefill_tokens += b - a
            self._submit(self._prefill_job(routes, ref, runner, m, params, key, m.offset + a, x[a:b], last),
                         hi=False)

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

    def _prefill_job(self, routes: Routes, ref: StageRef, runner: Any, m: PrefillChunk, params: SamplingParams,
                     key: Key, offset: int, x: np.ndarray, last: bool) -> Callable[[], Awaitable[None]]:
        handoff = m.decoder != m.replica
        blocks = layer_blocks(ref, self.num_layers) if handoff else []
        kv_dtype = np.float16 if self.config.kv_wire_dtype == "float16" else np.float32

        async def job() -> None:
            self.queued_prefill_tokens -= x.shape[0]
            if handoff and offset == 0 and key not in self.held:
                try:
                    await self.host.call(_alloc, runner, m.req, m.prompt_len, None)
                except MeshError as e:
                    self._error(m.entry, m.req, f"prefill stage {ref.index}: {e}", "capacity")
                    return
                self._hold(key, _Held(m.req, m.epoch, m.replica, ref, runner, m.entry, False, m.prompt_len,
                                      params, m.seed, m.decoder))
            h = self.held.get(key)
            if h is None:
                return  # freed meanwhile (cancelled, or failed elsewhere)
            try:
                out, kvs = await self.host.call(_prefill, runner, m.req, x, blocks, offset, kv_dtype)
            except MeshError as e:
                self._error(m.entry, m.req, f"prefill failed on stage {ref.index}: {e}", "stage_error")
                self.free(m.req)
                return
            self.stats["prefill_tokens"] += x.shape[0]
            log.debug("request %s: prefilled tokens [%d, %d) on stage %d of replica %d", m.req, offset,
                      offset + x.shape[0], ref.index, m.replica)
            if key not in self.held:
                return
            # the prompt's KV to the decoder stages that own each layer
            for b, (k, v) in kvs.items():
                owner = routes.owner(m.decoder, b)
                step = chunk_tokens(k[0].nbytes * 2)
                for a in range(0, k.shape[0], step):
                    msg = KVChunk(m.req, m.epoch, m.decoder, b, offset + a, m.prompt_len,
                                  Tensor.from_array(k[a:a + step]), Tensor.from_array(v[a:a + step]))
                    self.stats["kv_out_bytes"] += k[a:a + step].nbytes * 2
                    if not await self.net.send_data(owner.node, msg):
                        self._error(m.entry, m.req, f"no link to decoder stage {owner.index} ({owner.node[:12]})",
                                    "unreachable")
                        self.free(m.req)
                        return
            nxt = routes.next_stage(ref)
            if nxt is not None:
                fwd = PrefillChunk(m.req, m.epoch, m.replica, nxt.first, offset, last, m.prompt_len, m.decoder,
                                   m.entry, m.sampling, m.seed, hidden=Tensor.from_array(out),
                                   forced=m.forced)
                if not await self.net.send_data(nxt.node, fwd):
                    self._error(m.entry, m.req, f"no link to prefill stage {nxt.index} ({nxt.node[:12]})",
                                "unreachable")
                    self.free(m.req)
                    return
            if not last:
                return
            if handoff:
                self._release(key)  # the prompt went on to the decoder; nothing more to do here
            else:
                self._layers_complete(h)
            if nxt is None:
                self._first_token(routes, m, params, np.asarray(out).reshape(-1))

        return job

    def _first_token(self, routes: Routes, m: PrefillChunk, params: SamplingParams, logits: np.ndarray) -> None:
        """The prefill replica's head: sample the token after the prompt, hand it to the decoder."""
        index = 0
        if m.forced >= 0:  # resumed: token 0 was streamed already; replay it
            tok = m.forced
        else:
            tok = sample_one(logits, params, token_rng(m.seed, index))
            reason = self._finish_reason(tok, index, params)
            self.net.send(m.entry, Token(m.req, tok, index, reason is not None, reason or ""))
            if reason is not None:
                return
        d0 = routes.stage(m.decoder, 0)
        if not self.net.send(d0.node, DecodeStart(m.req, m.epoch, m.decoder, tok, index)):
            self._error(m.entry, m.req, f"no link to the decoder's first stage ({d0.node[:12]})", "unreachable")

    def _finish_reason(self, tok: int, index: int, params: SamplingParams) -> str | None:
        if tok in self.eos and not params.ignore_eos:
            return FINISH_STOP
        if index + 1 >= params.max_tokens:
            return FINISH_LENGTH
        return None

    # --- KV hand-off (decoder stages) ------------------------------------------------------------
    def _on_kv(self, peer: str, m: KVChunk) -> None:
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
            return
        key = (m.req, m.replica, ref.index)
        h = self.held.get(key)
        if h is None or not h.decode:
            # KV never arrives unannounced: a stage keeps only what it reserved
            self.stats["unreserved_kv"] += 1
            log.warning("dropped KV from %s for %s: no reservation for it here", peer[:12], m.req)
            return
        self.stats["kv_in_bytes"] += k.nbytes + v.nbytes

        async def job() -> None:
            if self.held.get(key) is not h:
                return
            try:
                await self.host.call(_import, h.runner, m.req, m.block, k, v, m.offset)
            except MeshError as e:
                self._error(h.entry, m.req, f"KV import failed: {e}", "stage_error")
                self.free(m.req)
                return
            if m.offset + k.shape[0] == m.end:
                h.layers_done.add(m.block)
                if h.layers_done >= set(layer_blocks(h.stage, self.num_layers)):
                    self._layers_complete(h)

        self._submit(job, hi=True)

    def _layers_complete(self, h: _Held) -> None:
        if h.ready_sent:
            return
        h.ready_sent = True
        if h.timer is not None:
            h.timer.cancel()
            h.timer = None
        routes = self.routes_for(h.epoch)
        if routes is None:
            return
        d0 = routes.stage(h.replica, 0)
        if not self.net.send(d0.node, KVReady(RequestId(h.req), h.epoch, h.replica, h.stage.index)):
            self._error(h.entry, h.req, f"no link to the decoder's first stage ({d0.node[:12]})", "unreachable")
            self.free(h.req)

    # --- the decode ring (stage 0) ---------------------------------------------------------------
    def _member(self, epoch: int, replica: int, req: str) -> tuple[_Ring, _Member] | None:
        ring = self.rings.get((epoch, replica))
        if ring is None:
            return None
        mem = ring.members.get(req)
        return None if mem is None else (ring, mem)

    def _on_kv_ready(self, m: KVReady) -> None:
        found = self._member(m.epoch, m.replica, m.req)
        if found is None:
            return
        ring, mem = found
        mem.ready.add(m.stage)
        self._maybe_join(ring, mem)

    def _on_decode_start(self, m: DecodeStart) -> None:
        found = self._member(m.epoch, m.replica, m.req)
        if found is None:
            self.stats["stale"] += 1
            return
        ring, mem = found
        mem.token, mem.index = (mem.replay[0] if mem.replay else m.token), m.index
        self._maybe_join(ring, mem)

    def _maybe_join(self, ring: _Ring, mem: _Member) -> None:
        if mem.started or mem.token < 0 or len(mem.ready) < len(ring.stages):
            return
        mem.started = True
        ring.micro[mem.micro].append(mem.req)
        self._launch(ring, mem.micro)

    def _launch(self, ring: _Ring, micro: int) -> None:
        if ring.busy[micro] or not ring.micro[micro] or self.closed:
            return
        ring.busy[micro] = True
        self._submit(lambda: self._ring_step(ring, micro), hi=True)

    async def _ring_step(self, ring: _Ring, micro: int) -> None:
        reqs = [r for r in ring.micro[micro] if r in ring.members]
        if not reqs or self.rings.get((ring.epoch, ring.replica)) is not ring:
            ring.busy[micro] = False
            return
        s0 = ring.stages[0]
        h0 = self.held.get((reqs[0], ring.replica, 0))
        runner = h0.runner if h0 is not None else self.host.runner(ring.epoch, s0.first)
        tokens = np.array([ring.members[r].token for r in reqs], dtype=np.int64)
        indexes = tuple(ring.members[r].index for r in reqs)
        ring.inflight[micro] = reqs
        try:
            out, ok, errors = await self.host.call(_decode, runner, reqs, tokens, self.stats)
        except MeshError as e:  # the whole step failed: every request of the micro-batch fails
            for r in reqs:
                self._fail_member(ring, r, f"decode step failed: {e}")
            ring.busy[micro] = False
            return
        ring.steps += 1
        self._row_errors(errors)
        okreqs = [reqs[i] for i in ok]
        okidx = tuple(indexes[i] for i in ok)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(ok)
        nxt = ring.routes.next_stage(s0)
        if not okreqs:
            self._ring_tokens(ring, micro, [], [], [])
            return
        if nxt is None:  # stage 0 holds the head too: sample here
            toks, done = self._sample_rows(ring.epoch, ring.replica, 0, okreqs, okidx, out)
            self._ring_tokens(ring, micro, okreqs, toks, done)
            return
        msg = DecodeBatch(ring.epoch, ring.replica, micro, nxt.first, tuple(RequestId(r) for r in okreqs), okidx,
                          Tensor.from_array(out))
        if not await self.net.send_data(nxt.node, msg):
            for r in okreqs:
                self._fail_member(ring, r, f"no link to decoder stage {nxt.index} ({nxt.node[:12]})")
            ring.busy[micro] = False

    def _row_errors(self, errors: dict[Any, MeshError]) -> None:
        for r, e in errors.items():
            keys = [k for k in self.held if k[0] == r]
            if not keys:
                continue  # freed meanwhile: nothing to report
            h = self.held[keys[0]]
            self._error(h.entry, r, f"decode failed: {e}", "stage_error")
            self.free(r)

    def _fail_member(self, ring: _Ring, req: str, why: str) -> None:
        mem = ring.members.get(req)
        if mem is not None:
            self._error(mem.entry, req, why, "stage_error")
        self.free(req)

    def _on_token_batch(self, m: TokenBatch) -> None:
        ring = self.rings.get((m.epoch, m.replica))
        if ring is None or not 0 <= m.micro < ring.nmicro:
            self.stats["stale"] += 1
            return
        if not (len(m.reqs) == len(m.tokens) == len(m.done)):
            log.warning("dropped a malformed token batch (%d reqs, %d tokens)", len(m.reqs), len(m.tokens))
            return
        self._ring_tokens(ring, m.micro, list(m.reqs), list(m.tokens), list(m.done))

    def _ring_tokens(self, ring: _Ring, micro: int, reqs: list[str], tokens: list[int], done: list[bool]) -> None:
        got = set(reqs)
        for r in ring.inflight[micro]:
            if r not in got and r in ring.members:
                ring.remove(r)  # dropped on the way (freed, or failed and reported by that stage)
                self._release_req(r)
        ring.inflight[micro] = []
        for r, t, d in zip(reqs, tokens, done, strict=True):
            mem = ring.members.get(r)
            if mem is None:
                continue
            if d:
                ring.remove(r)
                self._release_req(r)
            else:
                mem.token = int(t)
                mem.index += 1
        ring.busy[micro] = False
        self._launch(ring, micro)

    # --- later decoder stages --------------------------------------------------------------------
    def _on_decode_batch(self, m: DecodeBatch) -> None:
        routes = self._routes(m.epoch)
        try:
            if routes is None:
                raise PlanError(f"epoch {m.epoch} is not loaded here")
            ref = self._my_stage(routes, m.replica, first_block=m.first_block)
            runner = self.host.runner(m.epoch, ref.first)
            x = m.hidden.array()
            if x.ndim != 2 or x.shape != (len(m.reqs), self.hidden_size) or len(m.indexes) != len(m.reqs):
                raise PlanError(f"hidden {x.shape} for {len(m.reqs)} requests")
            if runner is None:
                raise PlanError("blocks not loaded")
        except (MeshError, TypeError, ValueError) as e:
            log.warning("dropped a decode batch: %s", e)
            return
        d0 = routes.stage(m.replica, 0)

        async def job() -> None:
            try:
                out, ok, errors = await self.host.call(_decode, runner, list(m.reqs), x, self.stats)
            except MeshError as e:
                for r in m.reqs:
                    h = self.held.get((r, m.replica, ref.index))
                    if h is not None:
                        self._error(h.entry, r, f"decode step failed on stage {ref.index}: {e}", "stage_error")
                        self.free(r)
                self.net.send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), ()))
                return
            self._row_errors(errors)
            okreqs = [m.reqs[i] for i in ok]
            okidx = tuple(m.indexes[i] for i in ok)
            nxt = routes.next_stage(ref)
            if not okreqs:
                self.net.send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), ()))
                return
            if nxt is None:
                toks, done = self._sample_rows(m.epoch, m.replica, ref.index, okreqs, okidx, out)
                self.net.send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, tuple(okreqs), tuple(toks),
                                                  tuple(done)))
                for r, d in zip(okreqs, done, strict=True):
                    if d:
                        self._release((r, m.replica, ref.index))
                return
            fwd = DecodeBatch(m.epoch, m.replica, m.micro, nxt.first, tuple(okreqs), okidx, Tensor.from_array(out))
            if not await self.net.send_data(nxt.node, fwd):
                for r in okreqs:
                    h = self.held.get((r, m.replica, ref.index))
                    if h is not None:
                        self._error(h.entry, r, f"no link to decoder stage {nxt.index}", "unreachable")
                        self.free(r)
                self.net.send(d0.node, TokenBatch(m.epoch, m.replica, m.micro, (), (), ()))

        self._submit(job, hi=True)

    def _sample_rows(self, epoch: int, replica: int, stage: int, reqs: list[str], indexes: tuple[int, ...],
                     logits: np.ndarray) -> tuple[list[int], list[bool]]:
        """The head of a decoder replica: sample each row's next token, send it to its entry."""
        toks, done = [], []
        for i, r in enumerate(reqs):
            h = self.held.get((r, replica, stage))
            if h is None or h.params is None:
                toks.append(-1)
                done.append(True)
                continue
            index = indexes[i] + 1
            if index < len(h.replay):  # resumed: this token was streamed before; feed it again
                toks.append(h.replay[index])
                done.append(False)
                continue
            tok = sample_one(logits[i], h.params, token_rng(h.seed, index))
            reason = self._finish_reason(tok, index, h.params)
            self.net.send(h.entry, Token(RequestId(r), tok, index, reason is not None, reason or ""))
            toks.append(tok)
            done.append(reason is not None)
        return toks, done

    # --- freeing ----------------------------------------------------------------------------------
    def free(self, req: str) -> None:
        """Release everything this node holds for ``req`` (idempotent)."""
        for ring in self.rings.values():
            if req in ring.members:
                ring.remove(req)
        self._release_req(req)

    def _release_req(self, req: str) -> None:
        for key in [k for k in self.held if k[0] == req]:
            self._release(key)

    def _release(self, key: Key) -> None:
        h = self.held.pop(key, None)
        if h is None:
            return
        log.debug("request %s: released on stage %d of replica %d", h.req, h.stage.index, h.replica,
                  extra={"request_id": h.req})
        if h.timer is not None:
            h.timer.cancel()
        runner = h.runner

        async def job() -> None:
            with contextlib.suppress(MeshError):
                await self.host.call(runner.free, h.req)

        if not self.closed:
            self._submit(job, hi=True)
        if not any(k[0] == h.req for k in self.held):
            self.host.end(h.epoch, h.req)

    def fail_peer(self, peer: str) -> None:
        """A link went down: whatever depends on ``peer`` cannot complete."""
        for key, h in list(self.held.items()):
            if key not in self.held:
                continue
            routes = self.routes_for(h.epoch)
            nodes: set[str] = set()
            if routes is not None:
                with contextlib.suppress(PlanError):
                    nodes = routes.nodes(h.replica) | (routes.nodes(h.decoder) if h.decoder >= 0 else set())
            if h.entry == peer:
                self.free(h.req)
            elif peer in nodes:
                self._error(h.entry, h.req, f"node {peer[:12]} of its replica is gone", "node_lost")
                self.free(h.req)
        for ring in self.rings.values():
            if peer in ring.routes.nodes(ring.replica):
                for r in list(ring.members):
                    self._fail_member(ring, r, f"node {peer[:12]} of the decoder replica is gone")

    def fail_epoch(self, epoch: int) -> None:
        """An epoch is being unloaded: fail whatever of it is still here."""
        for key, h in list(self.held.items()):
            if h.epoch == epoch and key in self.held:
                self._error(h.entry, h.req, f"plan epoch {epoch} was unloaded before the request finished",
                            "epoch_unloaded")
                self.free(h.req)
        for k in [k for k in self.rings if k[0] == epoch]:
            del self.rings[k]

    # --- load -------------------------------------------------------------------------------------
    def load_reports(self) -> list[LoadReport]:
        out = []
        for (epoch, replica), ring in self.rings.items():
            runner = self.host.runner(epoch, ring.stages[0].first)
            kv = getattr(runner, "kv", None)
            free_tokens = -1
            if kv is not None and kv.budget is not None and kv.bytes_per_token:
                free_tokens = max(0, (kv.budget - kv.reserved)) // kv.bytes_per_token
            out.append(LoadReport(NodeId(self.node_id), epoch, replica,
                                  {"decoding": len(ring.members),
                                   "started": sum(len(x) for x in ring.micro),
                                   "max_batch": ring.max_batch, "free_tokens": int(free_tokens),
                                   "steps": ring.steps}))
        return out

    def view(self) -> dict[str, Any]:
        return {"held": len(self.held), "rings": {f"{e}/{r}": len(g.members) for (e, r), g in self.rings.items()},
                "queued_jobs": len(self._hi) + len(self._lo), "queued_prefill_tokens": self.queued_prefill_tokens,
                **self.stats}


# --- what runs on the inference thread -------------------------------------------------------------

def _alloc(runner: Any, req: str, tokens: int, group: int | None) -> None:
    if group is None or group < 0:
        runner.alloc(req, tokens)
    else:
        runner.alloc(req, tokens, group=group)


def _prefill(runner: Any, req: str, x: np.ndarray, blocks: list[int], offset: int,
             kv_dtype: type) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    out = np.array(runner.prefill(req, x, last_only=True), copy=True)
    kvs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for b in blocks:
        k, v = runner.kv_export(req, b, offset, offset + x.shape[0])
        kvs[b] = (np.ascontiguousarray(k, dtype=kv_dtype), np.ascontiguousarray(v, dtype=kv_dtype))
    return out, kvs


def _import(runner: Any, req: str, block: int, k: np.ndarray, v: np.ndarray, start: int) -> None:
    runner.kv_import(req, block, k, v, start=start)


def _decode(runner: Any, reqs: list[str], x: np.ndarray, stats: dict[str, Any]) -> tuple[np.ndarray, list[int],
                                                                                         dict[Any, MeshError]]:
    t0 = time.perf_counter()
    out, ok, errors = runner.decode_rows(reqs, x)
    stats["decode_compute_s"] += time.perf_counter() - t0  # this stage's share of a token's time
    stats["decode_calls"] += 1
    return np.array(out, copy=True), list(ok), dict(errors)
