"""A deterministic in-memory network and a cluster of ``ControlNode``s on it. Pure: logical time,
a ``numpy.random.Generator`` for drops and delays, no sockets, no clock.

``SimNetwork`` carries encoded frames (so the codec is exercised) with a drop probability, a
uniform delay, partitions and crashed nodes. ``SimCluster`` plays the shell for every node: it
ticks them, delivers frames, and performs their outputs with a toy planner (one replica, one
stage per member), toy GA islands and instant-ish block loading, recording what happened so tests
can check properties. The asyncio shell's own simulated tests can reuse ``SimNetwork``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshllm.control.config import ControlConfig
from meshllm.control.events import (
    ActivatePlan,
    Broadcast,
    DrainEpoch,
    EpochIdle,
    Event,
    EvolveIsland,
    Individuals,
    IslandEvolved,
    Islands,
    IslandsDone,
    LeaderChanged,
    LoadPlan,
    Log,
    Output,
    PlanLoaded,
    ProfileReady,
    ProposePlan,
    Received,
    Send,
    StartPlanning,
    UnloadEpoch,
)
from meshllm.control.node import ControlNode
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId
from meshllm.wire.messages import Message


class SimNetwork:
    def __init__(self, rng: np.random.Generator, *, drop: float = 0.0, delay: tuple[float, float] = (0.0, 0.0),
                 codec: Codec | None = None, wire: bool = True) -> None:
        self.rng = rng
        self.drop = drop
        self.delay = delay
        self.codec = codec or Codec()
        self.wire = wire  # False: pass message objects (faster; the codec is tested elsewhere)
        self.groups: list[frozenset[NodeId]] | None = None
        self.crashed: set[NodeId] = set()
        self._queue: list[tuple[float, int, NodeId, NodeId, Any]] = []
        self._seq = 0
        self.sent = 0
        self.dropped = 0

    def partition(self, *groups: Iterable[NodeId]) -> None:
        self.groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def crash(self, node: NodeId) -> None:
        self.crashed.add(node)

    def connected(self, a: NodeId, b: NodeId) -> bool:
        if a in self.crashed or b in self.crashed:
            return False
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    def send(self, src: NodeId, dst: NodeId, msg: Message, now: float) -> None:
        self.sent += 1
        payload: Any = self.codec.encode(msg) if self.wire else msg
        if not self.connected(src, dst) or (self.drop and self.rng.random() < self.drop):
            self.dropped += 1
            return
        lo, hi = self.delay
        at = now + (lo if hi <= lo else float(self.rng.uniform(lo, hi)))
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, src, dst, payload))

    def due(self, now: float) -> list[tuple[NodeId, NodeId, Message]]:
        """Frames whose delivery time has come, in order; a partition or crash since sending loses them."""
        out = []
        while self._queue and self._queue[0][0] <= now:
            _, _, src, dst, payload = heapq.heappop(self._queue)
            if not self.connected(src, dst):
                self.dropped += 1
                continue
            out.append((src, dst, self.codec.decode(payload) if self.wire else payload))
        return out

    def pending(self) -> int:
        return len(self._queue)


def toy_plan(members: Sequence[NodeId]) -> dict[str, Any]:
    """One replica with one stage per member (the shape of the planner's ``Plan.to_dict()``)."""
    stages = [{"node": n, "layers": [i, i + 1]} for i, n in enumerate(members)]
    return {"replicas": [{"id": 0, "role": "BOTH", "stages": stages}],
            "workload": {"mean_input_len": 100.0, "mean_output_len": 50.0}}


def toy_evolve(individuals: Individuals, generations: int, seed: int) -> tuple[Individuals, tuple[float, ...]]:
    """A deterministic stand-in for the planner's ``evolve``: perturb with the seed, score by sum."""
    rng = np.random.default_rng(seed)
    out = tuple(tuple(int(g) for g in (np.array(ind) + rng.integers(0, 2, len(ind)) * generations))
                for ind in individuals)
    return out, tuple(float(sum(ind)) for ind in out)


@dataclass
class SimRecord:
    leader_changes: list[tuple[float, NodeId, int, NodeId | None]] = field(default_factory=list)
    activations: list[tuple[float, NodeId, int]] = field(default_factory=list)
    unloads: list[tuple[float, NodeId, int]] = field(default_factory=list)
    plans: dict[int, dict[str, Any]] = field(default_factory=dict)
    islands_done: list[IslandsDone] = field(default_factory=list)
    logs: list[tuple[float, NodeId, str, str]] = field(default_factory=list)


class SimCluster:
    def __init__(self, nodes: dict[str, int], *, seed: int, config: ControlConfig | None = None,
                 drop: float = 0.0, delay: tuple[float, float] = (0.0, 0.0), dt: float = 0.25,
                 wire: bool = True, plan: bool = True, islands: int = 0, load_time: float = 0.5,
                 drain_time: float = 0.5, unreachable_islands: Iterable[NodeId] = (),
                 node_kwargs: Callable[[NodeId], dict[str, Any]] | None = None) -> None:
        root = np.random.default_rng(seed)
        self.config = config or ControlConfig()
        self.net = SimNetwork(np.random.default_rng(root.integers(2**63)), drop=drop, delay=delay, wire=wire)
        self.now = 0.0
        self.dt = dt
        self.plan = plan
        self.islands = islands
        self.load_time = load_time
        self.drain_time = drain_time
        self.unreachable_islands = set(unreachable_islands)
        self.record = SimRecord()
        self._timers: list[tuple[float, int, NodeId, Event]] = []
        self._tseq = 0
        self.nodes: dict[NodeId, ControlNode] = {}
        self._node_kwargs = node_kwargs or (lambda n: {})
        self._root = root
        for name, prio in nodes.items():
            self.add(NodeId(name), prio)

    def add(self, node_id: NodeId, priority: int = 0) -> ControlNode:
        node = ControlNode(node_id, rng=np.random.default_rng(self._root.integers(2**63)), config=self.config,
                           priority=priority, now=self.now, **self._node_kwargs(node_id))
        self.nodes[node_id] = node
        self.net.crashed.discard(node_id)
        if self.plan:
            self._later(0.0, node_id, ProfileReady({"node": node_id, "memory": 1 << 30}))
        return node

    def crash(self, node_id: NodeId) -> None:
        self.net.crash(node_id)

    def alive(self) -> list[NodeId]:
        return sorted(n for n in self.nodes if n not in self.net.crashed and not self.nodes[n].left)

    def _later(self, delay: float, node: NodeId, event: Event) -> None:
        self._tseq += 1
        heapq.heappush(self._timers, (self.now + delay, self._tseq, node, event))

    def step(self, node_id: NodeId, event: Event) -> None:
        self._perform(node_id, self.nodes[node_id].step(event))

    def run_until(self, t: float, until: Callable[[], bool] | None = None) -> bool:
        """Advance to logical time ``t`` (or until ``until()`` holds, checked each step)."""
        while self.now < t - 1e-9:
            self.now = round(self.now + self.dt, 9)
            for src, dst, msg in self.net.due(self.now):
                if dst in self.nodes and dst not in self.net.crashed:
                    self._perform(dst, self.nodes[dst].step(Received(src, msg)))
            while self._timers and self._timers[0][0] <= self.now:
                _, _, node, event = heapq.heappop(self._timers)
                if node not in self.net.crashed:
                    self._perform(node, self.nodes[node].step(event))
            for n in self.alive():
                self._perform(n, self.nodes[n].tick(self.now))
            if until is not None and until():
                return True
        return until() if until is not None else True

    def _perform(self, node: NodeId, outputs: list[Output]) -> None:
        rec = self.record
        for o in outputs:
            if isinstance(o, Send):
                self.net.send(node, o.to, o.msg, self.now)
            elif isinstance(o, Broadcast):
                for peer in self.nodes:
                    if peer != node:
                        self.net.send(node, peer, o.msg, self.now)
            elif isinstance(o, LeaderChanged):
                rec.leader_changes.append((self.now, node, o.term, o.leader))
            elif isinstance(o, Log):
                rec.logs.append((self.now, node, o.level, o.message))
            elif not self.plan:
                continue
            elif isinstance(o, StartPlanning):
                if self.islands:
                    base = tuple((i,) * max(len(o.members), 1) for i in range(4))
                    isl = tuple(tuple(base) for _ in range(self.islands))
                    self._later(0.0, node, Islands(o.round, isl, {"members": list(o.members)}, 2))
                else:
                    self._later(self.dt, node, ProposePlan(o.round, toy_plan(o.members)))
            elif isinstance(o, EvolveIsland):
                if node in self.unreachable_islands and node != self._leader_of(node):
                    continue  # this member never answers: the leader must fall back
                inds, fit = toy_evolve(o.individuals, o.generations, o.seed)
                self._later(self.dt, node, IslandEvolved(o.round, o.island, inds, fit))
            elif isinstance(o, IslandsDone):
                rec.islands_done.append(o)
                members = self.nodes[node].round_members
                self._later(0.0, node, ProposePlan(o.round, toy_plan(members)))
            elif isinstance(o, LoadPlan):
                rec.plans[o.epoch] = o.plan
                self._later(self.load_time, node, PlanLoaded(o.epoch))
            elif isinstance(o, ActivatePlan):
                rec.activations.append((self.now, node, o.epoch))
            elif isinstance(o, DrainEpoch):
                self._later(self.drain_time, node, EpochIdle(o.epoch))
            elif isinstance(o, UnloadEpoch):
                rec.unloads.append((self.now, node, o.epoch))

    def _leader_of(self, node: NodeId) -> NodeId | None:
        return self.nodes[node].leader

    # --- properties the tests check -------------------------------------------------------------
    def leaders(self) -> list[NodeId]:
        return [n for n in self.alive() if self.nodes[n].is_leader]

    def agreed_leader(self) -> NodeId | None:
        """The leader every live node follows, if there is exactly one and it leads."""
        live = self.alive()
        ballots = {self.nodes[n].election.ballot for n in live}
        if len(ballots) != 1:
            return None
        (_, leader), = ballots
        return NodeId(leader) if leader and self.leaders() == [leader] else None

    def best_alive(self) -> NodeId:
        return max(self.alive(), key=lambda n: (self.nodes[n].membership.priority, n))
