"""Routing of requests to replicas: the pure scoring both the simulator and the serving router
use, under one of two policies.

A router knows, per replica, how much queued work is ahead of a new request (``queue_s``: its
pending prompts, plus the predicted wait for a decode slot when every slot is taken), how long
the work already running at its first stage has left (``busy_s``), how long the prompt takes to
get there from where it entered (``reach_s``), what the request itself will
cost there (``prefill_s``, ``decode_s``, ``handoff_s``) and, for decoders, whether KV room is
free. Ties always go to the lowest replica id, so every choice is deterministic.

Policies (:data:`POLICIES`), one router for every plan; which one to run follows the mesh's
objective:

- ``"completion"`` (default; objectives latency and throughput): the least predicted
  completion, ``reach_s + queue_s + prefill_s + handoff_s + decode_s``. A request may queue for a fast
  replica when that still finishes sooner than starting at once on a slow one.
- ``"first_token"`` (objective waiting time): the earliest predicted first token, its start
  (``max(reach_s, busy_s) + queue_s``) plus its prefill there; among replicas equally soon, the
  least predicted completion. A prompt waits for a fast replica only while that still gives its
  first token sooner than starting at once on a slow one.
- ``"start"``: the earliest predicted start alone (then the least completion). It minimises
  the time to the prefill's start, and pays for it in the prefill: an idle slow replica always
  wins over a fast one a step away. In the simulator's E2LLM experiment it gave e2llm a wait of
  0.1 ms and a TTFT of 5.9 s on the EdgeShard testbed's long prompts, where ``"first_token"``
  waits 67 ms and answers in 2.7 s (docs/simulator.md); the waiting objective's router ran it
  until then. Kept for experiments (``SimConfig.routing``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshllm.errors import ConfigError

POLICIES = ("completion", "start", "first_token")
START_TOLERANCE_S = 1e-9  # float noise: starts this close are equal and completion decides


@dataclass(frozen=True, slots=True)
class Candidate:
    replica_id: int
    queue_s: float  # predicted time until this replica can start the request (queued work)
    prefill_s: float  # predicted prefill latency of the request there (0 for a pure decoder)
    decode_s: float  # predicted decode time of the request's remaining tokens there
    handoff_s: float = 0.0  # KV hand-off not hidden behind prefill
    has_room: bool = True  # KV slots and bytes free for the request now
    busy_s: float = 0.0  # what is left of the work its first stage is running now
    reach_s: float = 0.0  # the prompt's trip from the entry to the replica's first stage


def policy_for(objective: str) -> str:
    """The routing policy a mesh planned for ``objective`` runs: ``"first_token"`` for waiting
    time, ``"completion"`` otherwise (the node's router, the serving experiment, the simulator's
    E2LLM experiment)."""
    return "first_token" if objective == "waiting" else "completion"


def predicted_completion(c: Candidate) -> float:
    return c.reach_s + c.queue_s + c.prefill_s + c.handoff_s + c.decode_s


def predicted_start(c: Candidate) -> float:
    """When the request's prefill would start: once the prompt is there and the first stage
    has finished what it is running (both at once), after the queued work."""
    return max(c.reach_s, c.busy_s) + c.queue_s


def predicted_first_token(c: Candidate) -> float:
    """When the request's first token would come: its start, then its prefill there."""
    return predicted_start(c) + c.prefill_s


def choose(candidates: Iterable[Candidate], *, need_room: bool = False,
           policy: str = "completion") -> int | None:
    """The chosen replica id under ``policy``, or None if there is none (or, with
    ``need_room``, none with room)."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown routing policy {policy!r}; known: {', '.join(POLICIES)}")
    pool = [c for c in candidates if c.has_room or not need_room]
    if not pool:
        return None
    if policy == "start":
        soonest = min(predicted_start(c) for c in pool)
        pool = [c for c in pool if predicted_start(c) <= soonest + START_TOLERANCE_S]
    elif policy == "first_token":
        first = min(predicted_first_token(c) for c in pool)
        pool = [c for c in pool if predicted_first_token(c) <= first + START_TOLERANCE_S]
    return min(pool, key=lambda c: (predicted_completion(c), c.replica_id)).replica_id
