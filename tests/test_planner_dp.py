"""EdgeShard's DPs and the bottleneck DP equal brute force on random small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import DoesNotFit
from meshllm.planner.dp import (
    bottleneck_split,
    edgeshard_latency,
    edgeshard_throughput,
    even_split,
    proportional_split,
)


def link(nbytes, bw, rtt):
    return 0.0 if np.isinf(bw) else rtt / 2 + nbytes / bw


def instance(seed: int, m: int, n: int, tight: bool):
    rng = np.random.default_rng(seed)
    comp = rng.uniform(0.1, 2.0, size=(m, n))
    out = rng.uniform(0.5, 3.0, size=n)
    bw = rng.uniform(0.5, 5.0, size=(m, m))
    bw = (bw + bw.T) / 2
    np.fill_diagonal(bw, np.inf)
    rtt = rng.uniform(0.0, 0.5, size=(m, m))
    rtt = (rtt + rtt.T) / 2
    np.fill_diagonal(rtt, 0.0)
    req = rng.uniform(1.0, 3.0, size=n)
    # tight memory: most devices hold only part of the model
    mem = rng.uniform(0.3, 0.8, size=m) * req.sum() if tight else np.full(m, 1e9)
    return comp, out, bw, rtt, mem, req


def runs(assign):
    """Maximal runs (device, first, end) of a block -> device map."""
    out, a = [], 0
    for i in range(1, len(assign) + 1):
        if i == len(assign) or assign[i] != assign[a]:
            out.append((assign[a], a, i))
            a = i
    return out


def brute_latency(comp, out, bw, rtt, mem, req, source, ret):
    m, n = comp.shape
    best = np.inf
    for assign in itertools.product(range(m), repeat=n):
        if source is not None and assign[0] != source:
            continue
        rs = runs(assign)
        if any(req[a:b].sum() > mem[j] for j, a, b in rs):
            continue
        t = sum(comp[assign[i], i] for i in range(n))
        t += sum(link(out[a - 1], bw[rs[q - 1][0], j], rtt[rs[q - 1][0], j])
                 for q, (j, a, _) in enumerate(rs) if q > 0)
        t += link(ret, bw[rs[-1][0], assign[0]], rtt[rs[-1][0], assign[0]])
        best = min(best, t)
    return best


def chain_value(comp, out, bw, rtt, stages, ret_to):
    v = 0.0
    for q, (j, a, b) in enumerate(stages):
        v = max(v, comp[j, a:b].sum())
        if q > 0:
            k = stages[q - 1][0]
            v = max(v, link(out[a - 1], bw[k, j], rtt[k, j]))
    if ret_to is not None:
        last = stages[-1][0]
        v = max(v, link(8.0, bw[last, ret_to], rtt[last, ret_to]))
    return v


def compositions(n, k):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [(bounds[i], bounds[i + 1]) for i in range(k)]


def brute_throughput(comp, out, bw, rtt, mem, req, source):
    m, n = comp.shape
    best = np.inf
    for k in range(1, min(m, n) + 1):
        for devs in itertools.permutations(range(m), k):
            if source is not None and devs[0] != source:
                continue
            for parts in compositions(n, k):
                stages = [(j, a, b) for j, (a, b) in zip(devs, parts, strict=True)]
                if any(req[a:b].sum() > mem[j] for j, a, b in stages):
                    continue
                best = min(best, chain_value(comp, out, bw, rtt, stages, source))
    return best


def brute_bottleneck(comp, out, bw, rtt, mem, req, order):
    n = comp.shape[1]
    best = np.inf
    for parts in compositions(n, len(order)):
        stages = [(j, a, b) for j, (a, b) in zip(order, parts, strict=True)]
        if any(req[a:b].sum() > mem[j] for j, a, b in stages):
            continue
        best = min(best, chain_value(comp, out, bw, rtt, stages, order[0]))
    return best


def eval_latency(comp, out, bw, rtt, stages, ret):
    t = sum(comp[j, a:b].sum() for j, a, b in stages)
    t += sum(link(out[a - 1], bw[stages[q - 1][0], j], rtt[stages[q - 1][0], j])
             for q, (j, a, _) in enumerate(stages) if q > 0)
    return t + link(ret, bw[stages[-1][0], stages[0][0]], rtt[stages[-1][0], stages[0][0]])


def covers(stages, n):
    assert stages[0][1] == 0 and stages[-1][2] == n
    for (_, _, b), (_, a, _) in itertools.pairwise(stages):
        assert a == b


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(1, 3), n=st.integers(1, 6),
       tight=st.booleans(), use_source=st.booleans())
def test_algorithm1_equals_brute_force(seed, m, n, tight, use_source):
    comp, out, bw, rtt, mem, req = instance(seed, m, n, tight)
    source = 0 if use_source else None
    want = brute_latency(comp, out, bw, rtt, mem, req, source, 8.0)
    if not np.isfinite(want):
        with pytest.raises(DoesNotFit):
            edgeshard_latency(comp, out, bw, rtt, mem, req, source)
        return
    got = edgeshard_latency(comp, out, bw, rtt, mem, req, source)
    assert got.value == pytest.approx(want, rel=1e-9)
    covers(got.stages, n)
    if source is not None:
        assert got.stages[0][0] == source
    assert eval_latency(comp, out, bw, rtt, got.stages, 8.0) == pytest.approx(got.value, rel=1e-9)
    assert all(req[a:b].sum() <= mem[j] for j, a, b in got.stages)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(1, 4), n=st.integers(1, 6),
       tight=st.booleans(), use_source=st.booleans())
def test_algorithm2_equals_brute_force(seed, m, n, tight, use_source):
    comp, out, bw, rtt, mem, req = instance(seed, m, n, tight)
    source = 0 if use_source else None
    want = brute_throughput(comp, out, bw, rtt, mem, req, source)
    if not np.isfinite(want):
        with pytest.raises(DoesNotFit):
            edgeshard_throughput(comp, out, bw, rtt, mem, req, source)
        return
    got = edgeshard_throughput(comp, out, bw, rtt, mem, req, source)
    assert got.value == pytest.approx(want, rel=1e-9)
    covers(got.stages, n)
    devs = [j for j, _, _ in got.stages]
    assert len(set(devs)) == len(devs)
    if source is not None:
        assert devs[0] == source
    assert chain_value(comp, out, bw, rtt, got.stages, source) == pytest.approx(got.value, rel=1e-9)
    assert all(req[a:b].sum() <= mem[j] for j, a, b in got.stages)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(1, 4), n=st.integers(1, 7), tight=st.booleans())
def test_bottleneck_split_equals_brute_force(seed, m, n, tight):
    comp, out, bw, rtt, mem, req = instance(seed, m, n, tight)
    order = list(np.random.default_rng(seed).permutation(m))[: min(m, n)]
    want = brute_bottleneck(comp, out, bw, rtt, mem, req, order)
    if not np.isfinite(want):
        with pytest.raises(DoesNotFit):
            bottleneck_split(comp, out, bw, rtt, mem, req, order)
        return
    got = bottleneck_split(comp, out, bw, rtt, mem, req, order)
    assert got.value == pytest.approx(want, rel=1e-9)
    assert [j for j, _, _ in got.stages] == order
    covers(got.stages, n)


def test_algorithm2_heuristic_keeps_source_and_is_feasible():
    comp, out, bw, rtt, mem, req = instance(7, 14, 10, tight=True)
    got = edgeshard_throughput(comp, out, bw, rtt, mem, req, source=3, max_exact=5)
    assert got.stages[0][0] == 3
    covers(got.stages, 10)
    assert all(req[a:b].sum() <= mem[j] for j, a, b in got.stages)


def test_even_and_proportional_splits():
    assert even_split(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert proportional_split(10, [1, 1]) == [(0, 5), (5, 10)]
    parts = proportional_split(34, [32, 16, 16])
    assert parts[0][0] == 0 and parts[-1][1] == 34
    assert [b - a for a, b in parts] == [17, 9, 8] or [b - a for a, b in parts] == [17, 8, 9]
    with pytest.raises(DoesNotFit):
        even_split(2, 3)
