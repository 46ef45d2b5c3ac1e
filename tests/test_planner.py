"""Planner types, cost model, testbed files, validate_plan, and every strategy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from meshllm.errors import ConfigError, DoesNotFit, PlanError
from meshllm.planner import cost, ga, strategies
from meshllm.planner.cost import ModelProfile
from meshllm.planner.dp import edgeshard_latency
from meshllm.planner.problem import Problem
from meshllm.planner.queueing import estimate
from meshllm.planner.strategies import STRATEGIES, cost_inputs, make_plan, parse_strategy, plan_problem
from meshllm.planner.testbed import load_testbed, parse_testbed
from meshllm.planner.types import (
    Device,
    LengthDist,
    Link,
    Network,
    Plan,
    Predicted,
    Replica,
    Role,
    Stage,
    Workload,
)
from meshllm.planner.validate import validate_plan

ROOT = Path(__file__).resolve().parents[1]
EDGESHARD = load_testbed(ROOT / "tools/testbeds/edgeshard.toml")
HOME = load_testbed(ROOT / "tools/testbeds/home.toml")
P7, P13, P70 = (ModelProfile.from_preset(n) for n in ("llama2-7b", "llama2-13b", "llama2-70b"))


# --- types ----------------------------------------------------------------------------------

def test_plan_round_trips_through_dict():
    plan = Plan(3, (Replica(0, Role.PREFILL, (Stage("a", (0, 5)), Stage("b", (5, 10)))),
                    Replica(1, Role.DECODER, (Stage("c", (0, 10)),))),
                Predicted(latency_ms_per_token=12.5, mean_wait_s=math.inf), "e2llm")
    d = plan.to_dict()
    assert d["replicas"][0] == {"id": 0, "role": "prefill",
                                "stages": [{"node": "a", "layers": [0, 5]}, {"node": "b", "layers": [5, 10]}]}
    assert d["predicted"]["mean_wait_s"] is None and d["predicted"]["overloaded"] is True
    back = Plan.from_dict(d)
    assert back.replicas == plan.replicas and back.epoch == 3 and back.strategy == "e2llm"
    assert back.predicted.mean_wait_s == math.inf and back.predicted.latency_ms_per_token == 12.5
    with pytest.raises(PlanError):
        Plan.from_dict({"epoch": 1, "replicas": [{"id": 0, "role": "sideways", "stages": []}]})


@pytest.mark.parametrize("dist,mean", [
    (LengthDist.fixed(32), 32.0),
    (LengthDist.uniform(10, 20), 15.0),
    (LengthDist.empirical([1, 2, 3, 10]), 4.0),
    (LengthDist.lognormal(200, 0.8, 0), 200.0),
])
def test_length_distributions_sample_around_their_mean(dist, mean):
    assert dist.mean == pytest.approx(mean, rel=0.02)
    x = dist.sample(np.random.default_rng(0), 40000)
    assert x.dtype == np.int64 and x.min() >= 1
    assert x.mean() == pytest.approx(dist.mean, rel=0.03)
    assert (x.astype(float) ** 2).mean() == pytest.approx(dist.second_moment, rel=0.08)
    again = dist.sample(np.random.default_rng(0), 40000)
    assert np.array_equal(x, again)


def test_length_distribution_rejects_nonsense():
    with pytest.raises(ConfigError):
        LengthDist.uniform(5, 2)
    with pytest.raises(ConfigError):
        LengthDist.from_dict({"kind": "gamma"})
    assert LengthDist.from_dict(LengthDist.lognormal(100, 1, 500).to_dict()) == LengthDist.lognormal(100, 1, 500)


def test_network_defaults_and_symmetric_overrides():
    net = Network(50, 1, (Link("a", "b", 1, 10),))
    assert net.bandwidth("a", "b") == net.bandwidth("b", "a") == 1e6 / 8
    assert net.bandwidth("a", "c") == 50e6 / 8 and net.rtt("b", "a") == 0.010
    assert net.bandwidth("a", "a") == math.inf and net.rtt("a", "a") == 0
    assert Network.from_dict(net.to_dict()) == net


# --- cost model -----------------------------------------------------------------------------

def test_decode_is_memory_bound_and_calibrated_on_edge_solo():
    agx = EDGESHARD.devices[0]
    # EdgeShard Table IV: Llama2-7B fp32 alone on an AGX Orin, 140.34 ms/token
    step = cost.decode_block_times(P7, agx, 1, 64).sum()
    weights_read = P7.total_weight_bytes - P7.param_bytes[0] + P7.act[0] + 64 * P7.kv.sum()
    assert step == pytest.approx(weights_read / (cost.EFFICIENCY.memory * agx.mem_bw), rel=1e-3)
    assert step * 1e3 == pytest.approx(140.34, rel=0.02)


def test_prefill_is_compute_bound_for_long_prompts():
    gpu = EDGESHARD.devices[-1]
    t = cost.prefill_block_times(P7, gpu, 512)
    layer = 5
    flops = 512 * P7.flops[layer] + P7.attn[layer] * 512 * 513 / 2
    assert t[layer] == pytest.approx(flops / (cost.EFFICIENCY.compute * gpu.flops), rel=1e-9)


def test_measured_times_override_the_spec():
    n = P7.n_blocks
    d = Device("m", 40 * 2**30, 1.0, 1.0, prefill_s_per_token=tuple([1e-4] * n),
               decode_s_per_step=tuple([2e-3] * n), measured=True)
    # affine: the step, then the marginal per-token time that gives 32 x 1e-4 at 32 tokens
    assert cost.prefill_block_times(P7, d, 10).sum() == pytest.approx(n * (2e-3 + 9 * (32e-4 - 2e-3) / 31))
    assert cost.prefill_block_times(P7, d, 32).sum() == pytest.approx(32 * 1e-4 * n)
    assert cost.decode_block_times(P7, d, 3, 100).sum() == pytest.approx(n * (2e-3 + 2 * 1e-4))
    bad = Device("m", 1, 1.0, 1.0, decode_s_per_step=(1.0,))
    with pytest.raises(PlanError):
        cost.decode_block_times(P7, bad, 1, 1)


def test_a_decode_row_costs_what_the_profile_measured_for_it():
    """Each sequence beyond the first adds the profile's measured decode row to a step (a row runs
    the head, where a prompt runs it for its last position only); a profile from before it was
    measured falls back to a prompt token's time. The figures travel in the profile document and
    the plan's device documents."""
    from meshllm.control.planning import device_from_profile

    n = P7.n_blocks
    rows = tuple(5e-4 if b == n - 1 else 1e-4 for b in range(n))  # the head's row costs 5x a token
    base = dict(prefill_s_per_token=tuple([1e-4] * n), decode_s_per_step=tuple([2e-3] * n), measured=True)
    d = Device("m", 40 * 2**30, 1.0, 1.0, decode_s_per_row=rows, **base)  # type: ignore[arg-type]
    old = Device("m", 40 * 2**30, 1.0, 1.0, **base)  # type: ignore[arg-type]
    assert cost.decode_block_times(P7, d, 8, 100).sum() == pytest.approx(n * 2e-3 + 7 * sum(rows))
    assert cost.decode_block_times(P7, old, 8, 100).sum() == pytest.approx(n * (2e-3 + 7 * 1e-4))
    assert cost.decode_block_times(P7, d, 1, 100).sum() == pytest.approx(n * 2e-3)  # one row: the step
    assert Device.from_dict(d.to_dict()) == d and Device.from_dict(old.to_dict()) == old
    prof = {"model_id": "x", "threads": 1, "slowdown": 1.0, "memory_bytes": 1 << 30, "tflops": 1.0,
            "mem_bw_gbs": 1.0, "prefill_s_per_token": [1e-4] * n, "decode_s_per_step": [2e-3] * n}
    assert device_from_profile("m", prof).decode_s_per_row is None  # a profile from before version 7
    assert device_from_profile("m", {**prof, "decode_s_per_row": list(rows)}).decode_s_per_row == rows


def test_a_measured_context_slope_grows_the_decode_step_past_the_measured_context():
    """A device whose profile measured what a token of context adds (attention reads and copies
    more of the cache) pays it per sequence beyond the context its step was measured at; the
    slope travels in the profile document and the plan's device documents."""
    from meshllm.control.planning import device_from_profile

    n = P7.n_blocks
    slope = tuple(1e-6 if P7.kv[b] else 0.0 for b in range(n))
    d = Device("m", 40 * 2**30, 1.0, 1.0, prefill_s_per_token=tuple([1e-4] * n),
               decode_s_per_step=tuple([2e-3] * n), measured=True, decode_s_per_ctx_token=slope, decode_ctx=40)
    flat = cost.decode_block_times(P7, d, 3, 40).sum()
    assert flat == pytest.approx(n * (2e-3 + 2 * 1e-4))
    assert cost.decode_block_times(P7, d, 3, 10).sum() == pytest.approx(flat)  # not below what was measured
    assert cost.decode_block_times(P7, d, 3, 1040).sum() == pytest.approx(flat + 3 * 1000 * sum(slope))
    assert Device.from_dict(d.to_dict()) == d
    prof = {"model_id": "x", "threads": 1, "slowdown": 1.0, "memory_bytes": 1 << 30, "tflops": 1.0,
            "mem_bw_gbs": 1.0, "prefill_s_per_token": [1e-4] * n, "decode_s_per_step": [2e-3] * n}
    assert device_from_profile("m", prof).decode_s_per_ctx_token is None  # a profile from before the slope
    got = device_from_profile("m", {**prof, "decode_s_per_ctx_token": list(slope), "decode_ctx": 40})
    assert got.decode_s_per_ctx_token == slope and got.decode_ctx == 40


def test_a_stage_after_idling_costs_what_the_profile_measured():
    """A stage's work on a device that idled just before it takes idle_step_s + idle_step_frac x
    the stage's step more (never less): every stage of a prompt alone, and every stage of a decode
    ring with fewer micro-batches than stages; a one-stage ring steps back to back. The figures
    travel in the profile document (version 5; older profiles add nothing) and in the plan's
    device documents."""
    from meshllm.control.planning import device_from_profile
    from meshllm.planner.problem import Problem

    n = P7.n_blocks
    base = dict(prefill_s_per_token=tuple([1e-4] * n), decode_s_per_step=tuple([2e-3] * n), measured=True)
    cold = Device("m", 40 * 2**30, 1.0, 1.0, idle_step_s=1e-3, idle_step_frac=0.25, **base)  # type: ignore[arg-type]
    warm = Device("m", 40 * 2**30, 1.0, 1.0, **base)  # type: ignore[arg-type]
    assert cost.idle_time(cold, 0.004) == pytest.approx(1e-3 + 0.25 * 0.004)
    assert cost.idle_time(warm, 0.004) == 0 and cost.idle_time(cold, 0.0) == 0
    assert cost.stage_idle_time(P7, cold, 0, 10) == pytest.approx(1e-3 + 0.25 * 10 * 2e-3)
    slowed = Device("s", 1 << 30, 1.0, 1.0, idle_step_s=3e-3, idle_step_frac=-0.05)
    assert cost.idle_time(slowed, 0.02) == pytest.approx(2e-3) and cost.idle_time(slowed, 0.08) == 0
    assert Device.from_dict(cold.to_dict()) == cold and Device.from_dict(warm.to_dict()) == warm
    prof = {"model_id": "x", "threads": 1, "slowdown": 1.0, "memory_bytes": 1 << 30, "tflops": 1.0,
            "mem_bw_gbs": 1.0, "prefill_s_per_token": [1e-4] * n, "decode_s_per_step": [2e-3] * n}
    old = device_from_profile("m", prof)  # a profile from before version 5
    assert (old.idle_step_s, old.idle_step_frac) == (0.0, 0.0)
    got = device_from_profile("m", {**prof, "idle_step_s": 1e-3, "idle_step_frac": -0.1})
    assert (got.idle_step_s, got.idle_step_frac) == (1e-3, -0.1)
    assert device_from_profile("m", {**prof, "idle_step_s": float("nan")}).idle_step_s == 0.0
    # after a long pause (version 8): the long line from LONG_IDLE_GAP_S on, the short one up to
    # IDLE_GAP_S, linear in the pause's logarithm between, never below the short line
    assert (old.idle_long_s, old.idle_long_frac) == (0.0, 0.0)
    got = device_from_profile("m", {**prof, "idle_step_s": 1e-3, "idle_long_s": 2e-3, "idle_long_frac": 0.5})
    assert (got.idle_long_s, got.idle_long_frac) == (2e-3, 0.5) and Device.from_dict(got.to_dict()) == got
    short, long = cost.idle_time(got, 0.01), 2e-3 + 0.5 * 0.01
    assert short == pytest.approx(1e-3) and cost.idle_time(got, 0.01, 1e-3) == pytest.approx(short)
    assert cost.idle_time(got, 0.01, cost.LONG_IDLE_GAP_S) == pytest.approx(long)
    assert cost.idle_time(got, 0.01, 5.0) == pytest.approx(long)
    mid = (cost.IDLE_GAP_S * cost.LONG_IDLE_GAP_S) ** 0.5  # halfway in the logarithm
    assert cost.idle_time(got, 0.01, mid) == pytest.approx((short + long) / 2)
    assert cost.idle_time(cold, 0.004, 5.0) == cost.idle_time(cold, 0.004)  # no long figure measured
    below = Device("b", 1 << 30, 1.0, 1.0, idle_step_s=3e-3, idle_long_s=1e-3)
    assert cost.idle_time(below, 0.01, 5.0) == pytest.approx(3e-3)
    with pytest.raises(ConfigError, match="idle_long_s"):
        Device("x", 1 << 30, 1.0, 1.0, idle_long_s=-1.0)

    wl = Workload(arrival_rate=1.0, input_len=LengthDist.fixed(32), output_len=LengthDist.fixed(16), max_batch=4)
    def perf(dev: Device, stages: list[tuple[int, int, int]]):
        devs = tuple(Device(f"d{i}", dev.memory_bytes, 1.0, 1.0, idle_step_s=dev.idle_step_s,
                            idle_step_frac=dev.idle_step_frac, **base) for i in range(2))  # type: ignore[arg-type]
        return Problem(P7, devs, Network(1000, 1.0), wl).perf(stages, Role.BOTH)
    two = [(0, 0, 20), (1, 20, n)]
    extra = cost.stage_idle_time(P7, cold, 0, 20) + cost.stage_idle_time(P7, cold, 20, n)
    c2, w2 = perf(cold, two), perf(warm, two)
    assert c2.tau[1] == pytest.approx(w2.tau[1] + extra)  # one sequence: each stage waits for the other
    assert c2.tau[2:] == pytest.approx(w2.tau[2:])  # two micro-batches keep both stages busy
    assert c2.lat == pytest.approx(w2.lat + extra)  # a prompt alone wakes both stages
    c1, w1 = perf(cold, [(0, 0, n)]), perf(warm, [(0, 0, n)])
    assert c1.tau[1:] == pytest.approx(w1.tau[1:])  # one stage steps back to back
    assert c1.lat == pytest.approx(w1.lat + cost.stage_idle_time(P7, cold, 0, n))


def test_transfers_and_memory():
    net = Network(80, 2)
    # 4096 floats per token, 10 tokens, 80 Mb/s, 1 ms one way
    assert cost.activation_transfer_time(P7, 5, 10, "a", "b", net) == pytest.approx(
        0.001 + 4096 * 4 * 10 / 10e6)
    assert cost.activation_transfer_time(P7, 5, 10, "a", "a", net) == 0
    src = Replica(0, Role.PREFILL, (Stage("a", (0, 20)), Stage("b", (20, 34))))
    dst = Replica(1, Role.DECODER, (Stage("c", (0, 34)),))
    # two device pairs in parallel: a->c carries blocks [0, 20), b->c blocks [20, 34)
    kv_b = max(P7.kv_bytes_per_token(0, 20), P7.kv_bytes_per_token(20, 34)) * 100
    assert cost.kv_transfer_time(P7, src, dst, 100, net) == pytest.approx(0.001 + kv_b / 10e6)
    devs = {"c": Device("c", 30 * 2**30, 1, 1)}
    fit = cost.max_batch_that_fits(P7, devs, dst, 1000, 64)
    need = lambda b: P7.total_weight_bytes + P7.kv_bytes_per_token(0, 34) * b * 1000  # noqa: E731
    assert need(fit) <= 30 * 2**30 < need(fit + 1)
    assert cost.replica_fits(P7, devs, dst, fit, 1000) and not cost.replica_fits(P7, devs, dst, fit + 1, 1000)


# --- testbeds -------------------------------------------------------------------------------

def test_edgeshard_testbed_is_the_papers():
    names = [d.name for d in EDGESHARD.devices]
    assert len(names) == 15 and names.count("rtx3090") == 1
    assert sum(n.startswith("agx-") for n in names) == 12 and sum(n.startswith("orin-nx") for n in names) == 2
    assert [d.name for d in EDGESHARD.devices if d.source] == ["agx-1"]
    net = EDGESHARD.network
    assert net.bandwidth("agx-1", "rtx3090") == 1e6 / 8
    others = [net.bandwidth(a, b) * 8 / 1e6 for a in names for b in names if a < b
              and {a, b} != {"agx-1", "rtx3090"}]
    assert min(others) >= 40 and max(others) <= 60
    assert EDGESHARD.workload.input_len.mean == 32 and EDGESHARD.workload.output_len.mean == 96


def test_testbed_errors_are_one_line_config_errors():
    good = '[[device]]\nname = "x"\nmemory_gb = 1\ntflops = 1\nmem_bw_gbs = 1\n'
    tb = parse_testbed(good.replace('name = "x"', 'name = "x"\ncount = 3\nsource = true'))
    assert [d.name for d in tb.devices] == ["x-1", "x-2", "x-3"] and tb.devices[0].source
    assert not tb.devices[1].source
    for bad, msg in [
        ("[[device]]\nname = 1 2", "not valid TOML"),
        ('[[device]]\nname = "x"\n', "missing key"),
        (good + '[[network.link]]\na = "x"\nb = "y"\nmbps = 1\n', "unknown device 'y'"),
        (good + good, "duplicate device names"),
        (good.replace("tflops = 1", "tflops = 0"), "must be positive"),
        (good + "[extra]\n", "unknown sections"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_testbed(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_testbed("/nonexistent/testbed.toml")


# --- validate_plan --------------------------------------------------------------------------

def _devs():
    return [Device.from_spec("a", 20, 1, 100), Device.from_spec("b", 20, 1, 100),
            Device.from_spec("c", 40, 1, 100)]


@pytest.mark.parametrize("stages,msg", [
    ([("a", 0, 15), ("b", 16, 34)], "gap"),
    ([("a", 0, 17), ("b", 16, 34)], "overlap"),
    ([("a", 0, 17), ("zz", 17, 34)], "unknown node"),
    ([("a", 0, 30), ("b", 30, 34)], "needs"),
    ([("a", 0, 17), ("b", 17, 33)], "gap"),
    ([("a", 0, 17), ("b", 17, 17), ("c", 17, 34)], "empty"),
])
def test_validate_plan_rejects(stages, msg):
    plan = Plan(0, (Replica(0, Role.BOTH, tuple(Stage(n, (a, b)) for n, a, b in stages)),))
    with pytest.raises(PlanError, match=msg):
        validate_plan(plan, P7, _devs())


def test_validate_plan_checks_roles_and_sharing():
    ok = Plan(0, (Replica(0, Role.BOTH, (Stage("a", (0, 17)), Stage("b", (17, 34)))),))
    validate_plan(ok, P7, _devs())
    pre_only = Plan(0, (Replica(0, Role.PREFILL, (Stage("c", (0, 34)),)),))
    with pytest.raises(PlanError, match="no decoder"):
        validate_plan(pre_only, P7, _devs())
    shared = Plan(0, (Replica(0, Role.BOTH, (Stage("a", (0, 17)), Stage("b", (17, 34)))),
                      Replica(1, Role.BOTH, (Stage("c", (0, 17)), Stage("a", (17, 34))))))
    with pytest.raises(PlanError, match="serves replicas"):
        validate_plan(shared, P7, _devs())
    # KV for one sequence at the workload's target length counts too
    tight = [Device("a", int(P7.total_weight_bytes) + 1000, 1, 1)]
    one = Plan(0, (Replica(0, Role.BOTH, (Stage("a", (0, 34)),)),))
    validate_plan(one, P7, tight)
    with pytest.raises(PlanError, match="needs"):
        validate_plan(one, P7, tight, Workload())


# --- strategies ----------------------------------------------------------------------------

@pytest.mark.parametrize("testbed", [EDGESHARD, HOME], ids=["edgeshard", "home"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_returns_a_valid_plan(testbed, strategy):
    w = testbed.workload
    try:
        plan = make_plan(strategy, P7, testbed.devices, testbed.network, w, "waiting",
                         np.random.default_rng(0))
    except DoesNotFit:
        assert strategy in ("edge-solo", "cloud-edge-even") and testbed is HOME
        return
    validate_plan(plan, P7, testbed.devices, w)
    assert plan.strategy == strategy and plan.replicas
    pr = plan.predicted
    assert pr.latency_ms_per_token > 0 and pr.throughput_tps > 0 and pr.saturation_rps > 0
    if strategy in ("edge-solo", "cloud-edge-even", "cloud-edge-opt", "ring") or strategy.startswith("edgeshard"):
        assert len(plan.replicas) == 1 and plan.replicas[0].role == Role.BOTH
    src = next(d.name for d in testbed.devices if d.source)
    if strategy in ("edge-solo", "cloud-edge-even", "cloud-edge-opt", "edgeshard-latency",
                    "edgeshard-throughput", "edgeshard-even"):
        assert plan.replicas[0].stages[0].node == src  # the privacy constraint


def test_table_iv_oom_cells_do_not_fit():
    tb = EDGESHARD
    for strategy, prof in [("edge-solo", P13), ("edge-solo", P70), ("cloud-edge-even", P70),
                           ("cloud-edge-opt", P70), ("edgeshard-latency", P70)]:
        if strategy == "edgeshard-latency":
            continue  # EdgeShard runs 70B (checked below)
        with pytest.raises(DoesNotFit):
            make_plan(strategy, prof, tb.devices, tb.network, tb.workload)
    plan = make_plan("edgeshard-throughput", P70, tb.devices, tb.network, tb.workload)
    validate_plan(plan, P70, tb.devices, tb.workload)
    assert len(plan.replicas[0].stages) >= 9  # 70B fp32 needs 9+ devices of 32 GiB


def test_table_iv_shape_for_llama2_7b():
    tb = EDGESHARD
    plans = {s: make_plan(s, P7, tb.devices, tb.network, tb.workload, o)
             for s, o in [("edge-solo", "latency"), ("cloud-edge-opt", "latency"),
                          ("edgeshard-latency", "latency"), ("edgeshard-throughput", "throughput"),
                          ("cloud-edge-even", "latency")]}
    lat = {s: p.predicted.latency_ms_per_token for s, p in plans.items()}
    # the 1 Mb/s source<->cloud link makes cloud-edge-opt keep everything local (paper, §V-B)
    assert plans["cloud-edge-opt"].replicas == plans["edge-solo"].replicas
    assert lat["edge-solo"] == pytest.approx(140.34, rel=0.05)
    assert lat["edgeshard-latency"] < lat["edge-solo"] < lat["cloud-edge-even"]
    assert plans["edgeshard-throughput"].predicted.throughput_tps > plans["edge-solo"].predicted.throughput_tps


def test_algorithm1_never_overfills_a_revisited_device_in_a_plan():
    # 70B: the exact recurrence wants to bounce between the 3090 and an AGX (each run fits, the
    # total would not); the plan must hold each device's total within its memory
    tb = EDGESHARD
    pb = Problem(P70, tb.devices, tb.network, tb.workload)
    plan = make_plan("edgeshard-latency", P70, tb.devices, tb.network, tb.workload)
    nodes = [s.node for s in plan.replicas[0].stages]
    assert len(nodes) == len(set(nodes))
    validate_plan(plan, P70, tb.devices, tb.workload)
    from meshllm.planner.strategies import _latency_inputs
    comp, out, req = _latency_inputs(pb)
    exact = edgeshard_latency(comp, out, pb.bw, pb.rtt, pb.mem, req, 0)
    heur = edgeshard_latency(comp, out, pb.bw, pb.rtt, pb.mem, req, 0, no_revisit=True)
    assert heur.value >= exact.value  # the relaxation is a lower bound


def test_e2llm_is_deterministic_and_beats_splitwise_under_load():
    tb = EDGESHARD
    w = Workload(0.1, LengthDist.fixed(32), LengthDist.fixed(96), 8)
    sat = make_plan("splitwise", P7, tb.devices, tb.network, w).predicted.saturation_rps
    loaded = w.with_rate(0.8 * sat)
    sw = make_plan("splitwise", P7, tb.devices, tb.network, loaded)
    a = make_plan("e2llm", P7, tb.devices, tb.network, loaded, rng=np.random.default_rng(4))
    b = make_plan("e2llm", P7, tb.devices, tb.network, loaded, rng=np.random.default_rng(4))
    assert a.to_dict() == b.to_dict()
    assert a.predicted.mean_wait_s <= 0.5 * sw.predicted.mean_wait_s
    assert a.predicted.saturation_rps > sat


def test_splitwise_sizes_pools_by_its_provisioning_rule():
    tb = EDGESHARD
    plan = make_plan("splitwise", P7, tb.devices, tb.network, tb.workload)
    sizes = {len(r.stages) for r in plan.replicas}
    assert len(sizes) == 1  # identical replicas
    n = sizes.pop()
    # even split within each replica
    for r in plan.replicas:
        counts = [s.end - s.first for s in r.stages]
        assert max(counts) - min(counts) <= 1
    roles = [r.role for r in plan.replicas]
    assert roles.count(Role.PREFILL) >= 1 and roles.count(Role.DECODER) >= 1
    assert roles == sorted(roles, key=lambda x: x != Role.PREFILL)  # the prompt pool first
    assert len(plan.replicas) == 15 // n


def test_splitwise_gives_the_prompt_pool_the_fastest_devices_in_any_order():
    """Splitwise-HA: the prompt phase on the stronger machines. The pools do not depend on the
    order the devices come in (a live mesh lists the leader first, then the members)."""
    tb = EDGESHARD
    plan = make_plan("splitwise", P7, tb.devices, tb.network, tb.workload)
    shuffled = make_plan("splitwise", P7, tuple(reversed(tb.devices)), tb.network, tb.workload)
    pools = {(r.role, tuple(s.node for s in r.stages)) for r in plan.replicas}
    assert pools == {(r.role, tuple(s.node for s in r.stages)) for r in shuffled.replicas}
    pb = Problem(P7, tuple(tb.devices), tb.network, tb.workload)
    speed = {d.name: float(pb.pre_mean[j].sum()) for j, d in enumerate(pb.devices)}
    prompt = [s.node for r in plan.replicas if r.role is Role.PREFILL for s in r.stages]
    token = [s.node for r in plan.replicas if r.role is Role.DECODER for s in r.stages]
    assert max(speed[n] for n in prompt) <= min(speed[n] for n in token)


def test_unknown_strategy_and_objective_are_plan_errors():
    tb = HOME
    with pytest.raises(PlanError, match="unknown strategy"):
        make_plan("magic", P7, tb.devices, tb.network, tb.workload)
    with pytest.raises(PlanError, match="unknown objective"):
        make_plan("ring", P7, tb.devices, tb.network, tb.workload, "speed")


def test_cost_inputs_are_checkable_by_hand():
    tb = HOME
    pb = Problem(P7, tb.devices, tb.network, tb.workload)
    inp = cost_inputs(pb)
    d = inp["devices"]["rtx4090"]
    assert len(d["decode_ms_per_step"]) == P7.n_blocks
    gpu = tb.devices[-1]
    # batch 1 at the mean context: memory-bound, weights + that many tokens of KV read
    read = P7.param_bytes[3] + pb.ctx * P7.kv[3]
    assert read / (0.92 * gpu.mem_bw) > (P7.flops[3] + pb.ctx * P7.attn[3]) / (0.5 * gpu.flops)
    assert d["decode_ms_per_step"][3] == pytest.approx(1e3 * read / (0.92 * gpu.mem_bw), rel=1e-5)
    assert inp["activation_ms_per_token"]["mini-pc"]["rtx4090"] == pytest.approx(
        0.15 + 4096 * 4 / (940e6 / 8) * 1e3, rel=1e-3)


# --- queueing estimate ----------------------------------------------------------------------

def test_estimate_reduces_to_pollaczek_khinchine_without_decoding():
    # one-token outputs: a BOTH replica is a plain M/G/1 prefill server
    from meshllm.planner.types import LengthDist as L

    devs = (Device.from_spec("g", 40, 20, 500),)
    w = Workload(0.5, L.uniform(100, 900), L.fixed(1), 64)
    pb = Problem(P7, devs, Network(), w)
    stages = [(0, 0, P7.n_blocks)]
    perf = pb.perf(stages, Role.BOTH)
    est = pb.estimate_stages([(Role.BOTH, stages)])
    lam = 0.5
    busy = perf.busy
    rho = lam * busy.mean()
    pk = lam * (busy ** 2).mean() / (2 * (1 - rho))
    assert 0.05 < rho < 0.9
    assert est.predicted.mean_wait_s == pytest.approx(pk, rel=1e-3)
    assert est.predicted.mean_ttft_s == pytest.approx(pk + perf.lat.mean(), rel=1e-3)


def test_saturation_rate_is_where_utilisation_reaches_one():
    tb = EDGESHARD
    plan = make_plan("splitwise", P7, tb.devices, tb.network, tb.workload)
    sat = plan.predicted.saturation_rps
    pb = Problem(P7, tb.devices, tb.network, tb.workload.with_rate(0.99 * sat))
    reps = pb.from_replicas(plan.replicas)
    below = pb.estimate_stages(reps)
    assert below.max_util < 1 and math.isfinite(below.predicted.mean_wait_s)
    above = Problem(P7, tb.devices, tb.network, tb.workload.with_rate(1.02 * sat)).estimate_stages(reps)
    assert above.max_util >= 1 and above.predicted.mean_wait_s == math.inf
    assert above.fitness > 1e3 > below.fitness


def test_cloud_edge_even_keeps_the_head_on_the_source_when_the_cloud_cannot_hold_it():
    tb = EDGESHARD
    src = next(d.name for d in tb.devices if d.source)
    # 7B: 16 layers + head fit the RTX 3090, one crossing of the 1 Mb/s link per token
    p7 = make_plan("cloud-edge-even", P7, tb.devices, tb.network, tb.workload)
    assert [(s.node, s.layers) for s in p7.replicas[0].stages] == [(src, (0, 17)), ("rtx3090", (17, 34))]
    # 13B: 20 layers + head = 26.05 GB > 24 GiB, so the head returns to the source
    p13 = make_plan("cloud-edge-even", P13, tb.devices, tb.network, tb.workload)
    assert [(s.node, s.layers) for s in p13.replicas[0].stages] == [
        (src, (0, 21)), ("rtx3090", (21, 41)), (src, (41, 42))]
    validate_plan(p13, P13, tb.devices, tb.workload)
    pb = Problem(P13, tb.devices, tb.network, tb.workload)
    st = pb.from_replicas(p13.replicas)[0][1]
    perf = pb.perf(st, Role.BOTH)
    # the source is one server for its two stages: its prefill time is theirs added up
    j = pb.index[src]
    both = pb.pre[:, j, 0:21].sum(axis=1) + pb.pre[:, j, 41:42].sum(axis=1)
    assert np.all(perf.busy >= both - 1e-12)
    # memory is counted once per node, over both of its stages
    assert cost.replica_memory(P13, p13.replicas[0], 1, 128)[src] == pytest.approx(
        P13.weight_bytes(0, 21) + P13.weight_bytes(41, 42)
        + (P13.kv_bytes_per_token(0, 21) + P13.kv_bytes_per_token(41, 42)) * 128)


def test_validate_sums_a_node_over_its_stages():
    tb = EDGESHARD
    src = next(d.name for d in tb.devices if d.source)
    # each of the source's two stages fits alone; together (31.5 GiB of 13B + KV) they do not
    bad = Plan(0, (Replica(0, Role.BOTH, (Stage(src, (0, 27)), Stage("rtx3090", (27, 35)),
                                          Stage(src, (35, 42)))),))
    with pytest.raises(PlanError, match=f"node {src} needs"):
        validate_plan(bad, P13, tb.devices, tb.workload)


def test_both_replica_tokens_wait_behind_prompts_on_every_resource():
    # a BOTH replica whose prompts hold a link for 2 s: the estimate's decode time grows with the
    # prompt load there (tokens queue behind prompts first come first served); without that
    # resource it does not
    from meshllm.planner.queueing import ReplicaPerf
    w = Workload(arrival_rate=0.2, input_len=LengthDist.fixed(768), output_len=LengthDist.fixed(20),
                 max_batch=8)
    tau = np.concatenate([[math.inf], np.full(8, 0.15)])
    busy, lat = np.array([2.0]), np.array([8.0])
    bare = ReplicaPerf(Role.BOTH, True, 8, busy, lat, tau)
    link = ReplicaPerf(Role.BOTH, True, 8, busy, lat, tau, res_m1=np.array([0.5, 2.0]),
                       res_m2=np.array([0.25, 4.0]))
    kv = np.zeros((1, 1))
    e_bare = estimate([bare], w, kv).predicted
    e_link = estimate([link], w, kv).predicted
    # per token: 0.2 * (0.25 / (2 * 0.9) + 4 / (2 * 0.6)) = 0.6944 s more, over 19 steps
    extra = 19 * 0.2 * (0.25 / (2 * 0.9) + 4.0 / (2 * 0.6))
    dec_link = e_link.mean_e2e_s - e_link.mean_ttft_s
    dec_bare = e_bare.mean_e2e_s - e_bare.mean_ttft_s
    assert dec_bare == pytest.approx(19 * 0.15, rel=1e-9)
    assert dec_link - dec_bare == pytest.approx(extra, rel=1e-6)


@pytest.mark.parametrize(("spec", "msg"), [
    ("magic", "unknown strategy 'magic'"),
    ("splitwise:2", "only e2llm takes pinned replicas"),
    ("e2llm:prefill", "a PREFILL replica needs a DECODER replica"),
    ("e2llm:decoder,both", "a PREFILL replica needs a DECODER replica"),
    ("e2llm:prefil,decoder", "roles are prefill, decoder, both"),
    ("e2llm:0", "at least one replica"),
])
def test_pinned_strategies_are_checked(spec, msg):
    with pytest.raises(PlanError, match=msg) as e:
        parse_strategy(spec)
    assert "\n" not in str(e.value)


def test_pinned_roles_are_the_best_plan_with_those_roles():
    tb = HOME
    w = Workload(0.5, LengthDist.fixed(64), LengthDist.fixed(32), 8)
    pb = Problem(P7, tb.devices, tb.network, w)
    free_f = ga.exhaustive(pb)[0]
    for pin, roles in (("prefill,decoder", [Role.PREFILL, Role.DECODER]), ("both,both", [Role.BOTH] * 2),
                       ("prefill,prefill,decoder", [Role.PREFILL, Role.PREFILL, Role.DECODER])):
        plan = plan_problem(f"e2llm:{pin}", pb, "waiting", np.random.default_rng(0))
        validate_plan(plan, P7, tb.devices, w)
        assert sorted(r.role.value for r in plan.replicas) == sorted(r.value for r in roles)
        assert plan.strategy == f"e2llm:{pin}" and "pinned" in plan.note
        # a restriction of the free search: never better than its optimum
        assert plan.predicted.mean_wait_s >= 0
        assert pb.estimate_stages([(r.role, [(pb.index[s.node], s.first, s.end) for s in r.stages])
                                   for r in plan.replicas]).fitness >= free_f - 1e-12


def test_the_best_over_every_pinned_count_is_the_exhaustive_optimum():
    tb = HOME
    w = Workload(0.5, LengthDist.fixed(64), LengthDist.fixed(32), 8)
    pb = Problem(P7, tb.devices, tb.network, w)
    fits = []
    for k in range(1, len(tb.devices) + 1):
        try:
            fits.append(pb.estimate_stages(strategies.e2llm_pinned(pb, k).replicas).fitness)
        except DoesNotFit as e:
            assert f"holds {k} replicas" in str(e)
    assert len(fits) >= 2 and min(fits) == pytest.approx(ga.exhaustive(pb)[0], rel=1e-12)


def test_worst_utilisation_grows_with_the_rate_past_saturation():
    # one BOTH replica whose KV slots bind first: past the rate where its prompts saturate too,
    # the slots' offered load must still count, or a plan would look less overloaded at a
    # higher rate and the GA would trade capacity away under heavy load
    w = Workload(1.0, LengthDist.fixed(32), LengthDist.fixed(256), 1)
    pb = Problem(P7, (Device.from_spec("a", 48, 10, 400, source=True),), Network(), w)
    perf = pb.perf([(0, 0, P7.n_blocks)], Role.BOTH)
    sat = 1 / (perf.lat_mean + 255 * perf.tau_l[1])  # one slot: one request at a time
    assert sat < 0.2 / perf.busy_mean  # the slot binds long before the prompts
    u1 = estimate([perf], w.with_rate(2 * sat), np.zeros((1, 1))).max_util
    u2 = estimate([perf], w.with_rate(20 / perf.busy_mean), np.zeros((1, 1))).max_util
    assert u1 == pytest.approx(2.0, rel=0.05)
    assert u2 == pytest.approx(20 / perf.busy_mean / sat, rel=0.05)


def test_an_absurd_rate_is_overloaded_not_unfit():
    tb = HOME
    w = Workload(1e300, LengthDist.fixed(32), LengthDist.fixed(96), 8)
    plan = make_plan("e2llm", P7, tb.devices, tb.network, w)
    assert math.isinf(plan.predicted.mean_wait_s) and plan.predicted.saturation_rps > 0
