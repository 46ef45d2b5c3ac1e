"""How a runner slowed F times (``--slowdown F``) paces its steps: steady, not noise times F.

A node slowed F times stands for a device F times slower than this machine. Such a device takes F
times this machine's *typical* step for a shape, not F times whatever this one step took: on a
shared machine a step that other work disturbed (a co-tenant's burst, a descheduled thread, cold
caches) takes longer here, and sleeping (F - 1) times that step multiplied the disturbance by F
(profiles of the same node slowed 3 times moved from 74 to 338 ms a step between runs on the
2-core build machine). So after a step of measured compute ``dt`` the pacer sleeps

    (F - 1) x min(dt, reference)

where ``reference`` is a low quantile (``QUANTILE``) of the last ``WINDOW`` compute times of steps
of the same shape (``key``: a prefill's token count and context, a decode step's batch, positions
per row and context, each bucketed; ``work`` scales a sample to its call, so that a prefill's
reference is per token). The step then takes F x the typical step plus what the disturbance
added, once: ``dt + (F - 1) x reference``. A shape seen once has its own step as the reference
(the old rule). Profiles and serving both call the runner, so a profile measures what the node
then serves with.

The pacer also adds up the CPU seconds its steps computed (``compute_cpu_s``, the calling
thread's CPU time from ``start`` to ``pace``: with one onnxruntime thread, the default, the model
runs on the calling thread), which a node reports (``meshllm_stage_compute_cpu_seconds``) so that
what its process spends besides the model's compute (frames, the stage core, HTTP and SSE) can
be told apart on a machine whose cores the nodes share.

Pure but for the clocks and the sleep, which are passed in (tests inject them).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable

WINDOW = 32  # compute times kept per step shape
QUANTILE = 0.25  # the reference: this quantile of them (the undisturbed step; disturbances only add)
SPIN_S = 3e-4  # the last part of a wait is spun, not slept (time.sleep overshoots by tens of µs)


def bucket(n: int) -> int:
    """A count's power-of-two bucket (0 for 0, 1 for 1, 2 for 2-3, 3 for 4-7, ...)."""
    return max(0, int(n)).bit_length()


class Pacer:
    def __init__(self, slowdown: float, *, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, window: int = WINDOW,
                 quantile: float = QUANTILE, spin_s: float = SPIN_S,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown must be >= 1, got {slowdown}")
        if window < 1 or not 0.0 <= quantile <= 1.0:
            raise ValueError(f"window must be >= 1 and quantile in [0, 1], got {window}, {quantile}")
        self.slowdown = float(slowdown)
        self._clock = clock
        self._sleep = sleep
        self._window = window
        self._quantile = quantile
        self._spin_s = spin_s
        self._cpu_clock = cpu_clock
        self._cpu0: float | None = None
        self.compute_cpu_s = 0.0  # CPU seconds of every step from ``start`` to ``pace``, added up
        self._samples: dict[Hashable, deque[float]] = {}
        self.last_compute_s = 0.0  # the last step's measured compute
        self.last_reference_s = 0.0  # the reference it was paced by (its own compute or less)
        self.last_wait_s = 0.0  # the wait asked after it

    def reference(self, key: Hashable, dt: float, work: float = 1.0) -> float:
        """Record a step of shape ``key`` that computed for ``dt`` seconds (``work`` units of
        work: a prefill's tokens) and return its reference: min(dt, the quantile of the shape's
        recent steps, this one included, scaled to ``work``)."""
        work = max(float(work), 1e-12)
        q = self._samples.get(key)
        if q is None:
            q = self._samples[key] = deque(maxlen=self._window)
        q.append(dt / work)
        ordered = sorted(q)
        typical = ordered[int(self._quantile * (len(ordered) - 1))] * work
        return min(dt, typical)

    def start(self) -> float:
        """A step begins computing: its ``t0`` for ``pace`` (this pacer's clock)."""
        self._cpu0 = self._cpu_clock()
        return self._clock()

    def pace(self, t0: float, key: Hashable = None, work: float = 1.0) -> float:
        """A step of shape ``key`` began computing at ``t0`` (this pacer's clock; from ``start``,
        which also counts its CPU time) and has just ended: wait (F - 1) x its reference. Returns
        its compute time."""
        now = self._clock()
        if self._cpu0 is not None:
            self.compute_cpu_s += max(0.0, self._cpu_clock() - self._cpu0)
            self._cpu0 = None
        dt = now - t0
        self.last_compute_s = dt
        if self.slowdown <= 1.0:
            self.last_reference_s, self.last_wait_s = dt, 0.0
            return dt
        ref = self.reference(key, dt, work)
        self.last_reference_s = ref
        self.last_wait_s = wait = (self.slowdown - 1.0) * ref
        until = now + wait
        rest = until - self._clock() - self._spin_s
        if rest > 0:
            self._sleep(rest)
        while self._clock() < until:
            pass
        return dt
