"""The entry side of serving: a node that accepted a prompt and streams its answer back.

For each request the entry checks the limits (prompt, context, max_tokens, queue), picks a prefill
and a decoder replica from the active plan (``router.Router``), asks the decoder for KV room
(``Reserve``; a refusal moves on to the next decoder, or waits for room, or answers 503), sends the
prompt to the prefill replica's first stage and then collects the tokens (``Token``) in index
order — the prefill replica's head sends token 0, the decoder's head the rest. It applies stop
strings (it holds the tokenizer), and when the request ends for any reason — EOS, max_tokens, a
stop string, the client going away, an error — it tells every node of both replicas to free it.

Faults: a link to a node of either replica going down, an ``Error`` from a stage, or no token for
``stall_timeout_s`` ends the current attempt; the entry resumes the request on an intact replica
from its prompt plus the tokens streamed so far (token i's randomness depends only on the seed
and i, so the client sees the same tokens), at most ``max_migrations`` times, and otherwise ends it
with an explicit error event. It never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshllm.errors import CapacityError, ContextLengthError, MeshError, UserError
from meshllm.model.tokenizer import StreamDecoder, Tokenizer
from meshllm.obs.logs import spawn
from meshllm.obs.metrics import RequestMetrics
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.messenger import Messenger
from meshllm.serve.router import Router
from meshllm.serve.routes import Routes
from meshllm.wire.ids import NodeId, RequestId
from meshllm.wire.messages import Error, Free, LoadReport, Message, PrefillChunk, Reserve, Reserved, Token
from meshllm.wire.tensor import Tensor

log = logging.getLogger("meshllm.serve.entry")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# attempt failures worth another replica (a bad request or a bad token is not)
RETRYABLE = frozenset({"node_lost", "unreachable", "stage_error", "handoff_timeout", "stalled", "epoch_unloaded", "stale_epoch",
                       "capacity", "timeout"})


class QueueFull(CapacityError):
    """The entry holds as many requests as it may (HTTP 429)."""


class NotReady(MeshError):
    """No active plan, or no replica can take the request now (HTTP 503)."""


class RequestFailed(MeshError):
    """A request that was accepted could not complete (a stage failed, a node was lost)."""

    def __init__(self, message: str, code: str = "stage_error") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Event:
    """One generated token (text: what it releases, "" while held back for a stop string), or the
    end: ``finish_reason`` set on the last event, ``error`` set when the request failed."""

    token_id: int | None
    text: str
    index: int
    finish_reason: str | None = None
    error: str | None = None
    code: str = ""


@dataclass(frozen=True, slots=True)
class Finished:
    """A request as it ended, for observers (``Entry.finished_hooks``; the dashboard's figures).
    Times are the event loop's: arrival, prompt sent to the prefill replica (the end of its wait),
    first token, end. Replica ids are -1 where it never got one."""

    epoch: int
    prefill: int
    decode: int
    prompt_tokens: int
    tokens: int
    t_start: float
    t_sent: float | None
    t_first: float | None
    t_end: float
    outcome: str  # completed | failed | cancelled


@dataclass(slots=True)
class _Request:
    id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    decoder: StreamDecoder | None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    epoch: int = 0
    prefill: int = -1
    decode: int = -1
    nodes: set[str] = field(default_factory=set)
    reserved: asyncio.Future[tuple[bool, str, str]] | None = None
    next_index: int = 0
    pending: dict[int, Token] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    last_progress: float = 0.0
    t_start: float = 0.0
    t_first: float | None = None
    t_sent: float | None = None  # the prompt first went to a prefill replica
    fault: tuple[str, str] | None = None  # (message, code): the current attempt failed
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    migrations: int = 0
    reserve_epoch: int = 0

    @property
    def sent(self) -> bool:
        """The prompt went to a prefill replica once (the end of its waiting time)."""
        return self.t_sent is not None


class Entry:
    def __init__(self, node_id: str, messenger: Messenger, config: ServeConfig, *, vocab_size: int,
                 max_position: int, tokenizer: Tokenizer | None, eos_ids: Sequence[int],
                 active: Callable[[], tuple[int, Routes] | None], router: Router,
                 observe: Callable[[int, int], None] | None = None,
                 links: Callable[[], list[str]] | None = None, metrics: RequestMetrics | None = None,
                 name: str = "") -> None:
        self.node_id = node_id
        self.name = name or node_id[:8]  # the node in log lines about its requests
        self.metrics = metrics if metrics is not None else RequestMetrics()
        self.net = messenger
        self.config = config
        self.vocab_size = vocab_size
        self.max_position = max_position
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.active = active  # the active epoch and its routes, or None
        self.router = router
        self.observe = observe
        self.links = links  # the peers with a link up (None: assume all)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()
        self._room = asyncio.Event()  # set whenever a decoder may have room again
        self.finished_hooks: list[Callable[[Finished], None]] = []  # every request that ends
        self.stats = {"accepted": 0, "completed": 0, "failed": 0, "rejected_429": 0, "rejected_503": 0,
                      "cancelled": 0, "tokens": 0, "migrations": 0, "prompt_tokens": 0}

    # --- checks -----------------------------------------------------------------------------------
    def check(self, prompt: Sequence[int], params: SamplingParams) -> tuple[int, ...]:
        if len(prompt) == 0:
            raise UserError("the prompt is empty: need at least one token")
        ids = tuple(int(i) for i in prompt)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) + params.max_tokens > self.max_position:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens plus max_tokens {params.max_tokens} exceeds the model's context "
                f"of {self.max_position} tokens (shorten the prompt or lower max_tokens to "
                f"{max(self.max_position - len(ids), 0)})")
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer (this model has none)")
        return ids

    def new_request_id(self, client: str | None = None) -> str:
        """A request id unique in the mesh: this entry's random prefix and a counter, after the
        client's own id when it sent one (``X-Request-Id``), so a client's id can be found in every
        node's log while two clients choosing the same id never share a request on a stage."""
        own = f"{self._prefix}-{next(self._ids)}"
        return f"{client}.{own}" if client else own

    # --- the public call ----------------------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], params: SamplingParams, *, seed: int | None = None,
                       request_id: str | None = None) -> AsyncIterator[Event]:
        """Stream one request's events; the last has ``finish_reason`` or ``error``. Raises before the
        first event for bad input (UserError), a full queue (QueueFull) or no plan (NotReady).
        Closing the iterator early cancels the request everywhere."""
        try:
            ids = self.check(prompt, params)
        except UserError as e:
            self.metrics.rejected("context_length" if isinstance(e, ContextLengthError) else "invalid")
            raise
        if len(self.requests) >= self.config.max_queue:
            self.stats["rejected_429"] += 1
            self.metrics.rejected("queue_full")
            raise QueueFull(f"this node holds {len(self.requests)} requests, its limit; retry later")
        if self.active() is None:
            self.stats["rejected_503"] += 1
            self.metrics.rejected("unavailable")
            raise NotReady("the mesh has no active plan yet")
        if request_id is not None and request_id in self.requests:
            self.metrics.rejected("invalid")
            raise UserError(f"request id {request_id!r} is already in use at this node")
        if seed is None:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        rid = request_id or self.new_request_id()
        dec = self.tokenizer.stream(stop=params.stop, prompt_ids=ids) if self.tokenizer is not None else None
        loop = asyncio.get_running_loop()
        r = _Request(rid, ids, params, int(seed), dec, t_start=loop.time(), last_progress=loop.time())
        self.requests[rid] = r
        self.stats["accepted"] += 1
        self.stats["prompt_tokens"] += len(ids)
        # the request's task logs with its id and this node, wherever generate() was called from
        runner = spawn(self._drive(r), node=self.name, request_id=rid)
        try:
            while True:
                ev = await r.events.get()
                yield ev
                if ev.finish_reason is not None or ev.error is not None:
                    return
        finally:
            if not r.done:
                self.stats["cancelled"] += 1
                self.metrics.cancelled()
                log.info("request %s cancelled by the client after %d tokens", rid, len(r.tokens),
                         extra={"request_id": rid, "node": self.name})
                self._finish(r, None, "cancelled")
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner

    # --- one request --------------------------------------------------------------------------------
    async def _drive(self, r: _Request) -> None:
        while True:
            try:
                await self._admit(r)
                self._send_prompt(r)
                await self._watch(r)
                return
            except asyncio.CancelledError:
                raise
            except RequestFailed as e:
                if e.code in RETRYABLE and r.migrations < self.config.max_migrations and not r.done:
                    self._migrate(r, str(e), e.code)
                    continue
                self._fail(r, str(e), e.code)
            except NotReady as e:
                self.stats["rejected_503"] += 1
                self._fail(r, str(e), "unavailable")
            except MeshError as e:
                self._fail(r, str(e), "error")
            return

    def _migrate(self, r: _Request, why: str, code: str) -> None:
        """The replica serving ``r`` failed: free what is left of it and start over elsewhere from
        the prompt and the tokens streamed so far (the client sees the stream go on). Token i's
        randomness depends only on (seed, i), so the new replica samples what the old one would."""
        r.migrations += 1
        self.stats["migrations"] += 1
        log.warning("request %s: %s (%s); resuming at token %d elsewhere (migration %d)", r.id, why, code,
                    r.next_index, r.migrations)
        self._free_everywhere(r, r.nodes, r.epoch)
        r.fault = None
        r.wake.clear()
        r.pending.clear()
        r.nodes = set()
        r.prefill = r.decode = -1
        r.last_progress = asyncio.get_running_loop().time()

    async def _admit(self, r: _Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.queue_timeout_s
        # a request waits for an intact replica while the mesh re-plans around a lost node: new
        # ones as long as they may queue, a resumed one for migrate_wait_s; then an explicit error
        intact_by = loop.time() + (self.config.migrate_wait_s if r.migrations else self.config.queue_timeout_s)
        while True:
            act = self.active()
            if act is None:
                raise NotReady("the mesh has no active plan")
            epoch, routes = act
            pairs = [(p, d) for p, d in self.router.rank(routes, len(r.prompt), r.params.max_tokens)
                     if self.reachable(routes.nodes(p) | routes.nodes(d))]
            if not pairs:
                if loop.time() >= intact_by:
                    raise NotReady("no intact replica left to serve the request" if r.migrations
                                   else "the active plan has no replica that can serve a request")
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), min(0.2, intact_by - loop.time()))
                continue
            tried: set[int] = set()
            last_error = ""
            for p, d in pairs:
                if d in tried:
                    continue
                tried.add(d)
                ok, code, err = await self._reserve(r, epoch, routes, d)
                if ok:
                    r.epoch, r.prefill, r.decode = epoch, p, d
                    self.router.admitted(epoch, d)
                    r.nodes = routes.nodes(p) | routes.nodes(d)
                    return
                self._free_everywhere(r, routes.nodes(d), epoch)
                last_error = err
                if code not in ("capacity", "unreachable", "stale_epoch", "timeout"):
                    raise RequestFailed(err, code or "error")
            # every decoder refused for room: wait until one may have some, up to the deadline
            self._room.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise NotReady(f"no decoder replica has room for the request ({last_error})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), min(left, 1.0))

    async def _reserve(self, r: _Request, epoch: int, routes: Routes, d: int) -> tuple[bool, str, str]:
        loop = asyncio.get_running_loop()
        r.reserved = loop.create_future()
        d0 = routes.stage(d, 0)
        # a resumed request prefills its original prompt again and replays the tokens streamed so
        # far through the decoder's steps: the same arithmetic as the first time, so the same tokens
        msg = Reserve(RequestId(r.id), epoch, d, 0, len(r.prompt) + r.params.max_tokens, len(r.prompt),
                      NodeId(self.node_id), r.params.to_dict(), r.seed, -1, tuple(r.tokens))
        r.decode = d
        r.reserve_epoch = epoch
        r.nodes = routes.nodes(d)
        if not self.net.send(d0.node, msg):
            return False, "unreachable", f"no link to decoder replica {d}'s first stage"
        try:
            return await asyncio.wait_for(r.reserved, self.config.reserve_timeout_s)
        except TimeoutError:
            return False, "timeout", f"decoder replica {d} did not answer the admission request"
        finally:
            r.reserved = None

    def _send_prompt(self, r: _Request) -> None:
        act = self.active()
        routes = self._routes_of(r, act)
        p0 = routes.stage(r.prefill, 0)
        ids = np.asarray(r.prompt, dtype=np.int64)
        msg = PrefillChunk(RequestId(r.id), r.epoch, r.prefill, p0.first, 0, True, len(ids), r.decode,
                           NodeId(self.node_id), r.params.to_dict(), r.seed, ids=Tensor.from_array(ids),
                           forced=r.tokens[0] if r.tokens else -1)
        r.last_progress = asyncio.get_running_loop().time()
        if r.t_sent is None:
            r.t_sent = r.last_progress
            self.metrics.waited(r.last_progress - r.t_start)
        log.debug("request %s: %d prompt tokens to prefill replica %d, decoder replica %d (epoch %d)", r.id,
                  len(r.prompt), r.prefill, r.decode, r.epoch)
        if not self.net.send(p0.node, msg):
            raise RequestFailed(f"no link to prefill replica {r.prefill}'s first stage", "unreachable")

    def _routes_of(self, r: _Request, act: tuple[int, Routes] | None) -> Routes:
        if act is not None and act[0] == r.epoch:
            return act[1]
        routes = self.router.routes_for(r.epoch)
        if routes is None:
            raise RequestFailed(f"plan epoch {r.epoch} is gone", "epoch_unloaded")
        return routes

    async def _watch(self, r: _Request) -> None:
        """Until the request ends: raise when its attempt failed (a stage's error, a node lost) or
        when nothing arrived for ``stall_timeout_s``."""
        loop = asyncio.get_running_loop()
        while not r.done:
            if r.fault is not None:
                raise RequestFailed(*r.fault)
            left = r.last_progress + self.config.stall_timeout_s - loop.time()
            if left <= 0:
                raise RequestFailed(f"no token for {self.config.stall_timeout_s:.0f} s", "stalled")
            r.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(r.wake.wait(), min(left, 1.0))

    def _fault(self, r: _Request, message: str, code: str) -> None:
        if r.done or r.fault is not None:
            return
        r.fault = (message, code)
        r.wake.set()

    def reachable(self, nodes: set[str]) -> bool:
        """Every node is this one or has a link up (a replica with a lost node is not routed to)."""
        if self.links is None:
            return True
        up = set(self.links())
        return all(n == self.node_id or n in up for n in nodes)

    # --- messages for the entry ------------------------------------------------------------------
    def handle(self, peer: str, msg: Message) -> None:
        if isinstance(msg, Token):
            self._on_token(msg)
        elif isinstance(msg, Reserved):
            r = self.requests.get(msg.req)
            if (r is not None and r.reserved is not None and not r.reserved.done() and msg.replica == r.decode
                    and msg.epoch == r.reserve_epoch):
                r.reserved.set_result((msg.ok, msg.code, msg.error))
        elif isinstance(msg, Error):
            r = self.requests.get(msg.req)
            if r is not None and not r.done:
                if r.reserved is not None and not r.reserved.done():
                    r.reserved.set_result((False, msg.code or "error", msg.message))
                else:
                    self._fault(r, msg.message, msg.code or "stage_error")
        elif isinstance(msg, LoadReport):
            self.router.report(msg)
            self._room.set()

    def _on_token(self, m: Token) -> None:
        r = self.requests.get(m.req)
        if r is None or r.done or m.index < r.next_index or m.index in r.pending:
            return
        r.pending[m.index] = m
        loop = asyncio.get_running_loop()
        r.last_progress = loop.time()
        while r.next_index in r.pending and not r.done:
            t = r.pending.pop(r.next_index)
            r.next_index += 1
            if not 0 <= t.token < self.vocab_size:
                self._fault(r, f"a stage sent token id {t.token}, outside the vocabulary", "bad_token")
                return
            if r.t_first is None:
                r.t_first = loop.time()
                self.metrics.first_token(r.t_first - r.t_start)
            if t.index == 0:
                # the prefill replica's head sent this one: the prompt is on the decoder now, so
                # only the decoder's nodes can still fail the request
                act = self.router.routes_for(r.epoch)
                if act is not None and r.decode >= 0:
                    r.nodes = act.nodes(r.decode)
            r.tokens.append(t.token)
            self.stats["tokens"] += 1
            text = r.decoder.push(t.token) if r.decoder is not None else ""
            reason: str | None = t.reason or None if t.finished else None
            if r.decoder is not None and r.decoder.stopped:
                reason = FINISH_STOP
            elif reason is None and len(r.tokens) >= r.params.max_tokens:
                reason = FINISH_LENGTH
            if reason is not None and r.decoder is not None:
                text += r.decoder.finish()
            r.events.put_nowait(Event(t.token, text, t.index, reason))
            if reason is not None:
                self._finish(r, reason)

    # --- ending ---------------------------------------------------------------------------------------
    def _finish(self, r: _Request, reason: str | None, outcome: str = "completed") -> None:
        if r.done:
            return
        r.done = True
        r.wake.set()
        self.requests.pop(r.id, None)
        self._free_everywhere(r, r.nodes, r.epoch)
        self._room.set()
        if reason is not None:
            self.stats["completed"] += 1
            end = asyncio.get_running_loop().time()
            first = None if r.t_first is None else r.t_first - r.t_start
            self.metrics.finished(reason, duration_s=end - r.t_start, first_s=first, tokens=len(r.tokens))
            log.info("request %s finished (%s): %d prompt + %d tokens in %.3f s, first token after %.3f s", r.id,
                     reason, len(r.prompt), len(r.tokens), end - r.t_start, first or 0.0,
                     extra={"request_id": r.id, "node": self.name})
            if self.observe is not None:
                with contextlib.suppress(Exception):
                    self.observe(len(r.prompt), len(r.tokens))
            self.router.finished(r.epoch, r.prefill, (r.t_first or r.t_start) - r.t_start)
        if self.finished_hooks:
            rec = Finished(r.epoch, r.prefill, r.decode, len(r.prompt), len(r.tokens), r.t_start, r.t_sent,
                           r.t_first, asyncio.get_running_loop().time(), outcome if reason is None else "completed")
            for hook in list(self.finished_hooks):
                try:
                    hook(rec)
                except Exception:  # an observer's bug must not break serving
                    log.exception("a finished-request hook failed")

    def _fail(self, r: _Request, message: str, code: str) -> None:
        if r.done:
            return
        self.stats["failed"] += 1
        self.metrics.failed(code)
        log.warning("request %s failed: %s", r.id, message)
        r.events.put_nowait(Event(None, "", r.next_index, None, message, code))
        self._finish(r, None, "failed")
        r.wake.set()

    def _free_everywhere(self, r: _Request, nodes: set[str], epoch: int) -> None:
        for n in nodes:
            self.net.send(n, Free(RequestId(r.id), epoch, "done"))

    def fail_peer(self, peer: str) -> None:
        for r in list(self.requests.values()):
            if peer in r.nodes and not r.done:
                if r.reserved is not None and not r.reserved.done():
                    r.reserved.set_result((False, "unreachable", f"node {peer[:12]} went away"))
                else:
                    self._fault(r, f"node {peer[:12]} serving the request went away", "node_lost")

    def view(self) -> dict[str, Any]:
        return {"requests": len(self.requests), **self.stats}
