"""Waiting in tests: for a condition, with a deadline, never a fixed time.

Every test that waits goes through here, so a timeout always names what was awaited (plus any
state ``describe`` adds) and the poll interval lives in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.05  # how often a condition is re-checked; short against every deadline used


def _timeout(what: str, deadline_s: float, describe: Callable[[], str] | None) -> AssertionError:
    extra = f"; {describe()}" if describe is not None else ""
    return AssertionError(f"timed out after {deadline_s} s waiting for {what}{extra}")


def wait_until(cond: Callable[[], T], what: str, deadline_s: float, *,
               check: Callable[[], None] | None = None,
               describe: Callable[[], str] | None = None) -> T:
    """Poll ``cond`` until it returns something truthy and return that. ``check`` runs every
    round and may raise to give up early (a process that died); ``describe`` adds state to the
    timeout message."""
    end = time.monotonic() + deadline_s
    while True:
        value = cond()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() >= end:
            raise _timeout(what, deadline_s, describe)
        time.sleep(POLL_S)


async def async_wait_until(cond: Callable[[], T], what: str, deadline_s: float, *,
                           describe: Callable[[], str] | None = None) -> T:
    """``wait_until`` for code on an event loop: the loop keeps running between polls."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        value = cond()
        if value:
            return value
        if loop.time() >= end:
            raise _timeout(what, deadline_s, describe)
        await asyncio.sleep(POLL_S)
