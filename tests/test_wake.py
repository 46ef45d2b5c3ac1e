"""serve/wake.py: the CPU wake-up latency request a decoding node holds (a file of the test's own
stands in for /dev/cpu_dma_latency)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from waiting import async_wait_until

from meshllm.serve.wake import WakeQos


async def test_held_while_steps_run_and_let_go_after_idle(tmp_path: Path) -> None:
    dev = tmp_path / "cpu_dma_latency"
    w = WakeQos(True, idle_s=0.05, path=str(dev))
    assert not w.held
    loop = asyncio.get_running_loop()
    w.decoding(loop.time())
    assert w.held and dev.read_bytes() == b"\0\0\0\0"
    w.decoding(loop.time())  # still the one request
    assert w.holds == 1
    await async_wait_until(lambda: not w.held, "the request let go after idle_s without a step", 5.0)
    w.decoding(loop.time())  # decoding again takes it again
    assert w.held and w.holds == 2
    w.release()
    assert not w.held


async def test_off_or_unavailable_does_nothing_and_says_so(tmp_path: Path) -> None:
    now = asyncio.get_running_loop().time()
    off = WakeQos(False, path=str(tmp_path / "x"))
    off.decoding(now)
    assert not off.held and not (tmp_path / "x").exists()
    missing = WakeQos(True, path=str(tmp_path / "no" / "such" / "device"))
    missing.decoding(now)  # cannot be opened: logged once, the node goes on
    missing.decoding(now)
    assert not missing.held and missing.view() == {"enabled": True, "held": False, "holds": 0, "unavailable": True}
