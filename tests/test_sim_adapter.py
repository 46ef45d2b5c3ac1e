"""The simulator on the planner's cost model: zero load equals the cost model's own sums."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.planner import cost
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device, Link, Network, Plan, Replica, Role, Stage, Workload
from meshllm.sim.adapter import kv_capacity_tokens, to_sim_model
from meshllm.sim.model import SimStage
from meshllm.sim.serving import simulate
from meshllm.sim.workload import closed_batch, poisson

P7 = ModelProfile.from_preset("llama2-7b")
DEVS = {
    "agx-1": Device.from_spec("agx-1", 32, 3.33, 204.8, source=True),
    "agx-2": Device.from_spec("agx-2", 32, 3.33, 204.8),
    "nx-1": Device.from_spec("nx-1", 16, 1.88, 102.4),
    "rtx3090": Device.from_spec("rtx3090", 24, 36, 936),
}
NET = Network(50, 2.0, (Link("agx-1", "rtx3090", 1.0),))
WL = Workload(1.0, max_batch=8)


def _both(stages) -> Plan:
    return Plan(0, (Replica(0, Role.BOTH, tuple(Stage(n, r) for n, r in stages)),))


def test_edge_solo_llama2_7b_is_memory_bound_near_the_paper() -> None:
    plan = _both([("agx-1", (0, 34))])
    model = to_sim_model(plan, P7, DEVS, NET, WL)
    rec = simulate(model, closed_batch(1, 32, 96)).records[0]
    ms_per_token = 1000 * rec.e2e_s / 96
    # 26.4 GB of fp32 weights read per token at 204.8 GB/s is 129 ms at full bandwidth; the paper
    # measured 140.34 ms/token (prefill included)
    assert 129 < ms_per_token < 150
    assert rec.waiting_s == 0.0


@pytest.mark.parametrize("entry", [None, "agx-1"])
def test_zero_load_latency_equals_the_cost_model(entry) -> None:
    stages = [("agx-1", (0, 10)), ("agx-2", (10, 20)), ("rtx3090", (20, 34))]
    plan = _both(stages)
    model = to_sim_model(plan, P7, DEVS, NET, WL, entry=entry)
    n_in, n_out = 40, 12
    rec = simulate(model, closed_batch(1, n_in, n_out)).records[0]
    rep = plan.replicas[0]
    pre = cost.prefill_stage_times(P7, DEVS, rep, NET, n_in)
    want = pre.latency
    assert rec.ttft_s == pytest.approx(want, rel=1e-12)
    for k in range(1, n_out):
        want += cost.decode_stage_times(P7, DEVS, rep, NET, 1, n_in + k).latency
    assert rec.e2e_s == pytest.approx(want, rel=1e-12)
    assert rec.waiting_s == 0.0


def test_zero_load_split_replicas_wait_for_the_kv_hand_off() -> None:
    p = Replica(0, Role.PREFILL, (Stage("agx-2", (0, 34)),))
    d = Replica(1, Role.DECODER, (Stage("agx-1", (0, 20)), Stage("rtx3090", (20, 34))))
    model = to_sim_model(Plan(0, (p, d)), P7, DEVS, NET, WL)
    rec = simulate(model, closed_batch(1, 64, 2)).records[0]
    pre = cost.prefill_stage_times(P7, DEVS, p, NET, 64)
    kv = cost.kv_transfer_time(P7, p, d, 64, NET)
    step = cost.decode_stage_times(P7, DEVS, d, NET, 1, 65)
    # one decode step after the whole KV has arrived; the entry is the prefill node, so the
    # token travels the decoder ring and then back to the entry
    hop_back = cost.transfer_time(8, NET.bandwidth("rtx3090", "agx-2"), NET.rtt("rtx3090", "agx-2"))
    want = pre.latency - pre.ret + max(kv, pre.ret) + sum(step.compute) + sum(step.comm) + hop_back
    # the two KV pieces share no link, so the slower one sets the start of decoding
    assert rec.e2e_s == pytest.approx(want, rel=1e-9)


def test_kv_capacity_agrees_with_max_batch_that_fits() -> None:
    rep = Replica(0, Role.BOTH, (Stage("agx-1", (0, 17)), Stage("nx-1", (17, 34))))
    stages = tuple(SimStage(s.node, s.first, s.end) for s in rep.stages)
    cap = kv_capacity_tokens(P7, DEVS, stages)
    for seq_len in (128, 1000, 3000):
        assert cap // seq_len == cost.max_batch_that_fits(P7, DEVS, rep, seq_len, 10**6)


def test_loaded_plan_is_deterministic_and_conserves_requests() -> None:
    p = Replica(0, Role.PREFILL, (Stage("agx-2", (0, 34)),))
    d = Replica(1, Role.DECODER, (Stage("agx-1", (0, 34)),))
    d2 = Replica(2, Role.DECODER, (Stage("nx-1", (0, 12)), Stage("rtx3090", (12, 34))))
    model = to_sim_model(Plan(0, (p, d, d2)), P7, DEVS, NET, WL)
    reqs = poisson(0.5, 60, WL.input_len, WL.output_len, np.random.default_rng(1))
    a = simulate(model, reqs)
    b = simulate(model, reqs)
    assert a.records == b.records
    assert len(a.records) == 60
    assert {r.decode_replica for r in a.records} == {1, 2}
