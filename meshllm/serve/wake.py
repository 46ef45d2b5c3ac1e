"""Keeping a decoding node's cores awake between its ring's frames (``serve.wake_qos``).

A stage of a decode ring sleeps while the other stages compute, every step, and on a virtual
machine a core that goes idle halts: its vCPU leaves the physical core until a frame lands. That
costs a hop twice: the wake-up itself, and the next step computed on a cold core. Measured on the
2-core development VM (cpuidle driver ``haltpoll`` with halt polling off), two processes that
ping-pong SmolLM2 int4's two halves over a socket, no serving path (ms per token, per stage's
step): fused attention 20.4-22.6 (8.0-8.9 + 11.4-13.0) sleeping, 18.8-19.4 (7.3-7.5 + 11.0-11.5)
with this request held; plain attention 23.0-23.6 against 19.5-20.4. Held, the ring's two hops
cost about 0.2 ms each beyond the stages' compute.

While this node's stages decode, ``WakeQos`` holds a CPU wake-up latency request of 0 µs (Linux
PM QoS: ``/dev/cpu_dma_latency``, in force while the file stays open). The kernel's idle loop
then polls rather than halting: unlike a poll in the process, it never takes a core from a task
that has work, so nodes sharing cores lose nothing to it. It is let go after ``idle_s`` without
a decode step, so an idle node's cores sleep again. Where the file cannot be opened (not root,
not Linux) it says so once and does nothing. The request is machine-wide and keeps the cores out
of their sleep states while rings decode (power): off by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import IO, Any

log = logging.getLogger("meshllm.serve.wake")

PATH = "/dev/cpu_dma_latency"
IDLE_S = 0.5  # let go this long after the last decode step


class WakeQos:
    """Holds a 0 µs CPU wake-up latency request while decode steps run (``decoding``), let go
    ``idle_s`` after the last one, or at ``close``."""

    def __init__(self, enabled: bool, *, idle_s: float = IDLE_S, path: str | None = None) -> None:
        self.enabled = enabled
        self.idle_s = idle_s
        self.path = PATH if path is None else path  # tests point it at a file of their own
        self._file: IO[bytes] | None = None
        self._failed = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.holds = 0  # times the request was taken (for the node's view and tests)

    @property
    def held(self) -> bool:
        return self._file is not None

    def decoding(self, now: float) -> None:
        """A decode step ran at ``now`` (the loop's clock): hold the request, and let it go
        ``idle_s`` after the last such step."""
        if not self.enabled or self._failed:
            return
        self._last = now
        if self._file is None:
            try:
                f = open(self.path, "wb", buffering=0)  # noqa: SIM115 - held open on purpose: that is the request
                f.write(struct.pack("i", 0))
            except OSError as e:
                self._failed = True
                log.warning("serve.wake_qos: cannot hold a CPU wake-up latency request (%s); the cores may halt "
                            "between a ring's frames", e)
                return
            self._file = f
            self.holds += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(now + self.idle_s, self._check)

    def _check(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        due = self._last + self.idle_s
        if loop.time() >= due:
            self.release()
        else:
            self._timer = loop.call_at(due, self._check)

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()  # closing the file withdraws the request

    def view(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "held": self.held, "holds": self.holds, "unavailable": self._failed}
