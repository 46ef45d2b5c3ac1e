"""The simulator's prefill on a measured device: affine in the prompt's length (a decode step for
one token, the measured figure at the profile's prompt length), never below the proportional one."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.planner import cost
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device
from meshllm.sim.adapter import PROFILE_PROMPT_TOKENS, prefill_block_times


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
    assert prefill_block_times(p, d, k) == pytest.approx(cost.prefill_block_times(p, d, k))  # exact where measured
    ts = [float(prefill_block_times(p, d, t).sum()) for t in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert ts == sorted(ts)  # longer prompts never cost less
    for t in (1, 4, 64, 500):
        assert np.all(prefill_block_times(p, d, t) >= cost.prefill_block_times(p, d, t) - 1e-15)
    # a step dearer than the whole measured prompt: no negative marginal, the step is the floor
    p2, d2 = _measured(0.01e-3, 1e-3)
    assert prefill_block_times(p2, d2, 8) == pytest.approx(np.full(p2.n_blocks, 1e-3))
    assert prefill_block_times(p2, d2, 1000) == pytest.approx(cost.prefill_block_times(p2, d2, 1000))


def test_roofline_devices_keep_the_cost_model() -> None:
    p = ModelProfile.from_preset("llama2-7b")
    d = Device("a", 1 << 40, 10.0, 100.0)
    for t in (1, 7, 300):
        assert prefill_block_times(p, d, t) == pytest.approx(cost.prefill_block_times(p, d, t))
