"""``SimConfig.iterations``: stage work in the serving core's iterations — an iteration's outputs
leave together when its last op ends, a prompt is admitted one iteration before it is computed,
and at later stages an iteration's work is computed together. ``core_share``: a slowed node asks
for only part of a core."""

from __future__ import annotations

import pytest
from test_sim import ConstTiming, _both

from meshllm.sim.engine import SimError
from meshllm.sim.model import SimConfig, SimModel, SimReplica, SimStage
from meshllm.sim.serving import simulate
from meshllm.sim.workload import Request

ITER = SimConfig(step_token_budget=512, iterations=True)


def test_prompts_in_one_iteration_come_out_together() -> None:
    # a 32-token prompt (0.1 s) running; two more arrive meanwhile
    model = SimModel((_both(),), ConstTiming(p=0.1 / 32, d=0.01))
    reqs = [Request(0, 0.0, 32, 1), Request(1, 0.05, 32, 1), Request(2, 0.06, 32, 1)]
    fifo = simulate(model, reqs, SimConfig(step_token_budget=512)).records
    it = simulate(model, reqs, ITER).records
    assert [r.first_token for r in fifo] == pytest.approx([0.1, 0.2, 0.3])
    # admitted together when the first ends (an iteration of allocations takes no compute),
    # computed in one iteration: both first tokens when it ends
    assert [r.first_token for r in it] == pytest.approx([0.1, 0.3, 0.3])
    assert [r.prefill_start for r in it] == pytest.approx([0.0, 0.1, 0.1])


def test_a_prompt_during_a_stream_waits_an_iteration_to_be_admitted() -> None:
    # a stream decoding (0.1 s per step); a 32-token prompt (0.1 s) arrives mid-step
    model = SimModel((_both(),), ConstTiming(p=0.1 / 32, d=0.1))
    reqs = [Request(0, 0.0, 1, 40), Request(1, 0.35, 32, 2)]
    rec = simulate(model, reqs, ITER).records
    # steps run [0.03, 0.13), [0.13, 0.23), ...: request 0's prompt (1 token) is 0.003125 s
    first = 1 * 0.1 / 32
    ends = [first + 0.1 * k for k in range(1, 10)]
    cur = next(e for e in ends if e > 0.35)
    # admitted in the iteration after the current step (a step), computed in the next with a step
    assert rec[1].prefill_start == pytest.approx(cur + 0.1)
    assert rec[1].ttft_s == pytest.approx(cur + 0.1 + 0.1 + 0.1 - 0.35)
    # the stream's step that shares the iteration with the prompt waits for it
    assert rec[0].e2e_s > simulate(model, reqs[:1], ITER).records[0].e2e_s + 0.09


def test_iterations_cross_a_pipeline_together() -> None:
    model = SimModel((_both(nstages=2),), ConstTiming(p=0.2 / 32, d=0.01))
    reqs = [Request(0, 0.0, 32, 1), Request(1, 0.05, 32, 1), Request(2, 0.06, 32, 1)]
    one_by_one = simulate(model, reqs, SimConfig(step_token_budget=512)).records
    # (the activations cross the link in 3.2 µs)
    assert [r.first_token for r in one_by_one] == pytest.approx([0.2, 0.3, 0.4], abs=1e-5)
    # prompts 1 and 2 share an iteration: each stage computes both (0.1 s each per stage)
    # before sending either on
    rec = simulate(model, reqs, ITER).records
    assert [r.first_token for r in rec] == pytest.approx([0.2, 0.5, 0.5], abs=1e-5)


def test_a_slowed_node_asks_for_part_of_a_core() -> None:
    reps = tuple(SimReplica(i, "both", (SimStage(f"n{i}", 0, 2),), 10**9, 8) for i in range(2))
    model = SimModel(reps, ConstTiming(p=0.1 / 32, d=0.05))
    both = [Request(0, 0.0, 32, 1), Request(1, 0.001, 32, 1)]
    whole = simulate(model, both, SimConfig(routing="start", shared_cores=1)).records
    assert [r.ttft_s for r in whole] == pytest.approx([0.1, 0.2])
    # n0 computes a third of its time (slowed 3x): n1 asks for 1 + 1/3 cores of 1
    third = simulate(model, both, SimConfig(routing="start", shared_cores=1,
                                            core_share=(("n0", 1 / 3),))).records
    assert [r.ttft_s for r in third] == pytest.approx([0.1, 0.1 * 4 / 3])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(SimError):
        SimConfig(iterations=True)  # no budget
    with pytest.raises(SimError):
        SimConfig(core_share=(("n", 0.0),))


@pytest.mark.parametrize("seed", range(5))
def test_every_request_finishes_with_iterations(seed: int) -> None:
    import numpy as np

    from meshllm.planner.types import LengthDist
    from meshllm.sim.workload import poisson

    rng = np.random.default_rng(seed)
    reqs = poisson(20.0, 60, LengthDist.uniform(1, 700), LengthDist.uniform(1, 30), rng)
    pre = SimReplica(0, "prefill", (SimStage("a", 0, 2), SimStage("b", 2, 4)), 10**6, 4)
    dec = SimReplica(1, "decoder", (SimStage("c", 0, 4),), 5000, 4)
    both = SimReplica(2, "both", (SimStage("d", 0, 1), SimStage("e", 1, 4)), 3000, 3)
    model = SimModel((pre, dec, both), ConstTiming(p=1e-4, d=0.01, lat=1e-3))
    res = simulate(model, reqs, SimConfig(step_token_budget=64, prefill_chunk_tokens=128, iterations=True))
    assert len(res.records) == len(reqs)
    for r in res.records:
        assert r.arrival <= r.prefill_start <= r.first_token <= r.finish


def test_a_prompt_for_a_busy_decoder_waits_for_its_reservation() -> None:
    # a prefill replica and a decoder stepping a stream (0.1 s per step); a prompt arrives mid-step
    pre = SimReplica(0, "prefill", (SimStage("p", 0, 2),), 10**9, 8)
    dec = SimReplica(1, "decoder", (SimStage("d", 0, 2),), 10**9, 8)
    model = SimModel((pre, dec), ConstTiming(p=0.1 / 32, d=0.1))
    reqs = [Request(0, 0.0, 1, 40), Request(1, 0.35, 32, 2)]
    lazy = SimConfig(step_token_budget=512, iterations=True, eager_handoff=False)
    rec = simulate(model, reqs, lazy).records
    # the stream's steps end at 0.003125 + 0.1 k: the decoder allocates the prompt's room in the
    # iteration after the one running at 0.35, which ends at 0.503125; only then is it prefilled
    assert rec[1].prefill_start == pytest.approx(0.503125, abs=1e-6)
    # with nothing decoding, the room is there at once
    alone = simulate(model, [Request(1, 0.35, 32, 2)], lazy).records
    assert alone[0].prefill_start == pytest.approx(0.35)
    # serve.eager_handoff (the default): the prompt goes beside the reservation and is prefilled
    # at once; its first token comes at 0.45, but the decoder takes it only after allocating
    eager = simulate(model, reqs, ITER).records
    assert eager[1].prefill_start == pytest.approx(0.35) and eager[1].first_token == pytest.approx(0.45)
    assert eager[1].finish > 0.503125 + 0.1 - 1e-9  # its one decode step runs after the reservation
    assert eager[1].finish < rec[1].finish
