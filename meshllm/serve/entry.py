"""The entry's shell: a node that accepted a prompt and streams its answer back.

``serve/entrycore.py`` decides everything about a request (admission, attempts, tokens in order,
stop strings, faults and resumption, deadlines); this shell carries its outputs out — frames
through the messenger, events into each request's queue for the API — and feeds it frames, lost
links, cancels and time (one timer at the core's next deadline). ``generate`` is the public call:
it yields a request's events; closing it early (the client went away) frees the request on every
node. Any exception on a request's path ends that request with an explicit error, never a silent
task death.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from meshllm.errors import ContextLengthError, UserError
from meshllm.model.tokenizer import Tokenizer
from meshllm.obs.logs import bound
from meshllm.obs.metrics import RequestMetrics
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.entrycore import (
    Emit,
    Ended,
    EntryCore,
    EntryOutput,
    Event,
    Finished,
    FirstToken,
    NotReady,
    QueueFull,
    Waited,
)
from meshllm.serve.messenger import Messenger
from meshllm.serve.request import FINISH_LENGTH, FINISH_STOP, Finish, Request
from meshllm.serve.router import Router
from meshllm.serve.routes import Routes
from meshllm.serve.stagecore import INF, Send
from meshllm.wire.messages import Message

log = logging.getLogger("meshllm.serve.entry")

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "Entry", "Event", "Finished", "NotReady", "QueueFull"]


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
        self.tokenizer = tokenizer
        self.router = router
        self.observe = observe
        self.core = EntryCore(node_id, config, vocab_size=vocab_size, max_position=max_position, eos_ids=eos_ids,
                              router=router, active=active, usable_peers=links, has_tokenizer=tokenizer is not None)
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = INF
        self.finished_hooks: list[Callable[[Finished], None]] = []  # every request that ends
        # what the stages' heads compute beyond tokens (the API refuses a request asking for more)
        self.features = frozenset({"penalties", "logprobs", "prompt_logprobs"})

    # --- what others read ----------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Request]:
        return self.core.requests

    @property
    def stats(self) -> dict[str, Any]:
        return self.core.stats

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    @property
    def max_position(self) -> int:
        return self.core.max_position

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.core.eos_ids

    def check(self, prompt: Sequence[int], params: SamplingParams) -> tuple[int, ...]:
        return self.core.check(prompt, params)

    def reachable(self, nodes: set[str]) -> bool:
        return self.core.reachable(nodes)

    def new_request_id(self, client: str | None = None) -> str:
        """A request id unique in the mesh: this entry's random prefix and a counter, after the
        client's own id when it sent one (``X-Request-Id``), so a client's id can be found in every
        node's log while two clients choosing the same id never share a request on a stage."""
        own = f"{self._prefix}-{next(self._ids)}"
        return f"{client}.{own}" if client else own

    def view(self) -> dict[str, Any]:
        return self.core.view()

    # --- the public call ---------------------------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], params: SamplingParams, *, seed: int | None = None,
                       request_id: str | None = None, prompt_logprobs: bool = False) -> AsyncIterator[Event]:
        """Stream one request's events; the last has ``finish_reason`` or ``error``. Raises before the
        first event for bad input (UserError), a full queue (QueueFull) or no plan (NotReady).
        Closing the iterator early cancels the request everywhere."""
        try:
            ids = self.core.check(prompt, params)
        except UserError as e:
            self.metrics.rejected("context_length" if isinstance(e, ContextLengthError) else "invalid")
            raise
        if seed is None:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        rid = request_id or self.new_request_id()
        dec = self.tokenizer.stream(stop=params.stop, prompt_ids=ids) if self.tokenizer is not None else None
        q: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self._queues[rid] = q
            outs = self.core.submit(rid, ids, params, int(seed), dec, self._now(), prompt_logprobs=prompt_logprobs)
        except QueueFull:
            self._queues.pop(rid, None)
            self.metrics.rejected("queue_full")
            raise
        except NotReady:
            self._queues.pop(rid, None)
            self.metrics.rejected("unavailable")
            raise
        except UserError:
            self._queues.pop(rid, None)
            self.metrics.rejected("invalid")
            raise
        with bound(node=self.name, request_id=rid):
            self._apply(outs)
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None or ev.error is not None:
                    return
        finally:
            if rid in self.core.requests:
                self.metrics.cancelled()
                with bound(node=self.name, request_id=rid):
                    self._apply(self.core.cancel(rid, self._now()))
            self._queues.pop(rid, None)

    # --- into the core -------------------------------------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def handle(self, peer: str, msg: Message) -> None:
        rid = getattr(msg, "req", None)
        try:
            outs = self.core.step(peer, msg, self._now())
        except Exception as e:  # a bug on one request's path ends that request, explicitly
            log.exception("entry failed on a %s frame", msg.TYPE)
            outs = self.core.fail(rid, f"internal error: {e}", "internal", self._now()) if rid else []
        self._apply(outs)

    def fail_peer(self, peer: str) -> None:
        self._apply(self.core.link_down(peer, self._now()))

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = INF
        try:
            outs = self.core.tick(self._now())
        except Exception:
            log.exception("entry tick failed")
            outs = []
        self._apply(outs)

    # --- out of the core ---------------------------------------------------------------------------------
    def _apply(self, outs: list[EntryOutput]) -> None:
        for o in outs:
            try:
                self._out(o)
            except Exception:  # an observer's bug must not break serving
                log.exception("entry output %s failed", type(o).__name__)
        at = self.core.next_deadline()
        if at < self._timer_at or (self._timer is None and at < INF):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _out(self, o: EntryOutput) -> None:
        if isinstance(o, Send):
            if not self.net.send(o.to, o.msg):
                self._apply(self.core.undeliverable(o.to, o.msg, self._now()))
        elif isinstance(o, Emit):
            q = self._queues.get(o.req)
            if q is not None:
                q.put_nowait(o.event)
        elif isinstance(o, Waited):
            self.metrics.waited(o.seconds)
        elif isinstance(o, FirstToken):
            self.metrics.first_token(o.seconds)
        elif isinstance(o, Ended):
            self._ended(o)

    def _ended(self, o: Ended) -> None:
        r, f = o.request, o.finished
        if r.finish in (Finish.STOP, Finish.LENGTH):
            first = None if r.t_first is None else r.t_first - r.t_arrival
            self.metrics.finished(r.reason or FINISH_STOP, duration_s=f.t_end - f.t_start, first_s=first,
                                  tokens=len(r.tokens))
            log.info("request %s finished (%s): %d prompt + %d tokens in %.3f s, first token after %.3f s", r.id,
                     r.reason, len(r.prompt), len(r.tokens), f.t_end - f.t_start, first or 0.0,
                     extra={"request_id": r.id, "node": self.name})
            if self.observe is not None:
                try:
                    self.observe(len(r.prompt), len(r.tokens))
                except Exception:
                    log.exception("observing a finished request failed")
        elif r.finish is Finish.ERROR and r.error is not None:
            self.metrics.failed(r.error[1])
        for hook in list(self.finished_hooks):
            try:
                hook(f)
            except Exception:  # an observer's bug must not break serving
                log.exception("a finished-request hook failed")
