"""What goes into the control state machines (events) and what comes out (outputs).

The shell feeds events to ``ControlNode.step(event)`` and the clock to ``ControlNode.tick(now)``;
both return a list of outputs that the shell performs in order: messages to send, effects to run
(load blocks, run a GA island, plan), and notices (leader changed, member died, a log line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshllm.wire.ids import NodeId
from meshllm.wire.messages import Message

Individuals = tuple[tuple[int, ...], ...]


class Event:
    __slots__ = ()


class Output:
    __slots__ = ()


# --- events (shell -> control) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received(Event):
    """A control message from an authenticated peer."""

    src: NodeId
    msg: Message


@dataclass(frozen=True, slots=True)
class ProfileReady(Event):
    """This node's own profile has been measured (or loaded from the cache)."""

    profile: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Islands(Event):
    """Leader: the GA islands to distribute for planning round ``round`` (answer to StartPlanning)."""

    round: int
    islands: tuple[Individuals, ...]
    problem: dict[str, Any]
    generations: int | None = None  # None: config.island_generations


@dataclass(frozen=True, slots=True)
class IslandEvolved(Event):
    """An ``EvolveIsland`` effect has finished (on this node, for whoever asked)."""

    round: int
    island: int
    individuals: Individuals
    fitness: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class ProposePlan(Event):
    """Leader: the plan for round ``round`` (``Plan.to_dict()``), to publish as a new epoch."""

    round: int
    plan: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PlanningFailed(Event):
    round: int
    error: str


@dataclass(frozen=True, slots=True)
class PlanLoaded(Event):
    """The shell has loaded (ok) or failed to load this node's blocks for ``epoch``."""

    epoch: int
    ok: bool = True
    error: str = ""


@dataclass(frozen=True, slots=True)
class EpochIdle(Event):
    """No request of this draining epoch is in flight on this node any more."""

    epoch: int


@dataclass(frozen=True, slots=True)
class LinkLost(Event):
    """The link to ``node`` closed. A killed process closes its sockets, so this is usually the
    first sign of a death: the member is suspected now instead of after ``suspect_after`` silent
    heartbeats (an election starts at once if it led). Its heartbeats clear the suspicion if it is
    alive and redials; silence still makes it dead after ``dead_after`` beats."""

    node: NodeId


@dataclass(frozen=True, slots=True)
class ObservedRequest(Event):
    """A finished request's lengths, for the workload drift detector."""

    input_len: int
    output_len: int


@dataclass(frozen=True, slots=True)
class OperatorReplan(Event):
    reason: str = "operator"


@dataclass(frozen=True, slots=True)
class Shutdown(Event):
    """Leaving the mesh: announce it."""


# --- outputs (control -> shell) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send(Output):
    to: NodeId
    msg: Message


@dataclass(frozen=True, slots=True)
class Broadcast(Output):
    """Send to every authenticated peer link (that is how new peers first hear of us)."""

    msg: Message


@dataclass(frozen=True, slots=True)
class Log(Output):
    level: str  # "info" | "warning"
    message: str


@dataclass(frozen=True, slots=True)
class MemberJoined(Output):
    node: NodeId


@dataclass(frozen=True, slots=True)
class MemberSuspected(Output):
    node: NodeId


@dataclass(frozen=True, slots=True)
class MemberRecovered(Output):
    node: NodeId


@dataclass(frozen=True, slots=True)
class MemberDied(Output):
    node: NodeId


@dataclass(frozen=True, slots=True)
class MemberLeft(Output):
    node: NodeId


@dataclass(frozen=True, slots=True)
class LeaderChanged(Output):
    term: int
    leader: NodeId | None


@dataclass(frozen=True, slots=True)
class StartPlanning(Output):
    """Leader: plan for these members. Answer with ``Islands`` (decentralised GA), or straight
    with ``ProposePlan``, or ``PlanningFailed``."""

    round: int
    members: tuple[NodeId, ...]
    profiles: dict[NodeId, dict[str, Any]]
    reason: str


@dataclass(frozen=True, slots=True)
class EvolveIsland(Output):
    """Run the planner's ``evolve`` on this island, then feed ``IslandEvolved``."""

    round: int
    island: int
    individuals: Individuals
    generations: int
    seed: int
    problem: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IslandsDone(Output):
    """Leader: the merged population of a round; decode the best and answer ``ProposePlan``."""

    round: int
    individuals: Individuals
    fitness: tuple[float, ...]
    fallbacks: tuple[int, ...]  # islands evolved locally because their member did not answer


@dataclass(frozen=True, slots=True)
class LoadPlan(Output):
    """Load this node's blocks for ``epoch`` (keep the active epoch's), then feed ``PlanLoaded``."""

    epoch: int
    plan: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ActivatePlan(Output):
    """Route new requests with ``epoch`` from now on."""

    epoch: int
    plan: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DrainEpoch(Output):
    """Accept no new requests of ``epoch``; finish those in flight, then feed ``EpochIdle``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class UnloadEpoch(Output):
    """Free the blocks held only for ``epoch`` (a drained or aborted epoch)."""

    epoch: int
