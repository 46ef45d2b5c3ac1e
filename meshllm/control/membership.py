"""Membership from heartbeats: alive -> suspect -> dead, graceful leave, rejoin.

The table of transitions (h11 style), driven by "heard from" and by the clock:

    (unknown)  heard           -> ALIVE    emits MemberJoined
    ALIVE      silent k beats  -> SUSPECT  emits MemberSuspected
    ALIVE      link closed     -> SUSPECT  emits MemberSuspected
    SUSPECT    heard           -> ALIVE    emits MemberRecovered
    SUSPECT    silent d beats  -> DEAD     emits MemberDied
    DEAD/LEFT  heard           -> ALIVE    emits MemberJoined (a rejoin)
    any        Leave           -> LEFT     emits MemberLeft
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshllm.control.config import ControlConfig
from meshllm.control.events import (
    MemberDied,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberSuspected,
    Output,
)
from meshllm.wire.ids import NodeId


class Liveness(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(slots=True)
class Member:
    node_id: NodeId
    priority: int
    last_heard: float
    state: Liveness
    name: str = ""
    epoch: int = 0  # the member's active epoch, from its heartbeats


class Membership:
    def __init__(self, self_id: NodeId, priority: int, config: ControlConfig) -> None:
        self.self_id = self_id
        self.priority = priority
        self.config = config
        self.members: dict[NodeId, Member] = {}

    def heard(self, node: NodeId, now: float, *, priority: int | None = None, name: str | None = None,
              epoch: int | None = None) -> list[Output]:
        if node == self.self_id:
            return []
        m = self.members.get(node)
        out: list[Output] = []
        if m is None:
            m = self.members[node] = Member(node, priority or 0, now, Liveness.ALIVE)
            out.append(MemberJoined(node))
        elif m.state in (Liveness.DEAD, Liveness.LEFT):
            m.state = Liveness.ALIVE
            out.append(MemberJoined(node))
        elif m.state is Liveness.SUSPECT:
            m.state = Liveness.ALIVE
            out.append(MemberRecovered(node))
        m.last_heard = max(m.last_heard, now)
        if priority is not None:
            m.priority = priority
        if name is not None:
            m.name = name
        if epoch is not None:
            m.epoch = epoch
        return out

    def left(self, node: NodeId) -> list[Output]:
        m = self.members.get(node)
        if m is None or m.state is Liveness.LEFT:
            return []
        m.state = Liveness.LEFT
        return [MemberLeft(node)]

    def suspect(self, node: NodeId) -> list[Output]:
        """Suspect ``node`` at once (its link closed): ALIVE -> SUSPECT."""
        m = self.members.get(node)
        if m is None or m.state is not Liveness.ALIVE:
            return []
        m.state = Liveness.SUSPECT
        return [MemberSuspected(node)]

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        for m in sorted(self.members.values(), key=lambda m: m.node_id):
            silent = now - m.last_heard
            if m.state is Liveness.ALIVE and silent >= self.config.suspect_time:
                m.state = Liveness.SUSPECT
                out.append(MemberSuspected(m.node_id))
            if m.state is Liveness.SUSPECT and silent >= self.config.dead_time:
                m.state = Liveness.DEAD
                out.append(MemberDied(m.node_id))
        return out

    def state(self, node: NodeId) -> Liveness | None:
        if node == self.self_id:
            return Liveness.ALIVE
        m = self.members.get(node)
        return m.state if m else None

    def alive(self) -> list[NodeId]:
        """Live members including this node, sorted."""
        live = [n for n, m in self.members.items() if m.state is Liveness.ALIVE]
        return sorted([self.self_id, *live])

    def priority_of(self, node: NodeId) -> int:
        if node == self.self_id:
            return self.priority
        m = self.members.get(node)
        return m.priority if m else 0

    def rank(self, node: NodeId) -> tuple[int, str]:
        """Higher is better: (priority, node id)."""
        return (self.priority_of(node), node)

    def best_alive(self) -> NodeId:
        return max(self.alive(), key=self.rank)
