"""The entry's serving core, sans-IO: a request from acceptance to its last token.

``EntryCore`` takes requests (``submit``), frames (``step``), cancels, lost links and time
(``tick``), and returns outputs: frames to send, events for a request's client, and the record of
a request that ended. Its only state is the ``Request`` records (``serve/request.py``: one status,
one table of transitions); the router it ranks replicas with is pure too.

For each request it picks a prefill and a decoder replica (``router.Router``), asks the decoder for
KV room (``Reserve``: each try is a new *attempt*), sends the prompt to the prefill replica once the
room is reserved, and then collects tokens in index order, applying stop strings. A refusal moves
on to the next decoder; when all refused, the request waits for room (a load report or a finished
request wakes it) up to ``queue_timeout_s``; when every decoder says the request can never fit, it
ends at once with ``too_large`` (an HTTP 400). Frames of any attempt but the current one are
dropped and counted, so nothing of a failed attempt lands on the next.

Faults — a lost link to a node of the attempt, an ``Error`` from a stage, no progress (a
prefilled chunk, a token) within the stall window — end the attempt; the request resumes on an
intact replica from its prompt plus the tokens streamed so far (token i's randomness depends only
on the seed and i, so the client sees the same tokens), at most ``max_migrations`` times, and
otherwise ends with an explicit error. It never hangs: every status has a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm.errors import CapacityError, ContextLengthError, MeshError, PlanError, UserError
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.request import FINISH_LENGTH, FINISH_STOP, RETRYABLE, Finish, Request, Status
from meshllm.serve.router import Router
from meshllm.serve.routes import Routes
from meshllm.serve.stagecore import INF, Send
from meshllm.wire.ids import NodeId, RequestId
from meshllm.wire.messages import (
    Error,
    Free,
    LoadReport,
    Message,
    PrefillChunk,
    Progress,
    Reserve,
    Reserved,
    Token,
)
from meshllm.wire.tensor import Tensor

log = logging.getLogger("meshllm.serve.entry")

WAIT_RETRY_S = 0.2  # a waiting request looks again this often even without a room event
ROOM_RETRY_S = 1.0


class QueueFull(CapacityError):
    """The entry holds as many requests as it may (HTTP 429)."""


class NotReady(MeshError):
    """No active plan, or no replica can take the request now (HTTP 503)."""


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
    # when asked for (``SamplingParams.logprobs``): the token's logprob and the likeliest tokens'
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # on the first event of a request that asked for its prompt's logprobs: one (logprob, top)
    # per prompt token after the first
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None


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
    t_sent: float | None  # the prefill began (the prompt's send plus its wait at the first stage)
    t_first: float | None
    t_end: float
    outcome: str  # completed | failed | cancelled


# --- outputs besides Send ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Emit:
    req: str
    event: Event


@dataclass(frozen=True, slots=True)
class Waited:
    """The request's prompt went to a prefill replica for the first time after ``seconds``."""

    req: str
    seconds: float


@dataclass(frozen=True, slots=True)
class FirstToken:
    req: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Ended:
    request: Request
    finished: Finished


EntryOutput = Send | Emit | Waited | FirstToken | Ended


def _stats() -> dict[str, Any]:
    return {"accepted": 0, "completed": 0, "failed": 0, "rejected_429": 0, "rejected_503": 0, "cancelled": 0,
            "tokens": 0, "migrations": 0, "prompt_tokens": 0, "stale_frames": 0, "too_large": 0,
            "busy": 0}


class EntryCore:
    def __init__(self, node_id: str, config: ServeConfig, *, vocab_size: int, max_position: int,
                 eos_ids: Sequence[int], router: Router, active: Callable[[], tuple[int, Routes] | None],
                 usable_peers: Callable[[], Sequence[str]] | None = None, has_tokenizer: bool = True) -> None:
        self.node_id = node_id
        self.config = config
        self.vocab_size = vocab_size
        self.max_position = max_position
        self.eos_ids = tuple(eos_ids)
        self.router = router
        self.active = active  # the active epoch and its routes, or None
        self.usable_peers = usable_peers  # the peers with a link up (None: assume all)
        self.has_tokenizer = has_tokenizer
        self.requests: dict[str, Request] = {}
        self.stats = _stats()
        self._out: list[EntryOutput] = []

    # --- acceptance --------------------------------------------------------------------------------------
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
        if params.stop and not self.has_tokenizer:
            raise UserError("stop strings need a tokenizer (this model has none)")
        return ids

    def submit(self, rid: str, ids: tuple[int, ...], params: SamplingParams, seed: int, decoder: Any,
               now: float, *, prompt_logprobs: bool = False) -> list[EntryOutput]:
        """Accept a checked request (raises QueueFull, NotReady or UserError instead)."""
        if len(self.requests) >= self.config.max_queue:
            self.stats["rejected_429"] += 1
            raise QueueFull(f"this node holds {len(self.requests)} requests, its limit; retry later")
        if self.active() is None:
            self.stats["rejected_503"] += 1
            raise NotReady("the mesh has no active plan yet")
        if rid in self.requests:
            raise UserError(f"request id {rid!r} is already in use at this node")
        r = Request(rid, ids, params, int(seed), now, decoder=decoder, last_progress=now,
                    wait_until=now + self.config.queue_timeout_s, prompt_logprobs=prompt_logprobs)
        self.requests[rid] = r
        self.stats["accepted"] += 1
        self.stats["prompt_tokens"] += len(ids)
        self._admit(r, now)
        return self._flush()

    # --- frames ------------------------------------------------------------------------------------------
    def step(self, peer: str, msg: Message, now: float) -> list[EntryOutput]:
        if isinstance(msg, LoadReport):
            self.router.report(msg, now)
            self._room(now)
            return self._flush()
        r = self.requests.get(getattr(msg, "req", ""))
        if r is None or r.done:
            return self._flush()
        if getattr(msg, "attempt", -1) != r.attempt:
            r.dropped_frames += 1
            self.stats["stale_frames"] += 1  # a frame of an attempt given up on
            return self._flush()
        if isinstance(msg, Token):
            self._on_token(r, msg, now)
        elif isinstance(msg, Progress):
            if r.status is Status.PREFILLING:
                r.last_progress = now
                r.prefilled = max(r.prefilled, msg.done)
                if msg.stage == 0:
                    self._waited(r, msg.queued_s, now)
        elif isinstance(msg, Reserved):
            if msg.replica == r.decode and msg.epoch == r.epoch:
                if r.status is Status.RESERVING:
                    self._on_reserved(r, msg, now)
                elif r.eager and r.status in (Status.PREFILLING, Status.HANDING_OFF) and not msg.ok:
                    # the prompt went out with the reservation, which failed: what the prefill
                    # replica did for it is freed, and the next decoder gets the request (with the
                    # tokens streamed so far, if the prefill's first one came already)
                    self._free(r, r.nodes - r.reserve_nodes)
                    self._refused(r, msg.code or "capacity", msg.error, now, msg.ahead)
        elif isinstance(msg, Error):
            if r.status is Status.RESERVING:
                self._refused(r, msg.code or "error", msg.message, now)
            elif r.status is not Status.WAITING:  # waiting: that attempt is over already
                self._fault(r, msg.message, msg.code or "stage_error", now)
        return self._flush()

    def cancel(self, rid: str, now: float) -> list[EntryOutput]:
        """The client went away."""
        r = self.requests.get(rid)
        if r is not None and not r.done:
            self.stats["cancelled"] += 1
            log.info("request %s cancelled by the client after %d tokens", rid, len(r.tokens),
                     extra={"request_id": rid})
            self._finish(r, Finish.ABORT, now)
        return self._flush()

    def fail(self, rid: str, message: str, code: str, now: float) -> list[EntryOutput]:
        """End a request with an explicit error (the shell's catch-all for a bug on its path)."""
        r = self.requests.get(rid)
        if r is not None and not r.done:
            self._fail(r, message, code, now)
        return self._flush()

    def link_down(self, peer: str, now: float) -> list[EntryOutput]:
        for r in list(self.requests.values()):
            if r.done:
                continue
            if r.status is Status.RESERVING and peer in r.reserve_nodes:
                self._refused(r, "unreachable", f"node {peer[:12]} went away", now)
            elif r.status in (Status.PREFILLING, Status.HANDING_OFF, Status.DECODING) and peer in r.nodes:
                self._fault(r, f"node {peer[:12]} serving the request went away", "node_lost", now)
        return self._flush()

    def undeliverable(self, to: str, msg: Message, now: float) -> list[EntryOutput]:
        r = self.requests.get(getattr(msg, "req", ""))
        if r is None or r.done or getattr(msg, "attempt", -1) != r.attempt:
            return self._flush()
        if isinstance(msg, Reserve):
            self._refused(r, "unreachable", f"no link to decoder replica {r.decode}'s first stage", now)
        elif isinstance(msg, PrefillChunk):
            self._fault(r, f"no link to prefill replica {r.prefill}'s first stage", "unreachable", now)
        return self._flush()

    def tick(self, now: float) -> list[EntryOutput]:
        for r in list(self.requests.values()):
            if r.done:
                continue
            if r.status is Status.RESERVING and r.deadline <= now:
                self._refused(r, "timeout", f"decoder replica {r.decode} did not answer the admission request", now)
            elif r.status is Status.WAITING:
                if now >= r.wait_until:
                    self._give_up(r, now)
                elif r.retry_at <= now:
                    self._admit(r, now)
            elif r.status in (Status.PREFILLING, Status.HANDING_OFF, Status.DECODING) \
                    and now - r.last_progress >= self._stall_window(r):
                self._fault(r, f"no progress for {now - r.last_progress:.1f} s", "stalled", now)
        return self._flush()

    def next_deadline(self) -> float:
        d = INF
        for r in self.requests.values():
            if r.status is Status.RESERVING:
                d = min(d, r.deadline)
            elif r.status is Status.WAITING:
                d = min(d, r.wait_until, r.retry_at)
            elif r.status is not Status.FINISHED:
                d = min(d, r.last_progress + self._stall_window(r))
        return d

    # --- admission -----------------------------------------------------------------------------------------
    def _stall_window(self, r: Request) -> float:
        if r.status is Status.PREFILLING:
            return max(self.config.stall_timeout_s, self.config.stall_factor * r.expect_s)
        return self.config.stall_timeout_s

    def reachable(self, nodes: set[str]) -> bool:
        """Every node is this one or has a link up (a replica with a lost node is not routed to)."""
        if self.usable_peers is None:
            return True
        up = set(self.usable_peers())
        return all(n == self.node_id or n in up for n in nodes)

    def _wait(self, r: Request, now: float, retry_s: float) -> None:
        if r.status is not Status.WAITING:
            r.to(Status.WAITING)
        r.retry_at = now + retry_s

    def _admit(self, r: Request, now: float) -> None:
        """Ask the next decoder replica for room, or wait."""
        act = self.active()
        if act is None:
            self._wait(r, now, WAIT_RETRY_S)
            return
        epoch, routes = act
        try:
            pairs = [(p, d) for p, d in self.router.rank(routes, len(r.prompt), r.params.max_tokens, now)
                     if self.reachable(routes.nodes(p) | routes.nodes(d))]
        except PlanError as e:
            self._fail(r, f"the active plan cannot serve: {e}", "unavailable", now)
            return
        if not pairs:
            self._wait(r, now, WAIT_RETRY_S)
            return
        untried = [(p, d) for p, d in pairs if d not in r.tried]
        if not untried:
            if r.refusals.get("too_large", 0) >= len({d for _, d in pairs}):
                self.stats["too_large"] += 1
                self._fail(r, f"the request can never fit a decoder replica: {r.last_refusal} (lower max_tokens or "
                              "shorten the prompt)", "too_large", now)
                return
            # every decoder refused for room: wait until one may have some
            r.tried.clear()
            r.refusals.clear()
            self._wait(r, now, ROOM_RETRY_S)
            return
        p, d = untried[0]
        r.attempt += 1
        r.to(Status.RESERVING)
        r.epoch, r.prefill, r.decode = epoch, p, d
        r.reserve_nodes = frozenset(routes.nodes(d))
        r.nodes = frozenset()
        r.deadline = now + self.config.reserve_timeout_s
        d0 = routes.stage(d, 0)
        # a replica that prefills its own requests hands the prompt back if more is queued there
        # than this router counted (other entries' prompts of a moment before); once per replica
        max_ahead = -1
        if p == d and d not in r.busy and self.config.busy_handback:
            max_ahead = self.router.queue_allowance(routes, d, len(r.prompt), r.params.max_tokens, now,
                                                    exclude=frozenset(r.busy))
        # a resumed request prefills its original prompt again and replays the tokens streamed so
        # far through the decoder's steps: the same arithmetic as the first time, so the same tokens
        self._send(d0.node, Reserve(RequestId(r.id), epoch, d, 0, len(r.prompt) + r.params.max_tokens,
                                    len(r.prompt), NodeId(self.node_id), r.params.to_dict(), r.seed, -1,
                                    tuple(r.tokens), r.attempt,
                                    # stage 0 drafts from the prompt (speculation), unless the request said no
                                    tuple(r.prompt) if r.params.speculate is not False else (), max_ahead))
        # The prompt goes out right behind the reservation, saving the reservation's round trip
        # (which waits behind the running step of each decoder stage) from the time to first token:
        # - a one-stage replica that prefills its own decodes gets it on the same lane: its stage
        #   allocates and prefills in one iteration (or refuses both);
        # - a separate prefill replica, or a split replica that prefills its own decodes, gets it
        #   when the decoder last reported room for it; the decoder's stages keep KV (a split
        #   replica's later stages, the prompt's activations) that comes before their reservation
        #   (``eager_handoff``).
        one_stage = p == d and len(routes.stages(d)) == 1
        r.eager = one_stage or (self.config.eager_handoff
                                and self.router.has_room(routes, d, len(r.prompt) + r.params.max_tokens))
        if r.eager:
            self._prefill(r, routes, now)

    def _refused(self, r: Request, code: str, error: str, now: float, ahead: int = -1) -> None:
        self.router.prefilled(r.id)  # a prompt sent with its reservation went with it
        self._free(r, r.reserve_nodes)
        r.reserve_nodes = frozenset()
        if code == "busy":  # its queue grew since this entry looked: rank again knowing it
            self.stats["busy"] += 1
            r.busy.add(r.decode)
            r.t_sent = None  # its wait runs on to the prompt's next send (counted from arrival)
            routes = self._routes(r.epoch)
            if routes is not None and ahead > 0:
                self.router.observed(routes, r.decode, ahead, len(r.prompt), now)
            r.to(Status.WAITING)
            self._admit(r, now)
            return
        r.tried.add(r.decode)
        r.refusals[code] = r.refusals.get(code, 0) + 1
        r.last_refusal = error
        if code not in ("capacity", "unreachable", "stale_epoch", "timeout", "too_large"):
            self._fail(r, error, code or "error", now)
            return
        r.to(Status.WAITING)
        self._admit(r, now)

    def _on_reserved(self, r: Request, m: Reserved, now: float) -> None:
        if not m.ok:
            self._refused(r, m.code or "capacity", m.error, now, m.ahead)
            return
        routes = self._routes(r.epoch)
        if routes is None:
            self._fault(r, f"plan epoch {r.epoch} is gone", "epoch_unloaded", now)
            return
        self._prefill(r, routes, now)

    def _routes(self, epoch: int) -> Routes | None:
        """The routes of ``epoch``: the active plan's, or a plan still known to the router."""
        act = self.active()
        return act[1] if act is not None and act[0] == epoch else self.router.routes_for(epoch)

    def _prefill(self, r: Request, routes: Routes, now: float) -> None:
        """Room is reserved (or asked for on the same lane): the prompt to the prefill replica."""
        self.router.admitted(r.epoch, r.decode)
        r.nodes = frozenset(routes.nodes(r.prefill) | routes.nodes(r.decode))
        r.tried.clear()
        r.refusals.clear()
        p0 = routes.stage(r.prefill, 0)
        ids = np.asarray(r.prompt, dtype=np.int64)  # (T,)
        r.to(Status.PREFILLING)
        r.last_progress = now
        r.prefilled = 0
        est = self.router.prefill_estimate
        r.expect_s = float(est(routes, r.prefill, len(r.prompt))) if est is not None else 0.0
        self.router.sent(r.id, r.epoch, r.prefill, r.expect_s, now)  # its queue there, until the first token
        if r.t_sent is None:
            r.t_sent = now
        log.debug("request %s: %d prompt tokens to prefill replica %d, decoder replica %d (epoch %d, attempt %d)",
                  r.id, len(r.prompt), r.prefill, r.decode, r.epoch, r.attempt)
        self._send(p0.node, PrefillChunk(RequestId(r.id), r.epoch, r.prefill, p0.first, 0, True, len(ids), r.decode,
                                         NodeId(self.node_id), r.params.to_dict(), r.seed,
                                         ids=Tensor.from_array(ids), forced=r.tokens[0] if r.tokens else -1,
                                         attempt=r.attempt, prompt_logprobs=r.prompt_logprobs and not r.tokens))

    def _waited(self, r: Request, queued_s: float, now: float) -> None:
        """The prefill began: the request's waiting time is known (once: a resumed attempt's second
        wait is not a new request's)."""
        if r.queued_s is not None or r.t_sent is None:
            return
        r.queued_s = min(max(0.0, float(queued_s)), now - r.t_sent)  # as the entry's clock allows
        self._out.append(Waited(r.id, r.t_sent - r.t_arrival + r.queued_s))

    def _room(self, now: float) -> None:
        """A decoder may have room again: waiting requests look again, oldest first."""
        for r in sorted((q for q in self.requests.values() if q.status is Status.WAITING), key=lambda q: q.t_arrival):
            if r.status is Status.WAITING and r.retry_at > now:
                r.retry_at = now
                self._admit(r, now)

    def _give_up(self, r: Request, now: float) -> None:
        self.stats["rejected_503"] += 1
        if r.migrations:
            self._fail(r, "no intact replica left to serve the request", "unavailable", now)
        elif r.last_refusal:
            self._fail(r, f"no decoder replica has room for the request ({r.last_refusal})", "unavailable", now)
        else:
            self._fail(r, "the active plan has no replica that can serve the request now", "unavailable", now)

    # --- tokens --------------------------------------------------------------------------------------------
    def _on_token(self, r: Request, m: Token, now: float) -> None:
        if m.index < r.next_index or m.index in r.pending:
            return
        r.pending[m.index] = m
        r.last_progress = now
        while r.next_index in r.pending and not r.done:
            t = r.pending.pop(r.next_index)
            r.next_index += 1
            if not 0 <= t.token < self.vocab_size:
                self._fault(r, f"a stage sent token id {t.token}, outside the vocabulary", "bad_token", now)
                return
            if r.status is Status.PREFILLING:
                self.router.prefilled(r.id)
                r.to(Status.HANDING_OFF if t.index == 0 and r.prefill != r.decode else Status.DECODING)
                # the prompt is on the decoder now: only the decoder's nodes can still fail the request
                routes = self.router.routes_for(r.epoch)
                if routes is not None and r.decode >= 0:
                    r.nodes = frozenset(routes.nodes(r.decode))
            elif r.status is Status.HANDING_OFF:
                r.to(Status.DECODING)
            if r.t_first is None:
                self._waited(r, 0.0, now)  # a first token before any Progress: no wait reported
                r.t_first = now
                self._out.append(FirstToken(r.id, now - r.t_arrival))
            r.tokens.append(t.token)
            self.stats["tokens"] += 1
            text = r.decoder.push(t.token) if r.decoder is not None else ""
            reason: str | None = (t.reason or FINISH_STOP) if t.finished else None
            if r.decoder is not None and r.decoder.stopped:
                reason = FINISH_STOP
            elif reason is None and len(r.tokens) >= r.params.max_tokens:
                reason = FINISH_LENGTH
            if reason is not None and r.decoder is not None:
                text += r.decoder.finish()
            self._out.append(Emit(r.id, Event(t.token, text, t.index, reason, **_logprobs(t))))
            if reason is not None:
                r.reason = reason
                self._finish(r, Finish.STOP if reason == FINISH_STOP else Finish.LENGTH, now)

    # --- faults and ends -------------------------------------------------------------------------------------
    def _fault(self, r: Request, message: str, code: str, now: float) -> None:
        if r.done:
            return
        if code in RETRYABLE and r.migrations < self.config.max_migrations:
            r.migrations += 1
            self.stats["migrations"] += 1
            self.router.prefilled(r.id)
            log.warning("request %s: %s (%s); resuming at token %d elsewhere (migration %d)", r.id, message, code,
                        r.next_index, r.migrations, extra={"request_id": r.id})
            self._free(r, r.nodes | r.reserve_nodes)
            r.attempt += 1  # whatever the failed attempt still sends is dropped from now on
            r.pending.clear()
            r.nodes = r.reserve_nodes = frozenset()
            r.tried.clear()
            r.refusals.clear()
            r.prefill = r.decode = -1
            r.to(Status.WAITING)
            r.wait_until = now + self.config.migrate_wait_s
            r.last_progress = now
            self._admit(r, now)
            return
        self._fail(r, message, code, now)

    def _fail(self, r: Request, message: str, code: str, now: float) -> None:
        if r.done:
            return
        self.stats["failed"] += 1
        r.error = (message, code)
        log.warning("request %s failed: %s", r.id, message, extra={"request_id": r.id})
        self._out.append(Emit(r.id, Event(None, "", r.next_index, None, message, code)))
        self._finish(r, Finish.ERROR, now)

    def _finish(self, r: Request, how: Finish, now: float) -> None:
        if r.done:
            return
        r.to(Status.FINISHED)
        r.finish = how
        r.t_end = now
        self.requests.pop(r.id, None)
        self.router.prefilled(r.id)
        self._free(r, r.nodes | r.reserve_nodes)
        if how in (Finish.STOP, Finish.LENGTH):
            self.stats["completed"] += 1
            self.router.finished(r.epoch, r.prefill, (r.t_first or r.t_arrival) - r.t_arrival)
        outcome = {Finish.ABORT: "cancelled", Finish.ERROR: "failed"}.get(how, "completed")
        self._out.append(Ended(r, Finished(r.epoch, r.prefill, r.decode, len(r.prompt), len(r.tokens), r.t_arrival,
                                           None if r.t_sent is None else r.t_sent + (r.queued_s or 0.0),
                                           r.t_first, now, outcome)))
        self._room(now)

    def _free(self, r: Request, nodes: frozenset[str]) -> None:
        for n in sorted(nodes):
            self._send(n, Free(RequestId(r.id), r.epoch, "done", r.attempt))

    def _send(self, to: str, msg: Message) -> None:
        self._out.append(Send(to, msg))

    def _flush(self) -> list[EntryOutput]:
        out, self._out = self._out, []
        return out

    def view(self) -> dict[str, Any]:
        by: dict[str, int] = {}
        for r in self.requests.values():
            by[r.status.value] = by.get(r.status.value, 0) + 1
        oldest = sorted(self.requests.values(), key=lambda r: r.t_arrival)[:5]
        return {"requests": len(self.requests), "by_status": by, **self.stats,
                "oldest": [{"id": r.id, "status": r.status.value, "attempt": r.attempt, "tokens": len(r.tokens),
                            "prompt_tokens": len(r.prompt), "max_tokens": r.params.max_tokens} for r in oldest]}


def _logprobs(t: Token) -> dict[str, Any]:
    """A token frame's logprobs as the Event carries them (nothing when none were asked for)."""
    out: dict[str, Any] = {}
    if t.logprob is not None:
        out["logprob"] = float(t.logprob)
        out["top_logprobs"] = tuple(zip((int(i) for i in t.top_ids), (float(x) for x in t.top_lps), strict=True))
    if t.index == 0 and (t.prompt_lps or t.prompt_top_ids):
        n = len(t.prompt_top_ids) // max(len(t.prompt_lps), 1)
        out["prompt_logprobs"] = tuple(
            (float(lp), tuple(zip((int(x) for x in t.prompt_top_ids[i * n:(i + 1) * n]),
                                  (float(x) for x in t.prompt_top_lps[i * n:(i + 1) * n]), strict=True)))
            for i, lp in enumerate(t.prompt_lps))
    return out
