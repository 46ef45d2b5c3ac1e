"""A measured device's prefill (``cost.prefill_block_times``, which the planner's tables and the
simulator both read): affine in the prompt's length (a decode step for one token, the measured
figure at the profile's prompt length), never below the proportional one."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.planner import cost
from meshllm.planner.cost import PROFILE_PROMPT_TOKENS, ModelProfile, prefill_block_times
from meshllm.planner.problem import Problem
from meshllm.planner.types import Device, LengthDist, Network, Role, Workload


def _measured(per_tok: float, step: float) -> tuple[ModelProfile, Device]:
    p = ModelProfile.from_preset("llama2-7b")
    d = Device("a", 1 << 40, 1.0, 10.0, prefill_s_per_token=(per_tok,) * p.n_blocks,
               decode_s_per_step=(step,) * p.n_blocks, measured=True)
    return p, d


def test_affine_between_one_decode_step_and_the_measured_prompt() -> None:
    p, d = _measured(0.1e-3, 0.7e-3)
    k = PROFILE_PROMPT_TOKENS
    one = prefill_block_times(p, d, 1)
    assert one == pytest.approx(np.full(p.n_blocks, 0.7e-3))  # one token: one decode step
    assert prefill_block_times(p, d, k) == pytest.approx(np.full(p.n_blocks, k * 0.1e-3))  # exact where measured
    ts = [float(prefill_block_times(p, d, t).sum()) for t in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert ts == sorted(ts)  # longer prompts never cost less
    for t in (1, 4, 64, 500):
        assert np.all(prefill_block_times(p, d, t) >= t * 0.1e-3 - 1e-15)  # never below proportional
    # a step dearer than the whole measured prompt: no negative marginal, the step is the floor
    p2, d2 = _measured(0.01e-3, 1e-3)
    assert prefill_block_times(p2, d2, 8) == pytest.approx(np.full(p2.n_blocks, 1e-3))
    assert prefill_block_times(p2, d2, 1000) == pytest.approx(np.full(p2.n_blocks, 1000 * 0.01e-3))


def test_the_planner_charges_a_short_prompt_the_same() -> None:
    """The planner's PREFILL replica is busy for a 4-token prompt what the simulator charges (it
    once charged 4 x the per-token time: on a slow device, half what the mesh took)."""
    p, d = _measured(0.1e-3, 0.7e-3)
    wl = Workload(arrival_rate=1.0, input_len=LengthDist.fixed(4), output_len=LengthDist.fixed(8), max_batch=1)
    pb = Problem(p, (d,), Network(), wl)
    busy = pb.perf([(0, 0, p.n_blocks)], Role.PREFILL).busy
    assert busy == pytest.approx(float(prefill_block_times(p, d, 4).sum()))
    assert np.all(busy > 4 * 0.1e-3 * p.n_blocks * 1.5)


def test_roofline_devices_keep_the_cost_model() -> None:
    p = ModelProfile.from_preset("llama2-7b")
    d = Device("a", 1 << 40, 10.0, 100.0)
    for t in (1, 7, 300):
        assert prefill_block_times(p, d, t) == pytest.approx(cost._roofline(p, d, t, t * (t + 1) / 2, t, cost.EFFICIENCY))
