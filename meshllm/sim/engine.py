"""A discrete-event queue in logical time.

Events are ordered by (time, sequence number): two events at the same instant run in the order
they were scheduled, so a run is a pure function of its inputs. Scheduling an event in the past is
a bug in the caller and raises at once instead of letting time run backwards.
"""

from __future__ import annotations

import heapq
from typing import Any

from meshllm.errors import MeshError


class SimError(MeshError):
    """The simulator was driven into an impossible state (a bug, or an unusable plan)."""


class EventQueue:
    """A heap of ``(time, seq, kind, payload)``; ``now`` is the time of the last popped event."""

    __slots__ = ("_heap", "_seq", "now", "popped")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.popped = 0

    def push(self, time: float, kind: str, payload: Any = None) -> None:
        if time < self.now:
            # float noise from sums of durations can land a hair before now; anything more is a bug
            if self.now - time > 1e-9 * max(1.0, abs(self.now)):
                raise SimError(f"event {kind!r} scheduled at {time} before now {self.now}")
            time = self.now
        heapq.heappush(self._heap, (time, self._seq, kind, payload))
        self._seq += 1

    def pop(self) -> tuple[float, str, Any]:
        time, _, kind, payload = heapq.heappop(self._heap)
        self.now = time
        self.popped += 1
        return time, kind, payload

    def __len__(self) -> int:
        return len(self._heap)
