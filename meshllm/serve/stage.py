"""The stage's shell: carries ``StageCore``'s decisions out (``serve/stagecore.py`` has the logic).

Frames, lost links and unloaded epochs go into the core; what it returns goes out here: control
frames through the messenger at once, data frames (KV, a prompt's activations) through one ordered
sender per peer that awaits the link's bounded data lane. One ``Iteration`` of runner calls runs
at a time and returns their results; it never waits on the network, so a KV hand-off filling a
slow link never holds back a decode step, an admission or a free.

**Where an iteration runs.** An iteration of decode steps (and frees) expected to take at most
``ServeConfig.inline_step_ms`` runs on the event loop, right after the frame from another node
that made it ready: a hop then costs no thread switch (the loop waking the inference thread, and the thread waking
the loop with the result, measured at 0.1-0.5 ms each on a shared 2-core machine). Everything
else (prefill chunks, KV imports, admissions, a decode step measured slower than that) runs on the
inference thread, so control frames never wait behind a long step. So does an iteration ready
right behind the last one, or made ready by the stage's own token (a one-node ring, a stage that
always has work): run on the loop back to back, such steps left it one turn between them, and a
streamed token, which takes several turns from the stage to the client, fell a step behind per
turn (a one-node mesh slowed 5x: 10 ms steps, tokens reaching the client every 35 ms and then
thirty at once when a prompt's prefill went to the thread). The expectation is the last
measured decode-only iteration of this stage *with as many rows* (``StepTimes``), without drafts
where one was measured: the first of each size runs on the thread, and a step that ran long on the
loop sends the next ones of its size back to the thread. A step that carries drafts (speculation)
runs where the same rows without drafts run, so the loop waits behind at most a pass of
``spec_max_draft`` + 1 positions per row (SmolLM2 int4: a plain step of 17-21 ms, a pass with 4
drafts 1.6-1.8 times that). docs/serving.md has what each placement measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from meshllm.obs.logs import bound, node_var
from meshllm.serve.config import ServeConfig
from meshllm.serve.messenger import Messenger
from meshllm.serve.routes import Routes
from meshllm.serve.stagecore import (
    INF,
    Begin,
    DecodeOp,
    End,
    FreeOp,
    Hold,
    Iteration,
    Op,
    Output,
    Result,
    Ring,
    Send,
    StageCore,
    run_op,
)
from meshllm.serve.wake import WakeQos
from meshllm.wire.messages import LoadReport, Message

log = logging.getLogger("meshllm.serve.stage")


class HostRunners:
    """The core's view of the stage host: which epochs and runners are loaded, and KV room."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def has_epoch(self, epoch: int) -> bool:
        return bool(self.host.has_epoch(epoch))

    def runner(self, epoch: int, first_block: int) -> Any:
        return self.host.runner(epoch, first_block)

    @staticmethod
    def capacity_tokens(runner: Any) -> int | None:
        """Positions one sequence can ever reserve on this runner (its context, its whole budget)."""
        kv = getattr(runner, "kv", None)
        if kv is None or not getattr(kv, "bytes_per_token", 0):
            return None
        cap = int(getattr(kv, "slot_len", 1 << 62))
        if kv.budget is not None:
            cap = min(cap, int(kv.budget) // int(kv.bytes_per_token))
        return cap

    @staticmethod
    def free_tokens(runner: Any) -> int | None:
        kv = getattr(runner, "kv", None)
        if kv is None or kv.budget is None or not kv.bytes_per_token:
            return None
        return max(0, kv.budget - kv.reserved) // kv.bytes_per_token


def execute(ops: list[Op], stats: dict[str, Any]) -> tuple[list[Result], float]:
    """One iteration: every op in order, each one's result; and how long they took (seconds)."""
    t0 = time.perf_counter()
    results = [run_op(op, stats, time.perf_counter) for op in ops]
    return results, time.perf_counter() - t0


def _short(it: Iteration) -> bool:
    """Decode steps and frees only: what may run on the event loop."""
    return bool(it.decode_rows) and not it.prefill_tokens and all(isinstance(op, DecodeOp | FreeOp) for op in it.ops)


def _rows(it: Iteration) -> int:
    """The rows of an iteration's decode steps (each row's drafts not counted)."""
    return sum(len(op.seqs) for op in it.ops if isinstance(op, DecodeOp))


class StepTimes:
    """How long a decode-only iteration of so many rows takes, from the last one measured: one
    without drafts where one was (a step's drafts never move its rows between loop and thread),
    else the last one with drafts (an upper bound for the same rows without)."""

    def __init__(self, cap: int = 256) -> None:
        self.cap = cap
        self._plain: dict[int, float] = {}
        self._drafted: dict[int, float] = {}

    def record(self, rows: int, positions: int, seconds: float) -> None:
        table = self._plain if positions <= rows else self._drafted
        if rows not in table and len(table) >= self.cap:
            table.clear()  # batch sizes come and go; keep the tables small
        table[rows] = seconds

    def expect(self, rows: int) -> float:
        """Seconds (INF where no iteration of ``rows`` rows was measured yet)."""
        got = self._plain.get(rows)
        return got if got is not None else self._drafted.get(rows, INF)


class StageServer:
    def __init__(self, node_id: str, host: Any, messenger: Messenger, routes_for: Callable[[int], Routes | None],
                 config: ServeConfig, *, num_layers: int, eos_ids: tuple[int, ...], hidden_size: int) -> None:
        self.node_id = node_id
        self.host = host
        self.net = messenger
        self.config = config
        self.core = StageCore(node_id, HostRunners(host), routes_for, config, num_layers=num_layers,
                              eos_ids=eos_ids, hidden_size=hidden_size)
        self._lanes: dict[str, deque[Message]] = {}  # data frames waiting per peer, in order
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._delayed: dict[str, deque[tuple[float, Send]]] = {}  # hop_delay_ms: frames held per peer
        self._running: asyncio.Task[None] | None = None
        self._inline: asyncio.Handle | None = None  # an iteration about to run on the loop
        self._hop = False  # a frame from another node is being taken in (what may run on the loop)
        self._steps = StepTimes()  # how long decode-only iterations took, by their rows
        self.core.stats["inline_iterations"] = 0
        self.wake = WakeQos(config.wake_qos)  # the cores kept from halting while decode steps run
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = INF
        self._node = node_var.get()
        self.closed = False

    # --- what others read ---------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        return self.core.stats

    @property
    def held(self) -> dict[tuple[str, int, int], Hold]:
        return self.core.holds

    @property
    def rings(self) -> dict[tuple[int, int], Ring]:
        return self.core.rings

    def held_count(self) -> int:
        return len(self.core.holds)

    def view(self) -> dict[str, Any]:
        v = self.core.view()
        v["queued_jobs"] = v.pop("queued_ops")
        v["data_frames_queued"] = sum(len(q) for q in self._lanes.values())
        v["wake_qos"] = self.wake.view()
        return v

    def load_reports(self) -> list[LoadReport]:
        return self.core.load_reports()

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._node = node_var.get()

    async def close(self) -> None:
        self.closed = True
        self.wake.release()
        self.core.release_all()
        if self._timer is not None:
            self._timer.cancel()
        if self._inline is not None:
            self._inline.cancel()
        tasks = [t for t in [self._running, *self._senders.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # --- into the core -----------------------------------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def handle(self, peer: str, msg: Message) -> None:
        if self.closed:
            return
        self._hop = peer != self.node_id
        try:
            self._apply(self.core.step(peer, msg, self._now()))
        finally:
            self._hop = False

    def free(self, req: str, attempt: int = 1 << 30) -> None:
        self._apply(self.core.free(req, attempt, self._now()))

    def fail_peer(self, peer: str) -> None:
        self._apply(self.core.link_down(peer, self._now()))

    def fail_epoch(self, epoch: int) -> None:
        self._apply(self.core.epoch_unloaded(epoch, self._now()))

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = INF
        if not self.closed:
            self._apply(self.core.tick(self._now()))

    # --- out of the core ---------------------------------------------------------------------------------
    def _apply(self, outs: list[Output]) -> None:
        for o in outs:
            if isinstance(o, Send):
                self._send(o)
            elif isinstance(o, Begin):
                self.host.begin(o.epoch, o.req)
            elif isinstance(o, End):
                self.host.end(o.epoch, o.req)
        self._kick()
        at = self.core.next_deadline()
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _send(self, o: Send) -> None:
        if self.config.hop_delay_ms > 0 and o.to != self.node_id and not o.held:
            self._hold_frame(o)
            return
        if o.lane == "control":
            if not self.net.send(o.to, o.msg):
                self._apply(self.core.undeliverable(o.to, o.msg, self._now()))
            return
        q = self._lanes.setdefault(o.to, deque())
        q.append(o.msg)
        if o.to not in self._senders:
            self._senders[o.to] = asyncio.ensure_future(self._drain(o.to, q))

    def _hold_frame(self, o: Send) -> None:
        """Lab only (``hop_delay_ms``): a frame to another node leaves that much later, frames to
        one peer in the order they were sent (a per-hop delay on loopback, where netem is not)."""
        q = self._delayed.setdefault(o.to, deque())
        q.append((self._now() + self.config.hop_delay_ms / 1000.0, o))
        if len(q) == 1:
            asyncio.get_running_loop().call_at(q[0][0], self._release_held, o.to)

    def _release_held(self, peer: str) -> None:
        q = self._delayed.get(peer)
        now = self._now()
        while q and q[0][0] <= now and not self.closed:
            _, o = q.popleft()
            self._send(Send(o.to, o.msg, o.lane, held=True))
        if q and not self.closed:
            asyncio.get_running_loop().call_at(q[0][0], self._release_held, peer)

    async def _drain(self, peer: str, q: deque[Message]) -> None:
        """One peer's data frames, in order, each awaiting room on the link's data lane."""
        try:
            with bound(node=self._node):
                while q:
                    msg = q.popleft()
                    if not await self.net.send_data(peer, msg):
                        self._apply(self.core.undeliverable(peer, msg, self._now()))
        finally:
            self._senders.pop(peer, None)
            if q and not self.closed:  # something was queued as we left
                self._senders[peer] = asyncio.ensure_future(self._drain(peer, q))

    def _kick(self) -> None:
        """Start the next iteration when none is running: short ones on the loop (after the
        callbacks already due, so every frame that has landed is in the core first), the others
        on the inference thread."""
        if self._running is not None or self._inline is not None or self.closed:
            return
        it = self.core.schedule(self._now())
        if it is None:
            return
        short = _short(it)
        # On the loop only where another node's frame made it ready (a hop): an iteration right
        # behind the last one, or made ready by the stage's own token (a one-node ring), would
        # leave the loop one turn between steps, and what a token takes on its way to the client
        # (several turns) would fall behind by a step a turn
        if short and self._hop and self._steps.expect(_rows(it)) * 1000 <= self.config.inline_step_ms:
            self._inline = asyncio.get_running_loop().call_soon(self._run_here, it)
        else:
            self._running = asyncio.ensure_future(self._run(it, short))

    def _ran(self, it: Iteration, got: tuple[list[Result], float] | Exception, short: bool) -> list[Output]:
        if isinstance(got, Exception):  # the host is closed, or the thread failed: every op fails
            log.warning("a serving iteration could not run: %s", got)
            results = [Result(error=str(got), kind="error") for _ in it.ops]
        else:
            results, took = got
            if short:
                self._steps.record(_rows(it), it.decode_rows, took)
            if it.decode_rows:
                self.wake.decoding(self._now())
        try:
            return self.core.update_from_output(it, results, self._now())
        except Exception:  # a bug: say so and keep serving (the entries' stall timers fail its requests over)
            log.exception("the results of a serving iteration could not be taken in")
            return []

    def _run_here(self, it: Iteration) -> None:
        try:
            with bound(node=self._node):
                try:
                    got: tuple[list[Result], float] | Exception = self.host.call_here(execute, it.ops,
                                                                                       self.core.stats)
                except Exception as e:
                    got = e
                self.core.stats["inline_iterations"] += 1
                outs = self._ran(it, got, True)
        finally:
            self._inline = None
        self._apply(outs)

    async def _run(self, it: Iteration, short: bool) -> None:
        try:
            with bound(node=self._node):
                try:
                    got: tuple[list[Result], float] | Exception = await self.host.call(execute, it.ops,
                                                                                        self.core.stats)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    got = e
                outs = self._ran(it, got, short)
        finally:
            self._running = None
        self._apply(outs)
