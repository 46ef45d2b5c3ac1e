"""``ControlNode``: one node's whole control plane as a sans-IO state machine.

It composes membership, election, plan epochs, the GA island coordinator and the drift detector.
The shell drives it like raft's RawNode:

    outputs = node.tick(loop.time())          # every ~heartbeat_interval / 4
    outputs = node.step(Received(peer, msg))  # every control message from an authenticated peer
    outputs = node.step(PlanLoaded(epoch))    # ... and the other events in ``events``

and performs each output in order (send, broadcast, load, activate, drain, unload, plan, evolve,
log). Time advances only through ``tick``; ``step`` uses the time of the last tick.

Plan epochs (the table, leader side):
    replan requested (membership change, drift, operator, new leader) --debounce-->
    PROFILES: ProfileRequest to members without one --all in or profile_timeout--> StartPlanning
              (over those with a profile; with none yet, wait another profile_timeout); a profile
              that comes later from a member the round planned without --> re-plan
    PLANNING: shell answers Islands (-> coordinator, IslandsDone) and/or ProposePlan
    PROPOSED: PlanPropose{epoch} to all; LoadPlan here --PlanAck ok from every node in the plan-->
              PlanActivate{epoch} to all;  a nack or plan_ack_timeout --> PlanAbort, re-plan later
Node side: PlanPropose --validate--> LoadPlan --PlanLoaded--> PlanAck; PlanActivate --> ActivatePlan
(new requests use it), DrainEpoch(previous) --EpochIdle or drain_timeout--> UnloadEpoch(previous).

The attention kind (``attention`` in every plan the leader proposes; ``runtime/attention.py``) is
chosen once for a mesh: a leader proposes the kind of the newest plan it knows of (its own plans,
or the one its peers' heartbeats name), and its own ``attention`` only where the mesh has none yet,
so a re-plan or a new leader never changes the numbers a resumed request is computed with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from meshllm.control.config import ControlConfig
from meshllm.control.drift import DriftDetector
from meshllm.control.election import Election, Role
from meshllm.control.events import (
    ActivatePlan,
    Broadcast,
    DrainEpoch,
    EpochIdle,
    Event,
    EvolveIsland,
    IslandEvolved,
    Islands,
    LeaderChanged,
    LinkLost,
    LoadPlan,
    Log,
    MemberDied,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    ObservedRequest,
    OperatorReplan,
    Output,
    PlanLoaded,
    PlanningFailed,
    ProfileReady,
    ProposePlan,
    Received,
    Send,
    Shutdown,
    StartPlanning,
    UnloadEpoch,
)
from meshllm.control.islands import IslandCoordinator, Merge, default_merge
from meshllm.control.membership import Liveness, Membership
from meshllm.errors import MeshError, ProtocolError
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId
from meshllm.wire.messages import (
    Heartbeat,
    IslandResult,
    IslandWork,
    LeaderAnnounce,
    Leave,
    Message,
    PlanAbort,
    PlanAck,
    PlanActivate,
    PlanPropose,
    Profile,
    ProfileRequest,
    ReplanRequest,
    RequestVote,
    Vote,
)

PlanValidator = Callable[[dict[str, Any]], None]  # raises (PlanError, ...) when the plan is bad


def default_plan_nodes(plan: dict[str, Any]) -> set[NodeId]:
    """The nodes a plan places blocks on: ``replicas[*].stages[*].node`` (the planner's Plan.to_dict)."""
    nodes: set[NodeId] = set()
    for replica in plan["replicas"]:
        for stage in replica["stages"]:
            node = stage["node"]
            if not isinstance(node, str):
                raise TypeError("stage node must be a string")
            nodes.add(NodeId(node))
    return nodes


def default_planned_lengths(plan: dict[str, Any]) -> tuple[float, float] | None:
    """(mean input length, mean output length) the plan was made for, when the proposed dict carries
    ``workload``: the planner's ``Workload.to_dict()`` (length distributions) or plain means
    (``mean_input_len``/``mean_output_len``)."""
    w = plan.get("workload")
    if not isinstance(w, dict):
        return None
    i, o = w.get("mean_input_len"), w.get("mean_output_len")
    if isinstance(i, int | float) and isinstance(o, int | float):
        return float(i), float(o)
    if "input_len" in w and "output_len" in w:
        from meshllm.planner.types import LengthDist  # the planner's own reading of its dict

        try:
            return LengthDist.from_dict(w["input_len"]).mean, LengthDist.from_dict(w["output_len"]).mean
        except MeshError:
            return None
    return None


@dataclass(slots=True)
class _Proposal:
    epoch: int
    plan: dict[str, Any]
    participants: frozenset[NodeId]
    deadline: float
    resend_at: float
    acks: set[NodeId] = field(default_factory=set)


class ControlNode:
    """One node's control plane. See the module docstring for how to drive it."""

    def __init__(self, node_id: NodeId, *, rng: np.random.Generator, config: ControlConfig | None = None,
                 priority: int = 0, now: float = 0.0, name: str = "",
                 validate_plan: PlanValidator | None = None,
                 plan_nodes: Callable[[dict[str, Any]], Iterable[NodeId]] = default_plan_nodes,
                 planned_lengths: Callable[[dict[str, Any]], tuple[float, float] | None] = default_planned_lengths,
                 merge: Merge = default_merge, codec: Codec | None = None, attention: str | None = None,
                 attention_kinds: Iterable[str] = ()) -> None:
        self.id = node_id
        # the attention kind this node proposes for a mesh that has none yet (None: plans without
        # one), and the kinds it takes from plans and heartbeats (empty: any)
        self.attention = attention
        self.attention_kinds = frozenset(attention_kinds)
        self.mesh_attention: tuple[int, str] | None = None  # (epoch, kind) of the newest plan known
        self.config = config or ControlConfig()
        self.rng = rng
        self.name = name
        self.now = now
        self.codec = codec or Codec()
        self.validate_plan = validate_plan
        self.plan_nodes = plan_nodes
        self.planned_lengths = planned_lengths
        self.merge = merge
        self.membership = Membership(node_id, priority, self.config)
        self.election = Election(node_id, self.membership, self.config, now)
        self.seq = 0
        self.next_heartbeat = now
        self.left = False
        # this node's profile, and a leader's request waiting for it
        self.profile: dict[str, Any] | None = None
        self._profile_wanted: tuple[NodeId, int, int] | None = None
        self._plan_resent: dict[NodeId, float] = {}  # member -> when the active plan went to it again
        # leader side
        self.profiles: dict[NodeId, dict[str, Any]] = {}
        self.replan_reason: str | None = None
        self.replan_at = 0.0
        self.round = 0
        self.phase: str | None = None  # None | "profiles" | "planning" | "proposed"
        self.round_reason = ""
        self.round_started = 0.0
        self.round_members: tuple[NodeId, ...] = ()
        self.planned_members: frozenset[NodeId] = frozenset()  # offered to the last StartPlanning
        self.profile_retry_at = now
        self.coordinator: IslandCoordinator | None = None
        self.proposal: _Proposal | None = None
        self._planning_for: NodeId | None = None  # the leader the planning state below belongs to
        self.excluded: set[NodeId] = set()  # nacked the last epoch: left out until they rejoin
        # node side
        self.plans: dict[int, tuple[tuple[int, str], dict[str, Any]]] = {}  # epoch -> (ballot, plan)
        self.loading: set[int] = set()
        self.loaded: set[int] = set()
        self.active_epoch = 0
        self.draining: dict[int, float] = {}  # epoch -> unload deadline
        self.max_epoch_seen = 0
        self.drift: DriftDetector | None = None
        self.drift_reported = False
        self.remote_work: dict[tuple[int, int], tuple[NodeId, int]] = {}  # (round, island) -> (leader, term)

    # --- queries for the shell ------------------------------------------------------------------
    @property
    def leader(self) -> NodeId | None:
        return self.election.leader

    @property
    def term(self) -> int:
        return self.election.term

    @property
    def is_leader(self) -> bool:
        return self.election.role is Role.LEADER

    @property
    def active_plan(self) -> dict[str, Any] | None:
        entry = self.plans.get(self.active_epoch)
        return entry[1] if entry else None

    @property
    def attention_kind(self) -> str | None:
        """The attention kind the next plan this node proposes names: the mesh's (the newest plan
        known), else this node's own."""
        return self.mesh_attention[1] if self.mesh_attention is not None else self.attention

    def _learn_attention(self, epoch: int, kind: Any) -> None:
        if not isinstance(kind, str) or not kind or (self.attention_kinds and kind not in self.attention_kinds):
            return
        if self.mesh_attention is None or epoch >= self.mesh_attention[0]:
            self.mesh_attention = (epoch, kind)

    def accepts_epoch(self, epoch: int) -> bool:
        """Whether a data-plane message of ``epoch`` may be served here (active or still draining)."""
        return epoch != 0 and (epoch == self.active_epoch or epoch in self.draining)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for ``/v1/mesh``."""
        members = [{"node": self.id, "state": "alive", "priority": self.membership.priority,
                    "name": self.name, "epoch": self.active_epoch, "self": True}]
        for m in sorted(self.membership.members.values(), key=lambda m: m.node_id):
            members.append({"node": m.node_id, "state": m.state.value, "priority": m.priority,
                            "name": m.name, "epoch": m.epoch, "last_heard": m.last_heard, "self": False})
        return {
            "node": self.id, "role": self.election.role.value, "term": self.term, "leader": self.leader,
            "members": members, "active_epoch": self.active_epoch, "plan": self.active_plan,
            "draining": sorted(self.draining), "loading": sorted(self.loading),
            "ready": self.active_epoch != 0,
            "planning": {"round": self.round, "phase": self.phase,
                         "pending_epoch": self.proposal.epoch if self.proposal else None},
        }

    # --- driving --------------------------------------------------------------------------------
    def receive_bytes(self, src: NodeId, data: bytes) -> list[Output]:
        """Decode a control frame from an authenticated peer and step it; bad frames are logged."""
        try:
            msg = self.codec.decode(data)
        except ProtocolError as e:
            return [Log("warning", f"dropped a frame from {src}: {e}")]
        return self.step(Received(src, msg))

    def tick(self, now: float) -> list[Output]:
        if now < self.now:
            return [Log("warning", f"clock went backwards ({now} < {self.now}); tick ignored")]
        self.now = now
        if self.left:
            return []
        out = self._after_membership(self.membership.tick(now))
        out += self._after_election(self.election.tick(now))
        if now >= self.next_heartbeat:
            self.seq += 1
            step = self.config.heartbeat_interval
            # keep the cadence, but after a stall (a late tick) restart it rather than burst
            self.next_heartbeat = self.next_heartbeat + step if now < self.next_heartbeat + step else now + step
            kind = (self.active_plan or {}).get("attention")
            out.append(Broadcast(Heartbeat(self.id, self.term, self.leader, self.membership.priority,
                                           self.seq, self.active_epoch, self.name,
                                           kind if isinstance(kind, str) else "")))
        for epoch, deadline in sorted(self.draining.items()):
            if now >= deadline:
                out.append(Log("warning", f"epoch {epoch} still busy after drain_timeout; unloading"))
                out += self._unload(epoch)
        if self.is_leader:
            out += self._leader_tick(now)
        return out

    def step(self, event: Event) -> list[Output]:
        if self.left:
            return []
        handler = self._EVENTS.get(type(event))
        if handler is None:
            return [Log("warning", f"unknown event {type(event).__name__}")]
        return handler(self, event)

    # --- messages -------------------------------------------------------------------------------
    def _on_received(self, ev: Received) -> list[Output]:
        src, msg = ev.src, ev.msg
        handler = self._MESSAGES.get(type(msg))
        if handler is None:
            return [Log("warning", f"{msg.TYPE} from {src} is not a control-plane message; dropped")]
        claimed = getattr(msg, "node_id", src)
        if claimed != src:
            return [Log("warning", f"{msg.TYPE} from {src} claims to be from {claimed}; dropped")]
        if isinstance(msg, Leave):
            return self._after_membership(self.membership.left(src))
        if isinstance(msg, Heartbeat):
            out = self.membership.heard(src, self.now, priority=msg.priority, name=msg.name, epoch=msg.epoch)
        elif isinstance(msg, RequestVote):
            out = self.membership.heard(src, self.now, priority=msg.priority)
        else:
            out = self.membership.heard(src, self.now)
        out = self._after_membership(out)
        return out + handler(self, src, msg)

    def _on_heartbeat(self, src: NodeId, msg: Heartbeat) -> list[Output]:
        self.max_epoch_seen = max(self.max_epoch_seen, msg.epoch)
        if msg.epoch:
            self._learn_attention(msg.epoch, msg.attention)
        out = self._after_election(self.election.on_heartbeat(msg))
        # Catch up on a lost PlanActivate: the leader runs an epoch we hold (and have loaded).
        if (src == self.leader and msg.term == self.term and msg.epoch > self.active_epoch
                and msg.epoch in self.plans and msg.epoch in self.loaded):
            out += self._activate(msg.epoch)
        # Catch up on a lost PlanPropose: the leader resends only to the nodes that hold blocks of
        # a plan until they ack, so a member without blocks (every node routes requests with the
        # plan) that lost the broadcast would never get it; its heartbeat shows it behind, and the
        # active plan goes to it again (it loads, acks, and activates on the next heartbeat).
        if (self.is_leader and msg.term == self.term and src != self.id and msg.epoch < self.active_epoch
                and self.active_epoch in self.plans
                and self.now >= self._plan_resent.get(src, -math.inf) + 3 * self.config.heartbeat_interval):
            self._plan_resent[src] = self.now
            out.append(Send(src, PlanPropose(self.term, self.id, self.active_epoch, self.plans[self.active_epoch][1])))
        return out

    def _on_request_vote(self, src: NodeId, msg: RequestVote) -> list[Output]:
        return self._after_election(self.election.on_request_vote(src, msg))

    def _on_vote(self, src: NodeId, msg: Vote) -> list[Output]:
        return self._after_election(self.election.on_vote(src, msg, self.now))

    def _on_announce(self, src: NodeId, msg: LeaderAnnounce) -> list[Output]:
        return self._after_election(self.election.on_announce(src, msg))

    def _from_leader(self, src: NodeId, msg: Any) -> tuple[bool, list[Output]]:
        """Whether ``msg`` comes from the leader we follow (after adopting a higher won ballot it
        names), and the outputs so far (the adoption's, or the log line for dropping it)."""
        if msg.leader != src:
            return False, [Log("warning", f"{msg.TYPE} from {src} names leader {msg.leader}; dropped")]
        out: list[Output] = []
        if (msg.term, msg.leader) > self.election.ballot and msg.leader != self.id:
            out = self._after_election(self.election.adopt(msg.term, msg.leader))
        if (msg.term, msg.leader) != self.election.ballot:
            return False, [*out, Log("warning", f"stale {msg.TYPE} from {src} (term {msg.term}; we follow "
                                                f"{self.leader or 'nobody'} in term {self.term}); dropped")]
        return True, out

    def _on_profile_request(self, src: NodeId, msg: ProfileRequest) -> list[Output]:
        ok, out = self._from_leader(src, msg)
        if not ok:
            return out
        if self.profile is None:
            self._profile_wanted = (src, msg.term, msg.round)
            return out
        return [*out, Send(src, Profile(self.id, msg.term, msg.round, self.profile))]

    def _on_profile(self, src: NodeId, msg: Profile) -> list[Output]:
        if not self.is_leader:
            return []
        return self._got_profile(src, msg.profile)

    def _on_plan_propose(self, src: NodeId, msg: PlanPropose) -> list[Output]:
        ok, out = self._from_leader(src, msg)
        return out + self._consider_plan(msg.term, msg.leader, msg.epoch, msg.plan) if ok else out

    def _on_plan_ack(self, src: NodeId, msg: PlanAck) -> list[Output]:
        if not self.is_leader:
            return []
        return self._got_ack(src, msg.epoch, msg.ok, msg.error)

    def _on_plan_activate(self, src: NodeId, msg: PlanActivate) -> list[Output]:
        ok, out = self._from_leader(src, msg)
        if not ok:
            return out
        if msg.epoch not in self.plans:
            return [*out, Log("warning", f"plan_activate for unknown epoch {msg.epoch} from {src}; dropped")]
        if msg.epoch <= self.active_epoch:
            return out
        return out + self._activate(msg.epoch)

    def _on_plan_abort(self, src: NodeId, msg: PlanAbort) -> list[Output]:
        ok, out = self._from_leader(src, msg)
        return out + self._abort_local(msg.epoch, msg.reason) if ok else out

    def _on_island_work(self, src: NodeId, msg: IslandWork) -> list[Output]:
        ok, out = self._from_leader(src, msg)
        if not ok:
            return out
        self.remote_work[(msg.round, msg.island)] = (src, msg.term)
        return [*out, EvolveIsland(msg.round, msg.island, msg.individuals, msg.generations, msg.seed,
                                   msg.problem)]

    def _on_island_result(self, src: NodeId, msg: IslandResult) -> list[Output]:
        if not self.is_leader or self.coordinator is None or msg.term != self.term:
            return [Log("info", f"island_result from {src} with no round in progress; ignored")]
        return self.coordinator.on_result(src, msg)

    def _on_replan_request(self, src: NodeId, msg: ReplanRequest) -> list[Output]:
        if not self.is_leader:
            return [Log("info", f"replan_request from {src} but {self.leader} leads; ignored")]
        return self._request_replan(f"{msg.reason} (from {src})")

    def _on_leave(self, src: NodeId, msg: Leave) -> list[Output]:  # handled in _on_received
        return []

    # --- local events ---------------------------------------------------------------------------
    def _on_profile_ready(self, ev: ProfileReady) -> list[Output]:
        self.profile = ev.profile
        out: list[Output] = []
        if self.is_leader:
            out += self._got_profile(self.id, ev.profile)
        elif self._profile_wanted is not None:
            leader, term, rnd = self._profile_wanted
            out.append(Send(leader, Profile(self.id, term, rnd, ev.profile)))
        elif self.leader is not None and self.leader != self.id:
            out.append(Send(self.leader, Profile(self.id, self.term, 0, ev.profile)))
        self._profile_wanted = None
        return out

    def _on_islands(self, ev: Islands) -> list[Output]:
        if not self.is_leader or ev.round != self.round or self.phase != "planning":
            return [Log("info", f"islands for round {ev.round} arrived outside planning; ignored")]
        workers = [n for n in self.round_members if self.membership.state(n) is Liveness.ALIVE]
        self.coordinator = IslandCoordinator(
            self_id=self.id, term=self.term, round=self.round, islands=ev.islands, workers=workers,
            problem=ev.problem, generations=ev.generations or self.config.island_generations, rng=self.rng,
            now=self.now, deadline=self.config.island_deadline, merge=self.merge)
        return self.coordinator.start()

    def _on_island_evolved(self, ev: IslandEvolved) -> list[Output]:
        c = self.coordinator
        if self.is_leader and c is not None and ev.round == c.round and c.is_local(ev.island):
            return c.on_local(ev)
        asked = self.remote_work.pop((ev.round, ev.island), None)
        if asked is None:
            return [Log("info", f"island {ev.island} of round {ev.round} evolved but nobody asked; dropped")]
        leader, term = asked
        return [Send(leader, IslandResult(term, ev.round, ev.island, self.id, ev.individuals, ev.fitness))]

    def _on_propose_plan(self, ev: ProposePlan) -> list[Output]:
        if not self.is_leader or ev.round != self.round or self.phase != "planning":
            return [Log("info", f"plan for round {ev.round} arrived outside planning; ignored")]
        problem = self._plan_problem(ev.plan)
        if problem:
            self.phase = None
            return [Log("warning", f"planner produced an invalid plan: {problem}; not proposed")]
        epoch = max(self.max_epoch_seen, self.active_epoch, *self.plans.keys(),
                    *(m.epoch for m in self.membership.members.values())) + 1
        plan = {**ev.plan, "epoch": epoch}  # the planner's Plan.from_dict reads the epoch from the dict
        if self.attention_kind is not None:  # the mesh's kind, kept across re-plans and leaders
            plan["attention"] = self.attention_kind
        participants = frozenset(self.plan_nodes(plan))
        gone = sorted(n for n in participants if self.membership.state(n) is not Liveness.ALIVE)
        if gone:  # the mesh changed while planning: their acks would never come
            self.phase = None
            return [Log("info", f"plan for round {ev.round} places blocks on {', '.join(gone)}, "
                                f"not alive now; not proposed"),
                    *self._request_replan(f"{', '.join(gone)} gone while planning", delay=0.0)]
        self.proposal = _Proposal(epoch, plan, participants, self.now + self.config.plan_ack_timeout,
                                  self.now + self.config.heartbeat_interval)
        self.phase = "proposed"
        out: list[Output] = [Broadcast(PlanPropose(self.term, self.id, epoch, plan))]
        return out + self._consider_plan(self.term, self.id, epoch, plan)

    def _on_planning_failed(self, ev: PlanningFailed) -> list[Output]:
        if not self.is_leader or ev.round != self.round:
            return []
        self.phase = None
        self.coordinator = None
        return [Log("warning", f"planning round {ev.round} failed: {ev.error}")]

    def _on_plan_loaded(self, ev: PlanLoaded) -> list[Output]:
        if ev.epoch not in self.loading:
            return [Log("info", f"epoch {ev.epoch} loaded but no longer wanted")]
        self.loading.discard(ev.epoch)
        ballot = self.plans[ev.epoch][0]
        if ev.ok:
            self.loaded.add(ev.epoch)
        else:
            self.plans.pop(ev.epoch, None)
        return self._ack(ev.epoch, ev.ok, ev.error, ballot)

    def _on_epoch_idle(self, ev: EpochIdle) -> list[Output]:
        return self._unload(ev.epoch) if ev.epoch in self.draining else []

    def _on_observed(self, ev: ObservedRequest) -> list[Output]:
        if self.drift is None or self.drift_reported:
            return []
        report = self.drift.observe(ev.input_len, ev.output_len)
        if report is None:
            return []
        self.drift_reported = True
        detail = report.to_dict()
        msg = (f"workload drift: mean lengths in/out {detail['input_mean']:.0f}/{detail['output_mean']:.0f}, "
               f"planned {detail['planned_input_mean']:.0f}/{detail['planned_output_mean']:.0f}")
        return [Log("info", msg), *self._ask_replan("drift", detail)]

    def _on_operator(self, ev: OperatorReplan) -> list[Output]:
        return self._ask_replan(ev.reason, {})

    def _on_link_lost(self, ev: LinkLost) -> list[Output]:
        out = self._after_membership(self.membership.suspect(ev.node))
        plan = self.active_plan
        if out and plan is not None:
            try:
                placed = ev.node in set(self.plan_nodes(plan))
            except (KeyError, TypeError):
                placed = False
            if placed:
                # a node the plan serves on lost its links: plan around it now rather than after
                # dead_after silent heartbeats (if it comes back, its recovery re-plans it in)
                out += self._request_replan(f"the link to {ev.node} closed")
        return out

    def _on_shutdown(self, ev: Shutdown) -> list[Output]:
        self.left = True
        return [Broadcast(Leave(self.id))]

    # --- plan epochs, node side -----------------------------------------------------------------
    def _plan_problem(self, plan: Any) -> str:
        """Why ``plan`` is unacceptable ('' if fine): the injected validator, then the node list."""
        try:
            if not isinstance(plan, dict):
                raise TypeError("plan must be a map")
            if self.validate_plan is not None:
                self.validate_plan(plan)
            if not set(self.plan_nodes(plan)):
                raise ValueError("plan places no blocks")
        except (MeshError, KeyError, TypeError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return ""

    def _consider_plan(self, term: int, leader: NodeId, epoch: int, plan: dict[str, Any]) -> list[Output]:
        self.max_epoch_seen = max(self.max_epoch_seen, epoch)
        if epoch <= self.active_epoch:
            return [Log("warning", f"plan_propose for epoch {epoch} but epoch {self.active_epoch} "
                                   f"is active; dropped")]
        ballot = (term, leader)
        known = self.plans.get(epoch)
        if known is not None and known[0] == ballot:
            # a resend: answer again if we are done loading
            return self._ack(epoch, True, "") if epoch in self.loaded else []
        problem = self._plan_problem(plan)
        if problem:
            return [Log("warning", f"rejected plan for epoch {epoch} from {leader}: {problem}"),
                    *self._ack(epoch, False, problem, ballot)]
        out: list[Output] = []
        for old in sorted(e for e in self.plans if e not in self.draining and e != self.active_epoch):
            if old <= epoch:  # superseded before activation (or the same epoch from a newer leader)
                out += self._drop_pending(old)
        self.plans[epoch] = (ballot, plan)
        self._learn_attention(epoch, plan.get("attention"))
        self.loading.add(epoch)
        return [*out, LoadPlan(epoch, plan)]

    def _drop_pending(self, epoch: int) -> list[Output]:
        self.plans.pop(epoch, None)
        self.loading.discard(epoch)
        self.loaded.discard(epoch)
        return [UnloadEpoch(epoch)]

    def _ack(self, epoch: int, ok: bool, error: str, ballot: tuple[int, str] | None = None) -> list[Output]:
        if ballot is None:
            entry = self.plans.get(epoch)
            ballot = entry[0] if entry else None
        if ballot != self.election.ballot:
            return []  # proposed under a leadership that has ended; the new leader will re-plan
        if self.is_leader:
            return self._got_ack(self.id, epoch, ok, error)
        if self.leader is None:
            return []
        return [Send(self.leader, PlanAck(self.term, epoch, self.id, ok, error))]

    def _activate(self, epoch: int) -> list[Output]:
        prev = self.active_epoch
        self.active_epoch = epoch
        plan = self.plans[epoch][1]
        out: list[Output] = [ActivatePlan(epoch, plan)]
        if prev and prev in self.plans:
            self.draining[prev] = self.now + self.config.drain_timeout
            out.append(DrainEpoch(prev))
        for old in sorted(e for e in self.plans if e < epoch and e not in self.draining):
            out += self._drop_pending(old)
        lengths = self.planned_lengths(plan)
        cfg = self.config
        self.drift = (DriftDetector(*lengths, window=cfg.drift_window, min_samples=cfg.drift_min_samples,
                                    ratio=cfg.drift_ratio) if lengths else None)
        self.drift_reported = False
        return out

    def _unload(self, epoch: int) -> list[Output]:
        self.draining.pop(epoch, None)
        self.plans.pop(epoch, None)
        self.loaded.discard(epoch)
        return [UnloadEpoch(epoch)]

    def _abort_local(self, epoch: int, reason: str) -> list[Output]:
        if epoch == self.active_epoch or epoch not in self.plans:
            return []
        return [Log("info", f"epoch {epoch} aborted: {reason}"), *self._drop_pending(epoch)]

    # --- leader side ----------------------------------------------------------------------------
    def _ask_replan(self, reason: str, detail: dict[str, Any]) -> list[Output]:
        if self.is_leader:
            return self._request_replan(reason)
        if self.leader is None or self.membership.state(self.leader) is not Liveness.ALIVE:
            return [Log("warning", f"re-plan ({reason}) wanted but there is no live leader")]
        return [Send(self.leader, ReplanRequest(self.id, reason, detail))]

    def _request_replan(self, reason: str, delay: float | None = None) -> list[Output]:
        if not self.is_leader:
            return []
        at = self.now + (self.config.replan_debounce if delay is None else delay)
        if self.replan_reason is None:
            self.replan_reason, self.replan_at = reason, at
        else:
            self.replan_reason = f"{self.replan_reason}; {reason}"
            self.replan_at = max(self.replan_at, at)
        return [Log("info", f"re-plan scheduled: {reason}")]

    def _got_profile(self, node: NodeId, profile: dict[str, Any]) -> list[Output]:
        new = node not in self.profiles
        self.profiles[node] = profile
        if self.phase == "profiles":
            return self._maybe_start_planning()
        if new and node not in self.planned_members:
            # A member the last round planned without: one that joined after it, or whose profile
            # came after the round stopped waiting (a slow device measuring a large model takes
            # longer than profile_timeout). It was once left out for good when it had been in the
            # round: a mesh whose every profile came late never planned at all.
            return self._request_replan(f"profile of {node} arrived")
        return []

    def _after_membership(self, events: list[Output]) -> list[Output]:
        out = list(events)
        for ev in events:
            if isinstance(ev, MemberJoined):
                self.excluded.discard(ev.node)
                out += self._request_replan(f"{ev.node} joined")
            elif isinstance(ev, MemberRecovered) and self.is_leader and ev.node not in self.planned_members:
                # suspected when the last plan was made, so the planner never saw it
                out += self._request_replan(f"{ev.node} is back")
            elif isinstance(ev, MemberDied | MemberLeft):
                self.profiles.pop(ev.node, None)
                gone = f"{ev.node} {'died' if isinstance(ev, MemberDied) else 'left'}"
                if self.is_leader and self.proposal is not None and ev.node in self.proposal.participants:
                    out += self._abort_proposal(gone)  # its ack will never come
                out += self._request_replan(gone)
                if self.is_leader and self.phase == "profiles":
                    out += self._maybe_start_planning()
        return out

    def _after_election(self, events: list[Output]) -> list[Output]:
        out = list(events)
        for ev in events:
            if isinstance(ev, LeaderChanged) and ev.leader is not None and (
                    ev.leader != self._planning_for or ev.leader == self.id):
                # A new leadership (another leader, or this node winning a term, again or not): what
                # planning was in flight is void; members drop its pending epoch when the next one
                # comes, and acks to a ballot that has ended are not sent.
                self._planning_for = ev.leader
                self.phase, self.coordinator, self.proposal = None, None, None
                self.replan_reason = None
                self.remote_work.clear()
                if ev.leader == self.id:
                    if self.profile is not None:
                        self.profiles[self.id] = self.profile
                    out += self._request_replan(f"new leader in term {ev.term}")
        return out

    def _leader_tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        p = self.proposal
        if p is not None and now >= p.deadline:
            missing = sorted(p.participants - p.acks)
            out += self._abort_proposal(f"no plan_ack from {', '.join(missing)} in time")
        elif p is not None and now >= p.resend_at:
            p.resend_at = now + self.config.heartbeat_interval
            for n in sorted(p.participants - p.acks - {self.id}):
                out.append(Send(n, PlanPropose(self.term, self.id, p.epoch, p.plan)))
        if self.coordinator is not None:
            out += self.coordinator.tick(now)
        if now >= self.profile_retry_at:
            # Profile requests and answers can be lost: keep asking live members we have none for
            # (an answer outside a round triggers a re-plan that includes the member).
            self.profile_retry_at = now + self.config.heartbeat_interval
            out += [Send(n, ProfileRequest(self.term, self.id, self.round)) for n in self.membership.alive()
                    if n != self.id and n not in self.profiles and n not in self.excluded
                    and (self.phase is not None or self.round > 0)]
        if self.phase == "profiles" and now >= self.round_started + self.config.profile_timeout:
            if any(n in self.profiles for n in self.round_members):
                out += self._start_planning()
            else:  # nothing to plan over yet: wait another profile_timeout rather than fail a round
                self.round_started = now
                out.append(Log("info", f"planning round {self.round}: no profile yet from "
                                       f"{', '.join(self.round_members)}; waiting"))
        if self.phase is None and self.replan_reason is not None and now >= self.replan_at:
            out += self._start_round(now)
        return out

    def _start_round(self, now: float) -> list[Output]:
        self.round += 1
        self.round_reason, self.replan_reason = self.replan_reason or "", None
        self.round_started = now
        self.profile_retry_at = now + self.config.heartbeat_interval
        self.round_members = tuple(n for n in self.membership.alive() if n not in self.excluded)
        self.phase = "profiles"
        out: list[Output] = [Send(n, ProfileRequest(self.term, self.id, self.round))
                             for n in self.round_members if n != self.id and n not in self.profiles]
        return out + self._maybe_start_planning()

    def _maybe_start_planning(self) -> list[Output]:
        if all(n in self.profiles for n in self.round_members
               if self.membership.state(n) is Liveness.ALIVE):
            return self._start_planning()
        return []

    def _start_planning(self) -> list[Output]:
        members = tuple(n for n in self.round_members
                        if n in self.profiles and self.membership.state(n) is Liveness.ALIVE)
        self.phase = "planning"
        self.planned_members = frozenset(members)
        return [StartPlanning(self.round, members, {n: self.profiles[n] for n in members}, self.round_reason)]

    def _got_ack(self, node: NodeId, epoch: int, ok: bool, error: str) -> list[Output]:
        p = self.proposal
        if p is None or epoch != p.epoch:
            return []
        if not ok:
            self.excluded.add(node)
            return self._abort_proposal(f"{node} cannot load epoch {epoch}: {error}")
        p.acks.add(node)
        if not p.participants <= p.acks:
            return []
        self.proposal, self.phase = None, None
        return [Broadcast(PlanActivate(self.term, self.id, epoch)), *self._activate(epoch)]

    def _abort_proposal(self, reason: str) -> list[Output]:
        p = self.proposal
        assert p is not None
        self.proposal, self.phase = None, None
        out: list[Output] = [Log("warning", f"epoch {p.epoch} aborted: {reason}"),
                             Broadcast(PlanAbort(self.term, self.id, p.epoch, reason))]
        if p.epoch in self.plans and p.epoch != self.active_epoch:
            out += self._drop_pending(p.epoch)
        return out + self._request_replan("previous epoch aborted", delay=self.config.replan_backoff)

    _EVENTS: ClassVar[dict[type, Callable[[ControlNode, Any], list[Output]]]] = {}
    _MESSAGES: ClassVar[dict[type, Callable[[ControlNode, NodeId, Any], list[Output]]]] = {}


ControlNode._EVENTS = {
    Received: ControlNode._on_received, ProfileReady: ControlNode._on_profile_ready,
    Islands: ControlNode._on_islands, IslandEvolved: ControlNode._on_island_evolved,
    ProposePlan: ControlNode._on_propose_plan, PlanningFailed: ControlNode._on_planning_failed,
    PlanLoaded: ControlNode._on_plan_loaded, EpochIdle: ControlNode._on_epoch_idle,
    ObservedRequest: ControlNode._on_observed, OperatorReplan: ControlNode._on_operator,
    Shutdown: ControlNode._on_shutdown, LinkLost: ControlNode._on_link_lost,
}
ControlNode._MESSAGES = {
    Heartbeat: ControlNode._on_heartbeat, RequestVote: ControlNode._on_request_vote,
    Vote: ControlNode._on_vote, LeaderAnnounce: ControlNode._on_announce, Leave: ControlNode._on_leave,
    ProfileRequest: ControlNode._on_profile_request, Profile: ControlNode._on_profile,
    PlanPropose: ControlNode._on_plan_propose, PlanAck: ControlNode._on_plan_ack,
    PlanActivate: ControlNode._on_plan_activate, PlanAbort: ControlNode._on_plan_abort,
    IslandWork: ControlNode._on_island_work, IslandResult: ControlNode._on_island_result,
    ReplanRequest: ControlNode._on_replan_request,
}

__all__ = ["ControlNode", "Message", "default_plan_nodes", "default_planned_lengths"]
