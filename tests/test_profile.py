"""Self-profiling: every block measured with the node's threads; --slowdown shows in the numbers;
the cache is keyed by (model, machine, threads, slowdown) and the memory budget is applied on top."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from meshllm.model.manifest import Manifest
from meshllm.runtime.profile import (
    PROFILE_VERSION,
    NodeProfile,
    cache_path,
    idle_fit,
    load_or_measure,
    measure,
)


def test_slowdown_is_visible_in_the_measured_profile(tiny_manifest: Manifest) -> None:
    seen: list[tuple[int, int, str]] = []
    fast = measure(tiny_manifest, threads=1, memory_bytes=1 << 30, decode_steps=4,
                   progress=lambda i, n, what: seen.append((i, n, what)))
    slow = measure(tiny_manifest, threads=1, slowdown=6.0, memory_bytes=1 << 30, decode_steps=4)
    n = tiny_manifest.config.num_blocks
    assert len(fast.prefill_s_per_token) == len(fast.decode_s_per_step) == n
    assert all(t > 0 for t in fast.prefill_s_per_token + fast.decode_s_per_step)
    assert [s[0] for s in seen] == list(range(n + 1)) and seen[-1][2] == "done"
    # The runner sleeps (F - 1) x its own compute time, so a 6x node measures about 6x slower;
    # 2x leaves room for a loaded machine (a co-tenant slowed the fast measurement enough to put a
    # 3x node under 2x once), and still fails if slowdown is ignored.
    assert slow.decode_s_per_token > 2.0 * fast.decode_s_per_token
    assert sum(slow.prefill_s_per_token) > 2.0 * sum(fast.prefill_s_per_token)
    assert slow.tflops < fast.tflops / 2 and slow.mem_bw_gbs < fast.mem_bw_gbs / 2
    assert NodeProfile.from_dict(slow.to_dict()) == slow
    # what a token of context adds, per block: measured on the stages, none on blocks without KV
    kv = [c.kv_bytes_per_token for c in tiny_manifest.costs]
    assert len(fast.decode_s_per_ctx_token) == n and all(x >= 0 for x in fast.decode_s_per_ctx_token)
    assert all(x == 0 for x, k in zip(fast.decode_s_per_ctx_token, kv, strict=True) if not k)
    assert fast.decode_ctx > 32
    # what each decode row beyond the first costs: measured per block, never negative, and the
    # whole model's rows cost something
    assert len(fast.decode_s_per_row) == n and all(x >= 0 for x in fast.decode_s_per_row)
    assert sum(fast.decode_s_per_row) > 0
    # what a step after a pause costs more: measured and finite, its fixed part never negative. The
    # line is fitted through two stages' steps (idle_fit, tested below on points); its fraction may
    # be negative, so at the whole model's longer step it can fall below 0, where the cost model
    # charges max(0, line) -- a slowed node's noisy line did (frac -1.55 at a 1.2 ms step) in CI
    for prof in (fast, slow):
        assert prof.idle_step_s >= 0 and math.isfinite(prof.idle_step_s)
        assert math.isfinite(prof.idle_step_frac)
        assert prof.idle_long_s >= 0 and math.isfinite(prof.idle_long_s) and math.isfinite(prof.idle_long_frac)


def test_the_steps_after_a_pause_fit_in_a_short_context(tiny_manifest: Manifest) -> None:
    """The idle timing runs 2 x 2 x decode_steps steps after its prompt: on a model of a short
    context it shortens the prompt (and the steps) rather than ask for more than the model holds."""
    import numpy as np

    from meshllm.runtime.profile import _time_idle

    ctx = tiny_manifest.config.max_position
    (fixed, frac), (fixed_long, frac_long) = _time_idle(
        tiny_manifest, (0, tiny_manifest.config.num_blocks), threads=1, slowdown=1.0, prompt_tokens=ctx,
        decode_steps=ctx, rng=np.random.default_rng(0))
    assert fixed >= 0 and np.isfinite(frac) and fixed_long >= 0 and np.isfinite(frac_long)


def test_a_step_after_idling_is_fitted_and_old_profiles_load_without_it() -> None:
    # two stages: a fixed part and a fraction of the step
    assert idle_fit([(0.5e-3, 1.5e-3), (18e-3, 6.5e-3)]) == pytest.approx((1.357e-3, 0.2857), rel=1e-3)
    # a slowed node: its long steps are cold already, its short ones pay: the fraction is negative
    fixed, frac = idle_fit([(2.3e-3, 3.2e-3), (78e-3, 0.0)])
    assert fixed == pytest.approx(3.297e-3, rel=1e-3) and frac < 0
    # a line that would start below 0 goes through 0 instead; one point: a fraction of its step
    assert idle_fit([(1e-3, 0.0), (10e-3, 5e-3)]) == pytest.approx((0.0, 0.5))
    assert idle_fit([(10e-3, 2e-3)]) == pytest.approx((0.0, 0.2))
    assert idle_fit([]) == (0.0, 0.0)
    prof = NodeProfile("m", 1, 1.0, 1 << 30, (1e-4,) * 3, (1e-3,) * 3, 1.0, 1.0, "x", 0.0, (0.0,) * 3, 40.0,
                       1.4e-3, -0.02, (2e-4,) * 3, 4.1e-3, 0.1)
    doc = prof.to_dict()
    assert doc["version"] == PROFILE_VERSION == 8
    assert NodeProfile.from_dict(doc) == prof and prof.with_memory(1 << 20).idle_long_s == 4.1e-3
    old = {k: v for k, v in doc.items()
           if k not in ("idle_step_s", "idle_step_frac", "decode_s_per_row", "idle_long_s", "idle_long_frac")}
    old = NodeProfile.from_dict(old | {"version": 4})
    assert (old.idle_step_s, old.idle_step_frac, old.decode_s_per_row) == (0.0, 0.0, ())
    assert (old.idle_long_s, old.idle_long_frac) == (0.0, 0.0)
    # the pauses the planner's cost model speaks of are the ones the profile times
    from meshllm.planner import cost
    from meshllm.runtime import profile

    assert (cost.IDLE_GAP_S, cost.LONG_IDLE_GAP_S) == (profile.IDLE_GAP_S, profile.LONG_IDLE_GAP_S)


def test_profile_cache_is_keyed_and_budget_applied_on_top(tiny_manifest: Manifest, tmp_path: Path) -> None:
    p1, cached1 = load_or_measure(tiny_manifest, tmp_path, threads=1, slowdown=1.0, memory_bytes=1 << 30,
                                  decode_steps=2, repeats=1)
    p2, cached2 = load_or_measure(tiny_manifest, tmp_path, threads=1, slowdown=1.0, memory_bytes=1 << 20,
                                  decode_steps=2, repeats=1)
    assert (cached1, cached2) == (False, True)
    assert p2.decode_s_per_step == p1.decode_s_per_step and p2.memory_bytes == 1 << 20
    assert cache_path(tmp_path, tiny_manifest.model_id, 1, 1.0) != cache_path(tmp_path, tiny_manifest.model_id, 1, 2.0)
    assert cache_path(tmp_path, tiny_manifest.model_id, 1, 1.0) != cache_path(tmp_path, tiny_manifest.model_id, 2, 1.0)
    # a profile of the other attention kind is another measurement (its runners run other graphs)
    assert cache_path(tmp_path, tiny_manifest.model_id, 1, 1.0) == cache_path(tmp_path, tiny_manifest.model_id, 1,
                                                                              1.0, "fused")
    assert cache_path(tmp_path, tiny_manifest.model_id, 1, 1.0, "plain") != cache_path(tmp_path,
                                                                                       tiny_manifest.model_id, 1, 1.0)
    _, cached_plain = load_or_measure(tiny_manifest, tmp_path, threads=1, slowdown=1.0, memory_bytes=1 << 30,
                                      decode_steps=2, repeats=1, attention="plain")
    assert cached_plain is False
    # A corrupt cache file is re-measured, not trusted.
    cache_path(tmp_path, tiny_manifest.model_id, 1, 1.0).write_text("{not json")
    _, cached3 = load_or_measure(tiny_manifest, tmp_path, threads=1, slowdown=1.0, memory_bytes=1 << 30,
                                 decode_steps=2, repeats=1)
    assert cached3 is False
    # A cache shared by a machine's nodes (profile_dir): another node's state directory finds it.
    shared = tmp_path / "shared"
    _, a = load_or_measure(tiny_manifest, tmp_path / "a", threads=1, slowdown=1.0, memory_bytes=1 << 30,
                           decode_steps=2, repeats=1, cache_dir=shared)
    _, b = load_or_measure(tiny_manifest, tmp_path / "b", threads=1, slowdown=1.0, memory_bytes=1 << 30,
                           decode_steps=2, repeats=1, cache_dir=shared)
    assert (a, b) == (False, True) and not (tmp_path / "a").exists() and len(list(shared.glob("*.json"))) == 1


def test_a_launcher_profiles_into_the_profile_dir_its_nodes_read(tiny_model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from meshllm.commands.up import premeasure_states
    from meshllm.settings import profile_dir_setting

    monkeypatch.setenv("MESHLLM_PROFILE_DIR", str(tmp_path / "shared"))
    assert profile_dir_setting(os.environ) == tmp_path / "shared"
    premeasure_states(str(tiny_model_dir), [tmp_path / "n0", tmp_path / "n1"], [1.0, 1.0], 1)
    assert len(list((tmp_path / "shared").glob("*.json"))) == 1  # one measurement for both nodes
    monkeypatch.delenv("MESHLLM_PROFILE_DIR")
    assert profile_dir_setting(os.environ) is None
