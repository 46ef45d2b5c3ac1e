"""Latency placement is the optimum over every placement whose devices hold all of their runs:
checked against an exhaustive enumeration written here, independently of the planner."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import DoesNotFit
from meshllm.planner.cost import ModelProfile
from meshllm.planner.dp import edgeshard_latency
from meshllm.planner.latency import place_latency
from meshllm.planner.strategies import make_plan
from meshllm.planner.testbed import parse_testbed
from meshllm.planner.validate import validate_plan


def link(nbytes, bw, rtt):
    return 0.0 if np.isinf(bw) else rtt / 2 + nbytes / bw


def instance(seed: int, m: int, n: int, tightness: float):
    rng = np.random.default_rng(seed)
    comp = rng.uniform(0.1, 2.0, size=(m, n))
    out = rng.uniform(0.2, 3.0, size=n)
    bw = rng.uniform(0.5, 5.0, size=(m, m))
    bw = (bw + bw.T) / 2
    np.fill_diagonal(bw, np.inf)
    rtt = rng.uniform(0.0, 0.5, size=(m, m))
    rtt = (rtt + rtt.T) / 2
    np.fill_diagonal(rtt, 0.0)
    req = rng.uniform(1.0, 3.0, size=n)
    # tight: each device holds a random share of the model, together a little more than all of it
    share = rng.dirichlet(np.ones(m)) * tightness + rng.uniform(0.0, 0.3, size=m)
    return comp, out, bw, rtt, share * req.sum(), req


def exhaustive(comp, out, bw, rtt, mem, req, source, ret=8.0):
    """Every block -> device map, block 0 on the source (any device when None, the token then
    returning to it), each device's blocks summed against its memory."""
    m, n = comp.shape
    best, best_assign = np.inf, None
    for assign in itertools.product(range(m), repeat=n):
        if source is not None and assign[0] != source:
            continue
        held = np.zeros(m)
        for i, j in enumerate(assign):
            held[j] += req[i]
        if np.any(held > mem):
            continue
        t = sum(comp[j, i] for i, j in enumerate(assign))
        t += sum(link(out[i - 1], bw[assign[i - 1], assign[i]], rtt[assign[i - 1], assign[i]])
                 for i in range(1, n) if assign[i] != assign[i - 1])
        t += link(ret, bw[assign[-1], assign[0]], rtt[assign[-1], assign[0]])
        if t < best:
            best, best_assign = t, assign
    return best, best_assign


def value_of(comp, out, bw, rtt, stages, ret=8.0):
    t = sum(comp[j, a:b].sum() for j, a, b in stages)
    t += sum(link(out[a - 1], bw[stages[q - 1][0], j], rtt[stages[q - 1][0], j])
             for q, (j, a, _) in enumerate(stages) if q > 0)
    return t + link(ret, bw[stages[-1][0], stages[0][0]], rtt[stages[-1][0], stages[0][0]])


def check_sound(stages, n, mem, req, source):
    assert stages[0][1] == 0 and stages[-1][2] == n
    for (_, _, b), (_, a, _) in itertools.pairwise(stages):
        assert a == b
    assert all(a < b for _, a, b in stages)
    if source is not None:
        assert stages[0][0] == source
    held = np.zeros(len(mem))
    for j, a, b in stages:
        held[j] += req[a:b].sum()
    assert np.all(held <= mem * (1 + 1e-12))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(1, 4), n=st.integers(1, 6),
       tightness=st.floats(0.9, 1.6), use_source=st.booleans())
def test_latency_placement_equals_exhaustive_enumeration(seed, m, n, tightness, use_source):
    comp, out, bw, rtt, mem, req = instance(seed, m, n, tightness)
    source = 0 if use_source else None
    want, _ = exhaustive(comp, out, bw, rtt, mem, req, source)
    if not np.isfinite(want):
        with pytest.raises(DoesNotFit):
            place_latency(comp, out, bw, rtt, mem, req, source)
        return
    # the MILP (up to the switch size), and the depth-first search run to the end above it
    for kw in ({}, {"max_exact": 0, "node_budget": 10**6}):
        got = place_latency(comp, out, bw, rtt, mem, req, source, **kw)
        assert got.exact and got.method == "exact", kw
        assert got.value == pytest.approx(want, rel=1e-9), kw
        assert got.bound == got.value and got.gap == 0
        check_sound(got.stages, n, mem, req, source)
        assert value_of(comp, out, bw, rtt, got.stages) == pytest.approx(got.value, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(3, 4), n=st.integers(5, 7))
def test_without_search_the_answer_is_sound_and_its_bound_is_a_true_lower_bound(seed, m, n):
    comp, out, bw, rtt, mem, req = instance(seed, m, n, 1.1)
    want, _ = exhaustive(comp, out, bw, rtt, mem, req, 0)
    for kw in ({"max_exact": 0, "node_budget": 0}, {"max_exact": 0, "node_budget": 3}, {"node_limit": 1}):
        try:
            got = place_latency(comp, out, bw, rtt, mem, req, 0, **kw)
        except DoesNotFit:
            continue  # the heuristics may find nothing where the search would
        assert np.isfinite(want)
        assert got.bound <= want * (1 + 1e-9) <= got.value * (1 + 2e-9)
        check_sound(got.stages, n, mem, req, 0)
        assert got.method in ("exact", "heuristic" if "max_exact" in kw else "budget")
        assert got.gap == 0 if got.exact else got.bound < got.value
        assert got.exact == (got.method == "exact")
        assert value_of(comp, out, bw, rtt, got.stages) == pytest.approx(got.value, rel=1e-9)


def test_a_device_may_hold_two_runs_when_that_is_faster_and_fits():
    # the source is fast at blocks 0 and 2, the other device at block 1; both hold everything
    comp = np.array([[0.1, 5.0, 0.1], [5.0, 0.1, 5.0]])
    out = np.ones(3)
    bw = np.array([[np.inf, 100.0], [100.0, np.inf]])
    rtt = np.zeros((2, 2))
    req = np.ones(3)
    got = place_latency(comp, out, bw, rtt, np.array([3.0, 3.0]), req, 0)
    assert [j for j, _, _ in got.stages] == [0, 1, 0] and got.exact
    # with room for one block only on the source the detour no longer fits
    got = place_latency(comp, out, bw, rtt, np.array([1.5, 3.0]), req, 0)
    assert [j for j, _, _ in got.stages] != [0, 1, 0]
    check_sound(got.stages, 3, np.array([1.5, 3.0]), req, 0)


def test_algorithm_1_alone_can_overfill_a_revisited_device():
    # why place_latency exists: the paper's recurrence checks memory per run only
    comp, out, bw, rtt, mem, req = None, None, None, None, None, None
    for seed in range(200):
        comp, out, bw, rtt, mem, req = instance(seed, 3, 6, 1.0)
        try:
            relaxed = edgeshard_latency(comp, out, bw, rtt, mem, req, 0)
        except DoesNotFit:
            continue
        held = np.zeros(3)
        for j, a, b in relaxed.stages:
            held[j] += req[a:b].sum()
        if np.any(held > mem):
            break
    else:
        pytest.fail("no instance where Algorithm 1 overfills a device")
    got = place_latency(comp, out, bw, rtt, mem, req, 0)
    assert got.value >= relaxed.value and got.exact
    check_sound(got.stages, 6, mem, req, 0)


ISSUE_12 = """
[[device]]
name = "d10-0"
memory_gb = 0.0803493
tflops = 0.11342
mem_bw_gbs = 3.229
[[device]]
name = "d10-1"
memory_gb = 0.0501966
tflops = 35.651
mem_bw_gbs = 11.397
[[device]]
name = "d10-2"
memory_gb = 0.0294115
tflops = 1.5128
mem_bw_gbs = 56.436
source = true
[[device]]
name = "d10-3"
memory_gb = 0.119479
tflops = 0.48159
mem_bw_gbs = 6.798
[workload]
arrival_rate = 0.5
input_len = 8
output_len = 128
max_batch = 6
[network]
default_mbps = 2523.3
default_rtt_ms = 0.51097
[[network.link]]
a = "d10-0"
b = "d10-1"
mbps = 175.68
[[network.link]]
a = "d10-0"
b = "d10-2"
mbps = 19537.0
[[network.link]]
a = "d10-1"
b = "d10-2"
mbps = 134.35
rtt_ms = 0.12827
[[network.link]]
a = "d10-2"
b = "d10-3"
mbps = 9753.4
"""


def test_issue_12_testbed_gets_the_optimal_chain():
    tb = parse_testbed(ISSUE_12, "issue-12.toml")
    prof = ModelProfile.from_preset("small")
    plan = make_plan("edgeshard-latency", prof, tb.devices, tb.network, tb.workload)
    validate_plan(plan, prof, tb.devices, tb.workload)
    chain = [(s.node, s.first, s.end) for s in plan.replicas[0].stages]
    assert chain == [("d10-2", 0, 2), ("d10-3", 2, 6), ("d10-1", 6, 10)]
    assert plan.predicted.latency_ms_per_token == pytest.approx(13.474, abs=5e-4)
    assert "exact" in plan.note



def test_the_note_travels_with_the_plan_and_only_when_there_is_one():
    from meshllm.planner.types import Plan

    tb = parse_testbed(ISSUE_12, "issue-12.toml")
    prof = ModelProfile.from_preset("small")
    plan = make_plan("edgeshard-latency", prof, tb.devices, tb.network, tb.workload)
    d = plan.to_dict()
    assert d["note"] == plan.note and Plan.from_dict(d) == plan
    assert plan.with_epoch(3).note == plan.note
    ring = make_plan("ring", prof, tb.devices, tb.network, tb.workload)
    assert "note" not in ring.to_dict() and Plan.from_dict(ring.to_dict()).note == ""
