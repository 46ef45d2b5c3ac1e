"""``SimConfig.step_token_budget``: a BOTH replica's stage 0 as the serving core schedules it — a
decode step that is back waits for at most a budget of prompt tokens, not for every prompt that
arrived before it."""

from __future__ import annotations

import itertools

import pytest
from test_sim import ConstTiming

from meshllm.sim.engine import SimError
from meshllm.sim.model import SimConfig, SimModel, SimReplica, SimStage
from meshllm.sim.serving import simulate
from meshllm.sim.workload import Request


def _one_both() -> SimModel:
    return SimModel((SimReplica(0, "both", (SimStage("n", 0, 2),), 10**9, 16),), ConstTiming(p=0.1 / 512, d=0.01))


def test_a_stream_is_not_held_back_by_a_burst_of_prompts() -> None:
    # a 100-token answer decoding, then 6 prompts of 512 tokens (0.1 s each) at once
    reqs = [Request(0, 0.0, 8, 100)] + [Request(i, 0.2 + 1e-3 * i, 512, 2) for i in range(1, 7)]
    fifo = simulate(_one_both(), reqs).records
    budget = simulate(_one_both(), reqs, SimConfig(step_token_budget=512)).records

    def gaps(recs: tuple) -> list[float]:
        starts = [r.prefill_start for r in recs[1:]]
        return [b - a for a, b in itertools.pairwise(starts)]

    # first come, first served: once the burst is queued, the prompts run back to back (0.1 s
    # each) and the stream's next step waits for all of them
    assert gaps(fifo)[1:] == pytest.approx([0.1] * 4)
    # under the budget a prompt of 512 tokens uses it up: the stream's step (0.01 s) runs
    # between every two prompts, which wait that much longer each
    assert gaps(budget) == pytest.approx([0.11] * 5)
    assert [r.ttft_s for r in budget[1:]] > [r.ttft_s for r in fifo[1:]]
    assert budget[0].e2e_s == pytest.approx(fifo[0].e2e_s)  # the same work in all


def test_budget_zero_is_first_come_first_served_and_negative_is_refused() -> None:
    reqs = [Request(0, 0.0, 8, 50), Request(1, 0.1, 512, 3), Request(2, 0.1001, 512, 3)]
    a = simulate(_one_both(), reqs).records
    b = simulate(_one_both(), reqs, SimConfig(step_token_budget=0)).records
    assert a == b
    with pytest.raises(SimError):
        SimConfig(step_token_budget=-1)
