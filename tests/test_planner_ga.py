"""The E2LLM GA reaches the exhaustive optimum of its own fitness on small meshes, and is
deterministic and pure."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.planner import ga
from meshllm.planner.cost import ModelProfile
from meshllm.planner.problem import Problem
from meshllm.planner.types import Device, LengthDist, Link, Network, Workload

PROFILE = ModelProfile.from_preset("llama2-7b")


def instance(seed: int, m: int) -> Problem:
    r = np.random.default_rng(seed)
    devs = [Device.from_spec(f"d{i}", float(r.choice([8, 12, 16, 24, 32, 48])),
                             float(r.uniform(1, 40)), float(r.uniform(50, 1000)), source=i == 0)
            for i in range(m)]
    links = []
    net = Network(float(r.uniform(50, 1000)), float(r.uniform(0.2, 3)), tuple(links))
    mix = int(r.integers(0, 3))
    if mix == 0:
        w = Workload(1.0, LengthDist.fixed(32), LengthDist.fixed(96), 8)
    elif mix == 1:
        w = Workload(1.0, LengthDist.lognormal(400, 0.8, 2048), LengthDist.uniform(8, 64), 8)
    else:
        w = Workload(1.0, LengthDist.uniform(16, 256), LengthDist.lognormal(128, 0.7, 512), 4)
    pb = Problem(PROFILE, tuple(devs), net, w)
    # load: a random fraction of what the all-in-one-replica plan sustains, so some instances
    # are light and some push the GA to several replicas
    return Problem(PROFILE, tuple(devs), net, w.with_rate(float(r.uniform(0.05, 1.5)) * _ref_rate(pb)))


def _ref_rate(pb: Problem) -> float:
    from meshllm.planner.queueing import saturation_rate

    m = len(pb.devices)
    best = 0.0
    for members in ([j] for j in range(m)):
        r = pb.replica_perf(members, ga.Role.BOTH)
        if r is not None:
            best = max(best, saturation_rate([r[0]], pb.workload, np.zeros((1, 1))))
    return best if best > 0 else 0.05


SIZES = [4] * 15 + [5] * 4 + [6]


@pytest.mark.parametrize("seed,m", list(enumerate(SIZES)))
def test_ga_within_one_percent_of_exhaustive(seed, m):
    pb = instance(1000 + seed, m)
    opt, _, _ = ga.exhaustive(pb)
    best = ga.run(pb, np.random.default_rng(seed))
    got = float(best.fitness[0])
    assert got >= opt * (1 - 1e-9)  # the exhaustive optimum is a true lower bound
    assert got <= opt * 1.01, f"GA {got} vs exhaustive {opt}"


def test_same_seed_same_result_and_evolve_is_pure():
    pb = instance(7, 6)
    a = ga.run(pb, np.random.default_rng(3))
    b = ga.run(instance(7, 6), np.random.default_rng(3))
    assert np.array_equal(a.assign[0], b.assign[0]) and np.array_equal(a.roles[0], b.roles[0])
    isl = ga.initial_island(pb, np.random.default_rng(5))
    e1 = ga.evolve(isl, 3, np.random.default_rng(9))
    e2 = ga.evolve(isl, 3, np.random.default_rng(9))
    assert np.array_equal(e1.assign, e2.assign) and np.array_equal(e1.fitness, e2.fitness)
    assert e1.generation == isl.generation + 3
    # the input island is untouched, and elitism never loses the best
    assert isl.generation == 0 and e1.fitness[0] <= isl.fitness[0]


def test_merge_migrates_elites_in_a_ring():
    pb = instance(11, 5)
    i1 = ga.initial_island(pb, np.random.default_rng(1))
    i2 = ga.evolve(ga.initial_island(pb, np.random.default_rng(2)), 5, np.random.default_rng(3))
    assert ga.merge([i1]) == [i1]
    m1, m2 = ga.merge([i1, i2])
    assert len(m1.fitness) == len(i1.fitness) and len(m2.fitness) == len(i2.fitness)
    assert m1.fitness[0] <= min(i1.fitness[0], i2.fitness[0])  # i2's elite reached island 1
    assert m2.fitness[0] <= i2.fitness[0]
    assert all(a <= b for a, b in zip(m1.fitness[:-1], m1.fitness[1:], strict=True))


def test_operators_keep_the_encoding_normalised():
    rng = np.random.default_rng(0)
    m = 8
    for _ in range(200):
        a, r = ga._random_individual(m, rng)
        b, s = ga._random_individual(m, rng)
        for c, _roles in (ga.crossover((a, r), (b, s), rng), ga.mutate((a, r), rng)):
            labels = [k for k in c.tolist() if k > 0]
            seen = list(dict.fromkeys(labels))
            assert seen == list(range(1, len(seen) + 1))  # slots numbered by first appearance
            assert c.min() >= 0 and c.max() <= m


def test_island_model_run_is_deterministic_and_reaches_the_optimum():
    pb = instance(1003, 4)
    opt = ga.exhaustive(pb)[0]
    a = ga.run(pb, np.random.default_rng(8), islands=2, generations=30)
    b = ga.run(instance(1003, 4), np.random.default_rng(8), islands=2, generations=30)
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.fitness, b.fitness)
    assert a.fitness[0] <= opt * 1.02


def tight_instance(seed: int, m: int) -> Problem:
    """Tight memory: the devices share 1.1-2.6x the weights unevenly, so most groupings do not
    fit and the feasible ones are few and irregular."""
    r = np.random.default_rng(seed)
    share = r.dirichlet(np.ones(m)) * float(r.uniform(1.1, 2.6)) * PROFILE.total_weight_bytes / 2**30
    devs = [Device.from_spec(f"d{i}", float(share[i]) * 1.05 + 0.5, float(r.uniform(1, 40)),
                             float(r.uniform(50, 1000)), source=i == 0) for i in range(m)]
    links = tuple(Link(f"d{a}", f"d{b}", float(r.uniform(20, 1000)), float(r.uniform(0.2, 3)))
                  for a in range(m) for b in range(a + 1, m) if r.random() < 0.5)
    net = Network(float(r.uniform(50, 1000)), float(r.uniform(0.2, 3)), links)
    w = Workload(1.0, LengthDist.lognormal(128, 1.0, 1024), LengthDist.lognormal(128, 1.0, 512), 8)
    pb = Problem(PROFILE, tuple(devs), net, w)
    return Problem(PROFILE, tuple(devs), net, w.with_rate(float(r.uniform(0.05, 0.9)) * _ref_rate_any(pb)))


def _ref_rate_any(pb: Problem) -> float:
    """Saturation rate of the all-devices BOTH replica (0.05 when it does not fit)."""
    from meshllm.planner.queueing import saturation_rate

    r = pb.replica_perf(ga.chain_order(pb, range(len(pb.devices)), pb.source), ga.Role.BOTH)
    return saturation_rate([r[0]], pb.workload, np.zeros((1, 1))) if r is not None else 0.05


@pytest.mark.parametrize("seed,m", [(s, 4 + s % 2) for s in range(8)])
def test_ga_within_one_percent_of_exhaustive_under_tight_memory(seed, m):
    pb = tight_instance(2000 + seed, m)
    opt, _, _ = ga.exhaustive(pb)
    got = float(ga.run(pb, np.random.default_rng(seed)).fitness[0])
    assert got >= opt * (1 - 1e-9)
    assert got <= opt * 1.01, f"GA {got} vs exhaustive {opt}"


def test_climb_ends_at_a_local_optimum_and_search_never_loses_its_start():
    pb = instance(1010, 6)
    isl = ga.initial_island(pb, np.random.default_rng(0))
    start = (isl.assign[-1], isl.roles[-1])  # the worst of the population: room to climb
    a, r, f, looks = ga.climb(pb, *start, np.random.default_rng(1))
    assert f <= isl.fitness[-1] and looks > 0
    assert f == ga.fitness(pb, a, r)
    for b, s in ga._neighbours(a, r):  # no single move improves a local optimum
        assert ga.fitness(pb, *ga.normalise(b, s)) >= f * (1 - 1e-12)
    sa, sr, sf = ga.search(pb, *start, np.random.default_rng(2), 300)
    assert sf <= isl.fitness[-1]  # never worse than where it started
    assert sf == ga.fitness(pb, sa, sr)
    again = ga.search(instance(1010, 6), *start, np.random.default_rng(2), 300)
    assert np.array_equal(again[0], sa) and np.array_equal(again[1], sr) and again[2] == sf  # pure


def test_redeal_keeps_the_shape_and_moves_devices_only_within_a_role():
    """The restarts' start: same replica count, sizes, roles and left-out devices; the devices of
    one role's replicas shuffled among them; pure in the generator."""
    a = np.array([1, 1, 2, 2, 3, 0, 1, 2], dtype=np.int64)
    r = np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=np.int64)  # slots 1, 2 prefill, slot 3 decoder

    def shape(a, r):
        k = int(a.max())
        return sorted((int(r[x - 1]), int((a == x).sum())) for x in range(1, k + 1))

    deals = set()
    for seed in range(20):
        b, s = ga.redeal(a, r, np.random.default_rng(seed))
        assert shape(b, s) == shape(a, r)
        assert b[5] == 0  # left out stays out
        assert s[int(b[4]) - 1] == 1 and (b == b[4]).sum() == 1  # the lone decoder keeps its replica
        assert all(s[int(b[j]) - 1] == 0 for j in (0, 1, 2, 3, 6, 7))  # prefill devices stay prefill
        again = ga.redeal(a, r, np.random.default_rng(seed))
        assert np.array_equal(again[0], b) and np.array_equal(again[1], s)  # pure
        deals.add(ga._key(b, s))
    assert len(deals) > 3  # it really deals afresh (10 groupings of 6 devices into two of 3)


def test_run_leaves_garbage_collection_as_it_found_it():
    import gc

    pb = instance(1011, 4)
    assert gc.isenabled()
    ga.run(pb, np.random.default_rng(0), search_evals=50)
    assert gc.isenabled()
    gc.disable()
    try:
        ga.run(pb, np.random.default_rng(0), search_evals=50)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_memoised_split_matches_the_reference_bottleneck_dp():
    """Problem.split builds each device's tables once; the answer must be the plain DP's."""
    import math

    from meshllm.errors import DoesNotFit
    from meshllm.planner.cost import TOKEN_BYTES
    from meshllm.planner.dp import bottleneck_split

    checked = 0
    for seed in range(6):
        pb = tight_instance(3000 + seed, 6) if seed % 2 else instance(3000 + seed, 6)
        rng = np.random.default_rng(seed)
        w = pb.workload
        eo1 = max(w.output_len.mean - 1, 0.0)
        for _ in range(15):
            members = [int(x) for x in rng.permutation(6)[: int(rng.integers(1, 7))]]
            s_n = len(members)
            micro = max(1, math.ceil(w.max_batch / s_n))
            for role in ga.ROLES:
                if role == ga.Role.PREFILL:
                    comp, tokens, kvs = pb.pre_mean, pb.t_mean, [pb.in_pct * s_n, pb.in_pct]
                elif role == ga.Role.DECODER:
                    comp, tokens, kvs = pb.dec[micro], float(micro), [w.max_batch * pb.target_len, pb.target_len]
                else:
                    comp = pb.pre_mean + eo1 * pb.dec[micro] / micro
                    tokens, kvs = pb.t_mean + eo1, [w.max_batch * pb.target_len, pb.target_len]
                ref = None
                for kvt in kvs:
                    try:
                        ref = bottleneck_split(comp, PROFILE.act * tokens, pb.bw, pb.rtt, pb.mem, pb.req(kvt),
                                               members, ret_bytes=TOKEN_BYTES * tokens)
                        break
                    except DoesNotFit:
                        continue
                try:
                    got = pb.split(members, role)
                except DoesNotFit:
                    got = None
                assert got == ref, (members, role)
                checked += ref is not None
    assert checked > 50  # most of them fit: the comparison is not vacuous


def test_bench_gap_is_measured_against_the_best_plan_known():
    """`meshllm bench planner`'s GA figures: best known is no worse than any run or heuristic
    it was taken over, so every gap is >= 0, and the small-mesh gap is against exhaustive."""
    from functools import partial

    from meshllm.bench import planner as bench

    pb = instance(1020, 5)
    res = bench.ga_mix(partial(Problem, PROFILE, pb.devices, pb.network, pb.workload), 0, seeds=2,
                       best_runs=1, best_evals=200, repeats=1)
    best = res["best_known"]["fitness"]
    assert best <= res["fitness"] and res["gap_pct"] == round(100 * (res["fitness"] / best - 1), 3)
    assert res["seeds"]["n"] == 2 and 0 <= res["seeds"]["mean_gap_pct"] <= res["seeds"]["worst_gap_pct"]
    heur = bench._heuristic_fitness(pb)
    assert heur and best <= min(heur.values())  # the heuristics' plans are in the best known
    small = bench.ga_small(2, 0)
    assert small["meshes"] == 2 and 0 <= small["mean_gap_pct"] <= small["worst_gap_pct"]


def _bench_chat() -> Problem:
    """`meshllm bench planner`'s chat mix: 16 devices, at 0.1218 requests/s (80% of what the
    Splitwise plan's saturation was while its pools were in the mesh's order, before its prompt
    pool took the fastest devices)."""
    from meshllm.bench import planner as bench

    devs, net = bench._devices()
    return Problem(PROFILE, tuple(devs), net, Workload(0.12182190398874299, *bench.MIXES["chat"], 8))


def test_a_climb_with_pairs_leaves_a_local_optimum_of_single_moves_that_two_moves_improve():
    """Three prefill replicas of Jetsons and the two RTX 3090s decoding (where the default run
    on seed 0 ended before pairs): no single move improves it, but a device brought in from
    outside together with another swapped out does (the replica's size and members change at
    once, so its layer split and the KV hand-off do). With the same generator the climb with
    pairs follows the plain climb to its local optimum and only goes on from there."""
    pb = _bench_chat()
    a = np.array([0, 1, 2, 2, 1, 1, 3, 2, 1, 3, 3, 3, 0, 0, 4, 4], dtype=np.int64)
    r = np.zeros(16, dtype=np.int64)
    r[3] = 1  # slots 1-3 prefill, slot 4 decoder
    f = ga.fitness(pb, a, r)
    for b, s in ga._neighbours(a, r):
        assert ga.fitness(pb, *ga.normalise(b, s)) >= f * (1 - 1e-12)  # a local optimum
    plain = ga.climb(pb, a, r, np.random.default_rng(0))
    assert plain[2] == f
    b, s, g, looks = ga.climb(pb, a, r, np.random.default_rng(0), pairs=ga.PAIRS)
    assert g < f * 0.99 and g == ga.fitness(pb, b, s) and looks > plain[3]
    for c, t in ga._neighbours(b, s):  # it still ends at a local optimum of single moves
        assert ga.fitness(pb, *ga.normalise(c, t)) >= g * (1 - 1e-12)
    # and pairs never make a climb worse than without them, from anywhere
    isl = ga.initial_island(pb, np.random.default_rng(3))
    for i in (0, 5, 20):
        one = ga.climb(pb, isl.assign[i], isl.roles[i], np.random.default_rng(i))[2]
        two = ga.climb(pb, isl.assign[i], isl.roles[i], np.random.default_rng(i), pairs=ga.PAIRS)[2]
        assert two <= one


def test_the_search_estimate_is_the_full_estimate_without_the_headline_figures():
    """`ga.fitness` skips the plan's headline figures; `ga.decode` gives them, with the same
    fitness as the plan's own estimate (`Problem.estimate_stages`), and the KV hand-offs the
    search memoises per pair of replicas are the plan's."""
    pb = instance(1030, 6)
    rng = np.random.default_rng(0)
    isl = ga.initial_island(pb, rng)
    checked = split = 0
    for i in range(80):
        a, r = ga.mutate((isl.assign[i % 10], isl.roles[i % 10]), rng)
        est, stages = ga.decode(pb, a, r)
        assert est.fitness == ga.fitness(pb, a, r)
        if est.fitness >= ga.INFEASIBLE:
            continue
        checked += 1
        split += any(role == ga.Role.PREFILL for role, _ in stages)
        full = pb.estimate_stages(stages)
        assert full.fitness == est.fitness and full.predicted == est.predicted
        assert est.predicted.mean_wait_s is not None and est.predicted.throughput_tps is not None
        kv = pb.kv_seconds([st for _, st in stages])
        for i, (_, si) in enumerate(stages):
            for j, (_, sj) in enumerate(stages):
                assert kv[i, j] == (pb.kv_pair(si, sj) if i != j else 0.0)
    assert checked > 20 and split > 10  # phase-split plans among them: their hand-offs count


def test_a_replica_can_be_traded_for_one_device_that_holds_the_model():
    """Move kind 5: replica x's devices left out, device y (out until then) alone in its slot;
    offered in full scans only. On the bench's long-prompt mix the best plan known is two BOTH
    replicas, the two RTX 3090s and one Jetson AGX alone; without the trade, runs on seeds 1
    and 2 ended 17.6% and 39.7% above it (an Orin NX in front of each 3090, or five replicas)."""
    a = np.array([1, 1, 0, 2, 0], dtype=np.int64)
    r = np.array([2, 0, 0, 0, 0], dtype=np.int64)
    trades = [mv for mv in ga._moves(a, r) if mv[0] == 5]
    assert sorted(trades) == [(5, 1, 2), (5, 1, 4), (5, 2, 2), (5, 2, 4)]
    assert not [mv for mv in ga._moves(a, r, focus=[0, 2]) if mv[0] == 5]
    b, s = ga._apply(a, r, (5, 1, 4))
    assert b.tolist() == [0, 0, 0, 2, 1] and s is r and a.tolist() == [1, 1, 0, 2, 0]

    from meshllm.bench import planner as bench
    from meshllm.planner.strategies import plan_problem

    devs, net = bench._devices()
    base = Workload(1.0, *bench.MIXES["long-prompt"], 8)
    sw = plan_problem("splitwise", Problem(PROFILE, tuple(devs), net, base), "waiting", np.random.default_rng(0))
    w = base.with_rate(0.8 * float(sw.predicted.saturation_rps or 0.0))
    pb = Problem(PROFILE, tuple(devs), net, w)
    names = [d.name for d in devs]
    ref = np.zeros(16, dtype=np.int64)
    ref[names.index("agx-9")] = 1
    ref[names.index("rtx3090")] = ref[names.index("rtx3090-2")] = 2
    good = ga.fitness(pb, ref, np.array([2, 2] + [0] * 14, dtype=np.int64))
    for seed in (1, 2):
        got = float(ga.run(Problem(PROFILE, tuple(devs), net, w), np.random.default_rng(seed)).fitness[0])
        assert got <= good * 1.01, (seed, got, good)
