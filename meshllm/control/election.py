"""Leader election: ballots, votes, and the "best live member leads" rule. Sans-IO.

Leadership is named by a ballot ``(term, leader)`` ordered lexicographically; a node follows the
highest ballot it has seen won (from ``LeaderAnnounce`` or gossiped in heartbeats). Because the
leader's id is part of the ballot there is at most one leader per ballot by construction, even in
a mesh with no fixed membership where a lone node must lead itself; on top of that a node grants
at most one vote per term number, so two leaders of the same term number need disjoint electorates
(a partition). ``docs/control.md`` explains why majorities of a fixed member set cannot be used.

Who campaigns: only a node that is the best (priority, node id) among the members it sees alive,
and only when the leader it follows is not alive to it or is worse than itself. Who grants: a voter
grants a vote for term t to candidate c if it has not voted in t for someone else, has no won
ballot of term >= t, and sees no live member better than c. A candidate wins with a majority of
the members it saw alive when it started; a candidate that cannot reach a majority in
``election_timeout`` backs off and tries again with a higher term.
"""

from __future__ import annotations

import enum

from meshllm.control.config import ControlConfig
from meshllm.control.events import Broadcast, LeaderChanged, Log, Output, Send
from meshllm.control.membership import Liveness, Membership
from meshllm.wire.ids import NodeId
from meshllm.wire.messages import Heartbeat, LeaderAnnounce, RequestVote, Vote


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


Ballot = tuple[int, str]  # (term, leader id or "" for none)


class Election:
    def __init__(self, self_id: NodeId, membership: Membership, config: ControlConfig, start: float) -> None:
        self.self_id = self_id
        self.members = membership
        self.config = config
        self.term = 0
        self.leader: NodeId | None = None
        self.role = Role.FOLLOWER
        self.voted_term = 0
        self.voted_for: NodeId | None = None
        self.max_term_seen = 0
        self.electorate: tuple[NodeId, ...] = ()
        self.granted: set[NodeId] = set()
        self.denied: set[NodeId] = set()
        self.campaign_deadline = 0.0
        self.quiet_until = start + config.discovery_grace
        self.outranked = False  # a leader heard a live member at a higher term: re-win above it

    @property
    def ballot(self) -> Ballot:
        return (self.term, self.leader or "")

    def _set(self, term: int, leader: NodeId | None, role: Role) -> list[Output]:
        changed = (term, leader) != (self.term, self.leader)
        self.term, self.leader, self.role = term, leader, role
        self.max_term_seen = max(self.max_term_seen, term)
        return [LeaderChanged(term, leader)] if changed else []

    # --- claims ---------------------------------------------------------------------------------
    def adopt(self, term: int, leader: NodeId | None) -> list[Output]:
        """A ballot someone won (announced or gossiped): follow it if it is higher than ours."""
        self.max_term_seen = max(self.max_term_seen, term)
        if leader is None or term < 1 or (term, leader) <= self.ballot:
            return []  # term 0 is never won: nobody has campaigned yet
        if leader == self.self_id:
            # A claim that we lead a term we did not win (we restarted and lost state): never follow
            # ourselves blindly; the term bump above makes our next campaign outrank it.
            return []
        return self._set(term, leader, Role.FOLLOWER)

    def on_heartbeat(self, hb: Heartbeat) -> list[Output]:
        if hb.term > self.term and self.role is Role.LEADER:
            # The member voted in a term above ours for a candidate that did not win (say across a
            # partition); it cannot follow our lower ballot, so win a term above its vote (raft's
            # step-down-and-re-elect, without the step-down gap when nobody better is alive).
            self.outranked = True
        return self.adopt(hb.term, hb.leader)

    def on_announce(self, src: NodeId, msg: LeaderAnnounce) -> list[Output]:
        if msg.leader != src:
            return [Log("warning", f"leader_announce from {src} names {msg.leader}; ignored")]
        if (msg.term, msg.leader) < self.ballot:
            return [Log("info", f"stale leader_announce term {msg.term} from {src} "
                                f"(we are at term {self.term}); ignored")]
        return self.adopt(msg.term, msg.leader)

    # --- campaigning ----------------------------------------------------------------------------
    def _should_campaign(self) -> bool:
        if self.role is not Role.FOLLOWER or self.members.best_alive() != self.self_id:
            return False
        if self.leader is None or self.leader == self.self_id:
            return True
        return (self.members.state(self.leader) is not Liveness.ALIVE
                or self.members.rank(self.leader) < self.members.rank(self.self_id))

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self.role is Role.CANDIDATE and now >= self.campaign_deadline:
            out.append(Log("info", f"campaign for term {self.term} timed out "
                                   f"({len(self.granted)}/{len(self.electorate)} votes)"))
            self.role = Role.FOLLOWER
            self.quiet_until = now + self.config.election_backoff
        rewin = self.role is Role.LEADER and self.outranked and self.members.best_alive() == self.self_id
        if rewin or (now >= self.quiet_until and self._should_campaign()):
            out += self._campaign(now)
        self.outranked = False
        return out

    def _campaign(self, now: float) -> list[Output]:
        term = max(self.term, self.voted_term, self.max_term_seen) + 1
        out = self._set(term, None, Role.CANDIDATE)
        self.voted_term, self.voted_for = term, self.self_id
        self.electorate = tuple(self.members.alive())
        self.granted, self.denied = {self.self_id}, set()
        self.campaign_deadline = now + self.config.election_timeout
        if self._won():
            return out + self._win()
        prio = self.members.priority
        out += [Send(n, RequestVote(term, self.self_id, prio)) for n in self.electorate if n != self.self_id]
        return out

    def _won(self) -> bool:
        return len(self.granted) > len(self.electorate) // 2

    def _win(self) -> list[Output]:
        out = self._set(self.term, self.self_id, Role.LEADER)
        return [*out, Broadcast(LeaderAnnounce(self.term, self.self_id))]

    # --- voting ---------------------------------------------------------------------------------
    def on_request_vote(self, src: NodeId, msg: RequestVote) -> list[Output]:
        if msg.candidate != src:
            return [Log("warning", f"request_vote from {src} names candidate {msg.candidate}; ignored")]
        t, c = msg.term, msg.candidate
        self.max_term_seen = max(self.max_term_seen, t)
        reason = ""
        if t < self.term or (t == self.term and self.leader is not None):
            reason = f"stale term {t} (at {self.term})"
        elif self.voted_term == t and self.voted_for not in (None, c):
            reason = f"already voted for {self.voted_for} in term {t}"
        else:
            best = max([*self.members.alive(), c], key=self.members.rank)
            if best != c:
                reason = f"{best} is alive and better"
        if reason:
            return [Send(src, Vote(t, c, self.self_id, False, reason))]
        self.voted_term, self.voted_for = t, c
        out: list[Output] = []
        if t > self.term:
            out += self._set(t, None, Role.FOLLOWER)
        return [*out, Send(src, Vote(t, c, self.self_id, True))]

    def on_vote(self, src: NodeId, msg: Vote, now: float) -> list[Output]:
        if (self.role is not Role.CANDIDATE or msg.term != self.term or msg.candidate != self.self_id
                or msg.voter != src or src not in self.electorate):
            return []  # a late or stray vote: harmless
        (self.granted if msg.granted else self.denied).add(src)
        if self._won():
            return self._win()
        need = len(self.electorate) // 2 + 1
        if len(self.electorate) - len(self.denied) < need:
            self.role = Role.FOLLOWER
            self.quiet_until = now + self.config.election_backoff
            return [Log("info", f"campaign for term {self.term} lost: {msg.reason or 'denied'}")]
        return []
