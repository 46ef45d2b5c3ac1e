"""Routing by least predicted completion time: the pure scoring both the simulator and the
serving router use.

A router knows, per replica, how much queued work is ahead of a new request (``queue_s``), what
the request itself will cost there (``prefill_s``, ``decode_s``) and, for decoders, whether KV
room is free. It sends the request where it is predicted to finish first; ties go to the lowest
replica id so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    replica_id: int
    queue_s: float  # predicted time until this replica can start the request
    prefill_s: float  # predicted prefill latency of the request there (0 for a pure decoder)
    decode_s: float  # predicted decode time of the request's remaining tokens there
    handoff_s: float = 0.0  # KV hand-off not hidden behind prefill
    has_room: bool = True  # KV slots and bytes free for the request now


def predicted_completion(c: Candidate) -> float:
    return c.queue_s + c.prefill_s + c.handoff_s + c.decode_s


def choose(candidates: Iterable[Candidate], *, need_room: bool = False) -> int | None:
    """The replica id with the least predicted completion, or None if there is none (or, with
    ``need_room``, none with room)."""
    best: tuple[float, int] | None = None
    for c in candidates:
        if need_room and not c.has_room:
            continue
        key = (predicted_completion(c), c.replica_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]
