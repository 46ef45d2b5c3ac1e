"""The stage host: runners per epoch (loaded, reused, unloaded), the one inference thread, the KV
budget left after the weights, and the in-flight counts that drive draining."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshllm.errors import CapacityError, MeshError
from meshllm.model.manifest import Manifest
from meshllm.serve.stages import StageHost, _resident_weight_bytes


def host(manifest: Manifest, budget: int = 1 << 30) -> StageHost:
    return StageHost(manifest, threads=1, slowdown=1.0, budget_bytes=budget)


async def test_load_reuse_and_unload(tiny_manifest: Manifest) -> None:
    h = host(tiny_manifest)
    nb = tiny_manifest.config.num_blocks
    try:
        await h.load(3, [(0, 2), (2, nb)])
        assert h.epochs() == [3] and h.has_epoch(3) and h.ranges(3) == [(0, 2), (2, nb)]
        a, b = h.runners(3)
        assert (a.first, a.end, b.first, b.end) == (0, 2, 2, nb)
        assert h.runner(3, 0) is a and h.runner(3, 2) is b and h.runner(3, 1) is None
        # A later epoch with the same ranges shares the runners instead of building them again.
        await h.load(4, [(0, 2), (2, nb)])
        assert h.runner(4, 0) is a and h.runner(4, 2) is b
        # Another split builds new ones.
        await h.load(5, [(0, nb)])
        assert h.runner(5, 0) is not a
        h.unload(3)
        assert h.epochs() == [4, 5] and not h.has_epoch(3) and h.runners(3) == [] and h.ranges(3) == []
        assert h.runner(4, 0) is a  # the shared runners stay with epoch 4
        h.unload(4)
        h.unload(4)  # unloading twice is harmless
        assert h.epochs() == [5]
    finally:
        await h.close()


async def test_runners_have_the_attention_kind_the_plan_names(tiny_manifest: Manifest) -> None:
    """The kind comes with each load (the plan's): the same ranges of another kind are new
    runners, never shared ones; an unknown kind is an error and loads nothing."""
    h = host(tiny_manifest)
    nb = tiny_manifest.config.num_blocks
    try:
        await h.load(1, [(0, nb)])
        fused = h.runner(1, 0)
        assert h.attention(1) == "fused" and fused is not None and not fused.one_pass
        await h.load(2, [(0, nb)], attention="plain")
        plain = h.runner(2, 0)
        assert h.attention(2) == "plain" and plain is not None and plain.one_pass and plain is not fused
        await h.load(3, [(0, nb)], attention="plain")
        assert h.runner(3, 0) is plain
        with pytest.raises(MeshError, match="unknown attention kind 'gqa'"):
            await h.load(4, [(0, nb)], attention="gqa")
        assert not h.has_epoch(4) and h.attention(4) is None
    finally:
        await h.close()


async def test_unload_tells_the_hooks_first_and_wins_over_a_load_in_progress(tiny_manifest: Manifest) -> None:
    h = host(tiny_manifest)
    nb = tiny_manifest.config.num_blocks
    seen: list[tuple[int, bool]] = []
    h.on_unload(lambda e: seen.append((e, h.has_epoch(e))))
    try:
        await h.load(1, [(0, nb)])
        h.unload(1)
        assert seen == [(1, True)]  # the hook still sees the runners (to free their KV)
        loading = asyncio.ensure_future(h.load(2, [(0, 1)]))
        await asyncio.sleep(0)  # the load has started
        h.unload(2)
        await loading
        assert not h.has_epoch(2) and h.epochs() == []
        await h.load(2, [(0, 1)])  # the same epoch proposed again loads normally
        assert h.ranges(2) == [(0, 1)]
    finally:
        await h.close()


async def test_every_call_runs_on_one_inference_thread(tiny_manifest: Manifest) -> None:
    h = host(tiny_manifest)
    try:
        def who(i: int) -> tuple[int, str, int]:
            t = threading.current_thread()
            return t.ident or 0, t.name, i

        got = await asyncio.gather(*(h.call(who, i) for i in range(16)))
        assert [g[2] for g in got] == list(range(16))
        assert len({g[0] for g in got}) == 1
        assert got[0][0] != threading.get_ident() and got[0][1].startswith("meshllm-infer")

        def boom() -> None:
            raise ValueError("bad row")

        with pytest.raises(ValueError, match="bad row"):
            await h.call(boom)
    finally:
        await h.close()
    with pytest.raises(MeshError, match="closed"):
        await h.call(who, 0)


async def test_kv_budget_is_what_the_weights_leave_split_over_the_ranges(tiny_manifest: Manifest) -> None:
    nb = tiny_manifest.config.num_blocks
    ranges = [(0, 2), (2, nb)]
    probe = host(tiny_manifest)
    try:
        await probe.load(1, ranges)
        runners = probe.runners(1)
        weights = sum(_resident_weight_bytes(r) or sum(c.param_bytes for c in tiny_manifest.costs[r.first:r.end])
                      for r in runners)
        per_token = runners[1].kv_bytes_per_token  # the range with more layers
    finally:
        await probe.close()
    # Room for exactly 10 positions of the larger range, each range getting half of what is left.
    h = host(tiny_manifest, budget=weights + 2 * 10 * per_token)
    try:
        await h.load(1, ranges)
        r = h.runner(1, 2)
        assert r is not None
        await h.call(r.alloc, "fits", 10)
        await h.call(r.free, "fits")
        with pytest.raises(CapacityError):
            await h.call(r.alloc, "too long", 11)
    finally:
        await h.close()


async def test_a_range_outside_the_model_is_a_clear_error(tiny_manifest: Manifest) -> None:
    h = host(tiny_manifest)
    try:
        with pytest.raises(MeshError, match="block range"):
            await h.load(1, [(0, 99)])
        assert not h.has_epoch(1)
    finally:
        await h.close()


async def test_drain_fires_on_idle_exactly_once(tiny_manifest: Manifest) -> None:
    h = host(tiny_manifest)
    fired: list[str] = []

    async def settle() -> None:
        for _ in range(3):  # on_idle comes through loop.call_soon
            await asyncio.sleep(0)

    try:
        h.begin(7, "a")
        h.begin(7, "b")
        h.begin(7, "b")  # the same request twice counts once
        h.begin(8, "c")
        assert (h.inflight(7), h.inflight(8)) == (2, 1)
        h.drain(7, lambda: fired.append("7"))
        h.end(7, "a")
        await settle()
        assert fired == [] and h.inflight(7) == 1
        h.end(7, "b")
        assert fired == []  # not synchronously: via call_soon
        await settle()
        assert fired == ["7"] and h.inflight(7) == 0
        h.end(7, "b")  # idempotent
        h.end(7, "zzz")  # unknown request
        h.begin(7, "d")  # a late request after idle does not fire it again
        h.end(7, "d")
        await settle()
        assert fired == ["7"]
        h.drain(9, lambda: fired.append("9"))  # nothing in flight: at once
        await settle()
        assert fired == ["7", "9"] and h.inflight(8) == 1
    finally:
        await h.close()
