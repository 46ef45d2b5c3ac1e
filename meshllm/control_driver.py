"""The shell around the control plane: drives ``control.node.ControlNode`` with time and I/O.

``ControlDriver`` feeds the sans-IO control plane the clock (``run``: ``tick`` a few times per
heartbeat) and what arrives on the links, and hands each output the control plane returns to the
part that owns it (``Owners``, wired by ``node.py``):

- ``Send``/``Broadcast``: the transport's control lane;
- ``StartPlanning``, ``EvolveIsland``, ``IslandsDone``: the planning service, as tasks;
- ``LoadPlan``: the plan loader, as a task; ``DrainEpoch``/``UnloadEpoch``: the stage host;
- ``ActivatePlan`` and lost members: the serving layer's hooks; ``Log``, leadership and
  membership changes: the log.

Frames are dispatched by plane: control frames go to the control plane; frames of another plane
go to the handler registered for it (``register_plane``; the serving layer registers ``"data"``).
A frame that does not decode, or that its handler finds invalid, is the peer's fault and is
counted; anything else a handler raises is a bug of ours, counted apart, and the node runs on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm.control.config import ControlConfig
from meshllm.control.events import (
    ActivatePlan,
    Broadcast,
    DrainEpoch,
    EpochIdle,
    EvolveIsland,
    IslandsDone,
    LeaderChanged,
    LinkLost,
    LoadPlan,
    Log,
    MemberDied,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberSuspected,
    Output,
    Received,
    Send,
    Shutdown,
    StartPlanning,
    UnloadEpoch,
)
from meshllm.control.node import ControlNode
from meshllm.control.planning import plan_summary
from meshllm.errors import MeshError, ProtocolError
from meshllm.net.base import Transport
from meshllm.obs.logs import bound
from meshllm.ports import PlaneHandler, Stats
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId

log = logging.getLogger("meshllm.node")


@dataclass(frozen=True, slots=True)
class Owners:
    """Who performs which of the control plane's outputs (besides sends and logs)."""

    plan: Callable[[StartPlanning], Coroutine[Any, Any, None]]  # the leader's planning round
    evolve: Callable[[EvolveIsland], Coroutine[Any, Any, None]]  # a GA island for the leader
    finish: Callable[[IslandsDone], Coroutine[Any, Any, None]]  # the leader decodes the islands' best
    load: Callable[[int, dict[str, Any]], Coroutine[Any, Any, None]]  # (epoch, plan): this node's part
    drain: Callable[[int, Callable[[], None]], None]  # (epoch, on_idle): when its last request ends
    unload: Callable[[int], None]
    observe: Callable[[Output], None]  # metrics of every output (``obs.metrics.NodeEvents``)
    names: Callable[[], dict[str, str]]  # node id -> name, for the log
    link_up: Callable[[str], None]  # a link came up (the dialer measures it and fetches the profile)


class ControlDriver:
    """``spawn`` runs a coroutine as one of the node's tasks; ``closed`` says whether the node is
    stopping. ``start`` builds the control plane once the transport exists."""

    def __init__(self, node_id: NodeId, *, name: str, codec: Codec, config: ControlConfig, priority: int,
                 validate_plan: Callable[[dict[str, Any]], None], owners: Owners,
                 spawn: Callable[[Coroutine[Any, Any, Any]], Any], closed: Callable[[], bool],
                 attention: str | None = None, attention_kinds: tuple[str, ...] = ()) -> None:
        self.node_id = node_id
        self.attention = attention  # the attention kind this node proposes for a mesh without one
        self.attention_kinds = attention_kinds  # the kinds it can run (what it takes from peers)
        self.name = name
        self.codec = codec
        self.config = config
        self.priority = priority
        self.validate_plan = validate_plan
        self.owners = owners
        self._spawn = spawn
        self._closed = closed
        self.control: ControlNode | None = None
        self.transport: Transport | None = None
        self.active_epoch = 0
        self.bad_frames = 0  # frames from peers that failed to decode or validate
        self.handler_errors = 0  # bugs of ours: a plane handler or a hook raised
        self.links_dropped = 0
        self.rejected_plans = 0
        self.planes: dict[str, PlaneHandler] = {}
        # Hooks for the serving layer (called on the event loop; a hook that raises is logged).
        self.on_link_down_hooks: list[Callable[[str], None]] = []  # (peer node id)
        self.on_epoch_active_hooks: list[Callable[[int, dict[str, Any]], None]] = []  # (epoch, plan)

    def start(self, transport: Transport, *, now: float, seed: int) -> None:
        self.transport = transport
        self.control = ControlNode(self.node_id, rng=np.random.default_rng(seed), config=self.config,
                                   priority=self.priority, now=now, name=self.name,
                                   validate_plan=self.validate_plan, codec=self.codec, attention=self.attention,
                                   attention_kinds=self.attention_kinds)

    def proposed_epoch(self) -> int | None:
        """The epoch the control plane has just proposed, if any."""
        c = self.control
        return c.proposal.epoch if c is not None and c.proposal is not None else None

    def stats(self) -> Stats:
        return Stats(self.bad_frames, self.handler_errors, self.rejected_plans, self.links_dropped)

    # --- events in ------------------------------------------------------------------------------
    def step(self, event: Any) -> None:
        if self.control is None or self._closed():
            return
        self._perform(self.control.step(event))

    def shutdown(self) -> None:
        """Announce a graceful leave (the Leave frames go out on the links' writers)."""
        if self.control is not None and self.transport is not None:
            self._perform(self.control.step(Shutdown()))

    async def run(self) -> None:
        """Tick the control plane a few times per heartbeat, for as long as the node runs."""
        loop = asyncio.get_running_loop()
        period = self.config.heartbeat_interval / 4
        while True:
            assert self.control is not None
            try:
                self._perform(self.control.tick(loop.time()))
            except Exception:  # a bug must not stop the heartbeat: log it and keep ticking
                log.exception("control tick failed")
            await asyncio.sleep(period)

    def register_plane(self, plane: str, handler: PlaneHandler) -> None:
        """Frames of ``plane`` (a message class's ``PLANE``) go to ``handler(peer, message)``, on the
        event loop. The control plane's frames are the node's own and cannot be taken over."""
        if plane == "control":
            raise MeshError("the control plane's frames are handled by the node itself")
        self.planes[plane] = handler

    def on_frame(self, peer: str, data: bytes) -> None:
        with bound(node=self.name):  # delivered in the sender's context by the in-memory network
            self._dispatch(peer, data)

    def link_up(self, peer: str) -> None:
        log.info("link up: %s", peer[:12])
        self.owners.link_up(peer)

    def link_down(self, peer: str) -> None:
        self.links_dropped += 1
        log.info("link down: %s", peer[:12])
        if not self._closed():
            self.step(LinkLost(NodeId(peer)))  # suspected now; a leader is replaced without waiting
        self._run_hooks(self.on_link_down_hooks, peer)

    def _dispatch(self, peer: str, data: bytes) -> None:
        if self.control is None or self._closed():
            return
        try:
            msg = self.codec.decode(data)
        except ProtocolError as e:
            self.bad_frames += 1
            log.warning("dropped a frame from %s: %s", peer[:12], e)
            return
        if msg.PLANE != "control":
            handler = self.planes.get(msg.PLANE)
            if handler is None:
                log.debug("%s from %s: no handler for the %s plane on this node", msg.TYPE, peer[:12], msg.PLANE)
                return
            try:
                handler(peer, msg)
            except ProtocolError as e:  # the handler found the peer's message invalid
                self.bad_frames += 1
                log.warning("dropped %s from %s: %s", msg.TYPE, peer[:12], e)
            except Exception:  # the frame decoded fine: whatever went wrong is ours
                self.handler_errors += 1
                log.exception("bug in the data-plane handler for %s from %s", msg.TYPE, peer[:12])
            return
        try:
            self._perform(self.control.step(Received(NodeId(peer), msg)))
        except Exception:  # whatever a peer sends, the node keeps running
            self.bad_frames += 1
            log.exception("handling %s from %s failed", msg.TYPE, peer[:12])

    # --- outputs to their owners ------------------------------------------------------------------
    def _perform(self, outputs: list[Output]) -> None:
        for out in outputs:
            self.owners.observe(out)
            try:
                self._perform_one(out)
            except MeshError as e:
                log.warning("could not perform %s: %s", type(out).__name__, e)

    def _perform_one(self, out: Output) -> None:
        assert self.transport is not None
        owners = self.owners
        if isinstance(out, Send):
            if not self.transport.send(out.to, self.codec.encode(out.msg)):
                log.debug("no link to %s for %s", out.to[:12], out.msg.TYPE)
        elif isinstance(out, Broadcast):
            data = self.codec.encode(out.msg)
            for p in self.transport.peers():
                self.transport.send(p, data)
        elif isinstance(out, Log):
            if out.message.startswith("rejected plan"):
                self.rejected_plans += 1
            log.log(logging.WARNING if out.level == "warning" else logging.INFO, "%s", out.message)
        elif isinstance(out, LeaderChanged):
            who = "this node" if out.leader == self.node_id else (out.leader or "nobody")
            log.info("leader for term %d: %s", out.term, who)
        elif isinstance(out, MemberJoined | MemberSuspected | MemberRecovered | MemberDied | MemberLeft):
            log.info("member %s %s", out.node[:12], type(out).__name__.removeprefix("Member").lower())
            if isinstance(out, MemberSuspected | MemberDied | MemberLeft):
                # silent (no heartbeats) or gone: as unusable for requests as a closed link; the
                # serving layer resumes what ran there and routes around it
                self._run_hooks(self.on_link_down_hooks, out.node)
        elif isinstance(out, StartPlanning):
            self._spawn(owners.plan(out))
        elif isinstance(out, EvolveIsland):
            self._spawn(owners.evolve(out))
        elif isinstance(out, IslandsDone):
            self._spawn(owners.finish(out))
        elif isinstance(out, LoadPlan):
            self._spawn(owners.load(out.epoch, out.plan))
        elif isinstance(out, ActivatePlan):
            self.active_epoch = out.epoch
            log.info("plan epoch %d active: %s", out.epoch, plan_summary(out.plan, owners.names()))
            self._run_hooks(self.on_epoch_active_hooks, out.epoch, out.plan)
        elif isinstance(out, DrainEpoch):
            # Idle when the last request of that epoch in flight here ends (at once if none is).
            epoch = out.epoch
            owners.drain(epoch, lambda: self.step(EpochIdle(epoch)))
        elif isinstance(out, UnloadEpoch):
            owners.unload(out.epoch)  # tells the serving layer's on_unload hooks first
        else:
            log.debug("unhandled output %r", out)

    def _run_hooks(self, hooks: list[Callable[..., None]], *args: Any) -> None:
        for hook in list(hooks):
            try:
                hook(*args)
            except Exception:
                self.handler_errors += 1
                log.exception("bug in a serving hook %r", hook)
