"""E2LLM's genetic algorithm: group devices into full-model replicas with roles.

Encoding (one individual, M devices, up to K = M replica slots):

- ``assign`` (M,) int: 0 = device left out, k >= 1 = device in replica slot k
- ``roles`` (K,) int: role of slot k+1 (0 PREFILL, 1 DECODER, 2 BOTH); unused slots ignored

Inside a replica the devices run in a canonical order (:func:`chain_order`: the source first,
then along the fastest links) and the bottleneck DP splits the blocks (:meth:`Problem.split`). Fitness is the queueing estimate of
:mod:`meshllm.planner.queueing` (lower is better): predicted mean waiting time, penalised when a
replica does not fit or the plan saturates. Individuals are normalised (slots relabelled in order
of first appearance) so equal groupings compare equal.

Operators respect the encoding: group-preserving crossover (a child keeps whole replicas of one
parent, the rest of its devices grouped as in the other), and mutations that move a device,
swap two devices, flip a role, merge two replicas or split one. Selection is by tournament with
elitism. The island model (:func:`evolve`, :func:`merge`) is pure: same island and generator
state, same result.

It is memetic: :func:`run` seeds the population with heuristic shapes (:func:`_seeds`),
races the best shapes with an iterated local search (:func:`search` over :func:`climb`'s
single moves, budgets counted in looks, not seconds), restarts it from re-deals of the
winner (:func:`redeal`), ends the best's climb with pairs of device moves
(:func:`_pair_step`) and lets the islands recombine around the best. ``docs/planner.md`` has the method and the measured figures.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from meshllm.planner.problem import Problem
from meshllm.planner.queueing import INFEASIBLE, Estimate, ReplicaPerf, estimate
from meshllm.planner.types import Predicted, Role

ROLES = (Role.PREFILL, Role.DECODER, Role.BOTH)


@dataclass(frozen=True, slots=True)
class GAConfig:
    """GA knobs (defaults tuned for <= 16 devices within the planner benchmark's budget)."""

    population: int = 40
    elite: int = 4
    tournament: int = 3
    crossover: float = 0.7
    mutation: float = 0.9
    extra_mutation: float = 0.0
    immigrants: int = 0
    migrants: int = 2


@dataclass(frozen=True, slots=True, eq=False)
class Island:
    """A population: ``assign`` (P, M), ``roles`` (P, M), ``fitness`` (P,), best first."""

    problem: Problem
    assign: np.ndarray
    roles: np.ndarray
    fitness: np.ndarray
    config: GAConfig = GAConfig()
    generation: int = 0

    @property
    def best(self) -> tuple[np.ndarray, np.ndarray, float]:
        return self.assign[0], self.roles[0], float(self.fitness[0])


# --- decoding an individual ------------------------------------------------------------------

def chain_order(problem: Problem, members: Sequence[int], source: int | None) -> tuple[int, ...]:
    """The canonical pipeline order of a replica's devices: the source (else the lowest index)
    first, then repeatedly the remaining device with the fastest link from the last one (ties
    by index). On a uniform network this is testbed order; on a mixed one it keeps the
    activations on the fast links. A pure function of the set, so equal groupings decode
    equally."""
    rest = sorted(members)
    key = ("chain", tuple(rest))
    hit = problem._cache.get(key)
    if hit is not None:
        return hit
    first = source if source in rest else rest[0]
    order = [first]
    rest.remove(first)
    while rest:
        last = order[-1]
        nxt = min(rest, key=lambda j: (-problem.bw[last, j], j))
        order.append(nxt)
        rest.remove(nxt)
    problem._cache[key] = tuple(order)
    return tuple(order)


def groups_of(problem: Problem, assign: np.ndarray, roles: np.ndarray) -> list[tuple[Role, tuple[int, ...]]]:
    """The replicas an individual encodes: (role, members in canonical order), sorted."""
    src = problem.source
    out: dict[int, list[int]] = {}
    for j, k in enumerate(assign.tolist()):
        if k > 0:
            out.setdefault(k, []).append(j)
    rl = roles.tolist()
    reps = [(ROLES[rl[k - 1]], chain_order(problem, members, src)) for k, members in out.items()]
    reps.sort(key=lambda r: (r[1], r[0].value))
    return reps


def decode(problem: Problem, assign: np.ndarray, roles: np.ndarray) -> tuple[Estimate, list[tuple[Role, tuple]]]:
    """Estimate of an individual (with its predicted figures) and its replicas as (role, stages
    by device index). Infeasible replicas are reported with empty stages."""
    est, stages = _evaluate(problem, assign, roles)
    if est.fitness < INFEASIBLE:
        est = problem.estimate_stages(stages)  # the same fitness, with the headline figures
    return est, stages


def _evaluate(problem: Problem, assign: np.ndarray, roles: np.ndarray) -> tuple[Estimate, list[tuple[Role, tuple]]]:
    """:func:`decode` as the search needs it, memoised: the fitness and the worst utilisation
    (no headline figures) and the replicas' stages."""
    raw = ("raw", assign.tobytes(), roles[: int(assign.max())].tobytes())
    hit = problem._cache.get(raw)
    if hit is not None:
        return hit
    reps = groups_of(problem, assign, roles)
    key = ("ind", tuple(reps))
    hit = problem._cache.get(key)
    if hit is not None:
        problem._cache[raw] = hit
        return hit
    perfs: list[ReplicaPerf] = []
    stages: list[tuple[Role, tuple]] = []
    bad = 0
    for role, members in reps:
        r = problem.replica_perf(members, role)
        if r is None:
            bad += 1
            stages.append((role, ()))
        else:
            perfs.append(r[0])
            stages.append((role, r[1]))
    if bad or not reps:
        # graded: fewer unfit replicas is better, so the search can climb out
        est = Estimate(INFEASIBLE * (1 + bad + (not reps)), Predicted(), math.inf)
    else:
        # the estimate reads only prefill -> decoder hand-offs (none in all-BOTH plans), each
        # memoised per pair of replicas
        kv = np.zeros((len(stages), len(stages)))
        pre = [i for i, (role, _) in enumerate(reps) if role == Role.PREFILL]
        if pre:
            dec = [i for i, (role, _) in enumerate(reps) if role == Role.DECODER]
            for i in pre:
                for j in dec:
                    kv[i, j] = problem.kv_pair(stages[i][1], stages[j][1])
        # the search needs the fitness only: the headline figures are the plan's, computed
        # once for the answer (``Problem.estimate_stages``)
        est = estimate(perfs, problem.workload, kv, figures=False)
    problem._cache[key] = problem._cache[raw] = (est, stages)
    return est, stages


def fitness(problem: Problem, assign: np.ndarray, roles: np.ndarray) -> float:
    """Lower is better; see :func:`meshllm.planner.queueing.estimate`."""
    return _evaluate(problem, assign, roles)[0].fitness


def normalise(assign: np.ndarray, roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel replica slots in order of first appearance (roles follow their slots)."""
    m = len(assign)
    new_a = np.zeros(m, dtype=np.int64)
    new_r = np.zeros(m, dtype=np.int64)
    mapping: dict[int, int] = {}
    for j, k in enumerate(assign.tolist()):
        if k > 0:
            if k not in mapping:
                mapping[k] = len(mapping) + 1
                new_r[mapping[k] - 1] = roles[k - 1]
            new_a[j] = mapping[k]
    return new_a, new_r


# --- initial population -------------------------------------------------------------------

def _fill(problem: Problem, order: Sequence[int], need: float) -> list[list[int]]:
    """Greedy groups in ``order`` whose memory reaches ``need``; leftovers join the last."""
    groups: list[list[int]] = []
    cur: list[int] = []
    acc = 0.0
    for j in order:
        cur.append(j)
        acc += problem.mem[j]
        if acc >= need:
            groups.append(cur)
            cur, acc = [], 0.0
    if groups and cur:
        groups[-1].extend(cur)
    return groups


def _balanced(problem: Problem, devices: Sequence[int], k: int) -> list[list[int]]:
    """``devices`` dealt into ``k`` groups with memory as even as it gets: each device, largest
    memory first (then fastest), joins the group with the least memory so far."""
    speed = problem.pre_mean.sum(axis=1)
    groups: list[list[int]] = [[] for _ in range(k)]
    load = [0.0] * k
    for j in sorted(devices, key=lambda j: (-problem.mem[j], speed[j], j)):
        g = min(range(k), key=lambda i: (load[i], len(groups[i]), i))
        groups[g].append(j)
        load[g] += float(problem.mem[j])
    return [g for g in groups if g]


def _encode(m: int, groups: Sequence[Sequence[int]], roles: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(m, dtype=np.int64)
    r = np.zeros(m, dtype=np.int64)
    for slot, (g, role) in enumerate(zip(groups, roles, strict=True)):
        a[list(g)] = slot + 1
        r[slot] = role
    return normalise(a, r)


def _seeds(problem: Problem) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic starting points: everything in one BOTH replica; memory-filled replicas
    (all BOTH, or compute-rich groups prefilling and the others decoding); the
    highest-bandwidth devices as one decoder with the rest prefilling; devices that hold the
    model alone as their own replicas with the rest memory-filled."""
    m = len(problem.devices)
    out = [_encode(m, [list(range(m))], [2])]
    need = problem.profile.total_weight_bytes * 1.15
    by_mem = sorted(range(m), key=lambda j: -problem.mem[j])
    groups = _fill(problem, by_mem, need)
    if groups:
        ratio = [sum(problem.devices[j].flops for j in g) / sum(problem.devices[j].mem_bw for j in g)
                 for g in groups]
        groups = [groups[i] for i in np.argsort(-np.array(ratio), kind="stable")]
        out.append(_encode(m, groups, [2] * len(groups)))
        if len(groups) > 1:
            n_p = max(1, len(groups) // 3)
            out.append(_encode(m, groups, [0] * n_p + [1] * (len(groups) - n_p)))
    # the highest-bandwidth devices as one decoder, the rest as prefill (or BOTH) replicas
    by_bw = sorted(range(m), key=lambda j: (-problem.devices[j].mem_bw, j))
    dec = _fill(problem, by_bw, need)
    if dec:
        d0 = dec[0]
        rest = _fill(problem, [j for j in by_mem if j not in d0], need)
        if rest:
            out.append(_encode(m, [d0, *rest], [1] + [0] * len(rest)))
            out.append(_encode(m, [d0, *rest], [2] * (len(rest) + 1)))
    # every replica count: all devices dealt into k memory-balanced BOTH replicas, and the
    # bandwidth-rich decoder with the rest dealt into k prefill replicas (the shapes the
    # optimum takes on meshes of like devices; the search then trades single devices)
    total = float(problem.mem.sum())
    for k in range(2, min(m, int(total // need)) + 1):
        groups = _balanced(problem, range(m), k)
        out.append(_encode(m, groups, [2] * k))
    if dec:
        rest_all = [j for j in range(m) if j not in dec[0]]
        room = float(problem.mem[rest_all].sum()) if rest_all else 0.0
        for k in range(1, min(len(rest_all), int(room // need)) + 1):
            groups = _balanced(problem, rest_all, k)
            out.append(_encode(m, [dec[0], *groups], [1] + [0] * k))
    singles = [[j] for j in range(m) if problem.mem[j] >= need]
    if singles:
        rest = _fill(problem, [j for j in by_mem if problem.mem[j] < need], need)
        out.append(_encode(m, singles + rest, [2] * (len(singles) + len(rest))))
        if rest:
            out.append(_encode(m, singles + rest, [1] * len(singles) + [0] * len(rest)))
    return out


def _random_individual(m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(1, max(1, m // 2) + 1))
    a = rng.integers(1, k + 1, size=m)
    drop = rng.random(m) < 0.1
    a[drop] = 0
    r = rng.integers(0, 3, size=m)
    return normalise(a, r)


def initial_island(problem: Problem, rng: np.random.Generator, config: GAConfig = GAConfig()) -> Island:
    """A population of seeds plus random individuals, evaluated and sorted best first."""
    m = len(problem.devices)
    seen: set[tuple[bytes, bytes]] = set()
    inds: list[tuple[np.ndarray, np.ndarray]] = []
    for ind in _seeds(problem):
        if _key(*ind) not in seen:
            seen.add(_key(*ind))
            inds.append(ind)
    if len(inds) > config.population:  # more seeds than room: the best of them
        inds = [inds[i] for i in np.argsort([fitness(problem, a, r) for a, r in inds], kind="stable")]
        inds = inds[:config.population]
    while len(inds) < config.population:
        inds.append(_random_individual(m, rng))
    return _make_island(problem, inds, config, 0)


def _make_island(problem: Problem, inds: Sequence[tuple[np.ndarray, np.ndarray]], config: GAConfig,
                 generation: int) -> Island:
    fit = np.array([fitness(problem, a, r) for a, r in inds])
    order = np.argsort(fit, kind="stable")
    return Island(problem, np.stack([inds[i][0] for i in order]), np.stack([inds[i][1] for i in order]),
                  fit[order], config, generation)


# --- operators -----------------------------------------------------------------------------

def crossover(pa: tuple[np.ndarray, np.ndarray], pb: tuple[np.ndarray, np.ndarray],
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Group-preserving: keep a random subset of A's replicas whole, group the other devices as
    B does (B's replicas restricted to those devices, with B's roles)."""
    a, ra = pa
    b, rb = pb
    m = len(a)
    slots_a = sorted(set(a.tolist()) - {0})
    keep = {k for k in slots_a if rng.random() < 0.5}
    child = np.zeros(m, dtype=np.int64)
    roles = np.zeros(m, dtype=np.int64)
    nxt = 1
    for k in sorted(keep):
        child[a == k] = nxt
        roles[nxt - 1] = ra[k - 1]
        nxt += 1
    free = np.array([k not in keep for k in a.tolist()], dtype=bool)
    relabel: dict[int, int] = {}
    for j in np.nonzero(free)[0]:
        kb = int(b[j])
        if kb == 0:
            continue
        if kb not in relabel:
            relabel[kb] = nxt
            roles[nxt - 1] = rb[kb - 1]
            nxt += 1
        child[j] = relabel[kb]
    return normalise(child, roles)


def mutate(ind: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of: move a device (to another replica, a new one, or out), swap two devices'
    replicas, flip a replica's role, make two replicas a prefill/decoder pair, merge two
    replicas, retire a replica (its devices left out), split a replica in two."""
    a, r = ind[0].copy(), ind[1].copy()
    m = len(a)
    used = sorted(set(a.tolist()) - {0})
    nxt = (max(used) if used else 0) + 1
    op = int(rng.integers(0, 7))
    if op == 6 and len(used) >= 2:
        # a prefill/decoder pair in one step: either role alone is infeasible, so single role
        # flips cannot cross from all-BOTH plans to phase-split ones
        k1, k2 = rng.choice(used, size=2, replace=False)
        r[k1 - 1], r[k2 - 1] = 0, 1
    elif op == 0 or op == 6 or not used:
        j = int(rng.integers(0, m))
        choice = int(rng.integers(0, len(used) + 2))
        if choice < len(used):
            a[j] = used[choice]
        elif choice == len(used) and nxt <= m:
            a[j] = nxt
            r[nxt - 1] = int(rng.integers(0, 3))
        else:
            a[j] = 0
    elif op == 1:
        i, j = rng.integers(0, m, size=2)
        a[i], a[j] = a[j], a[i]
    elif op == 2:
        k = used[int(rng.integers(0, len(used)))]
        r[k - 1] = (r[k - 1] + int(rng.integers(1, 3))) % 3
    elif op == 3 and len(used) >= 2:
        k1, k2 = rng.choice(used, size=2, replace=False)
        a[a == k2] = k1
    elif op == 4 and len(used) >= 2:
        a[a == used[int(rng.integers(0, len(used)))]] = 0  # retire a whole replica
    else:
        k = used[int(rng.integers(0, len(used)))]
        members = np.nonzero(a == k)[0]
        if len(members) >= 2 and nxt <= m:
            moved = members[rng.random(len(members)) < 0.5]
            if 0 < len(moved) < len(members):
                a[moved] = nxt
                r[nxt - 1] = int(rng.integers(0, 3))
    return normalise(a, r)


def _tournament(island: Island, rng: np.random.Generator) -> int:
    idx = rng.integers(0, len(island.fitness), size=island.config.tournament)
    return int(idx.min())  # the population is sorted best first


def _key(a: np.ndarray, r: np.ndarray) -> tuple[bytes, bytes]:
    return a.tobytes(), r[: int(a.max())].tobytes()


def evolve(island: Island, generations: int, rng: np.random.Generator) -> Island:
    """Run ``generations`` generations: ``population - elite`` children by tournament,
    crossover and mutation, then the best ``population`` distinct individuals of parents and
    children survive ((mu + lambda) selection: elitist, and a good individual stays until better
    ones displace it). Pure: the result depends only on the island and the generator's state."""
    cfg = island.config
    problem = island.problem
    m = island.assign.shape[1]
    for _ in range(generations):
        parents = [(island.assign[i], island.roles[i]) for i in range(len(island.fitness))]
        seen = {_key(a, r) for a, r in parents}
        children: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(cfg.immigrants):  # fresh random blood
            child = _random_individual(m, rng)
            if _key(*child) not in seen:
                seen.add(_key(*child))
                children.append(child)
        want = max(cfg.population - cfg.elite, 1)
        tries = 0
        while len(children) < want and tries < want * 20:
            tries += 1
            pa = _tournament(island, rng)
            child = (island.assign[pa], island.roles[pa])
            if rng.random() < cfg.crossover:
                pb = _tournament(island, rng)
                child = crossover(child, (island.assign[pb], island.roles[pb]), rng)
            if rng.random() < cfg.mutation:
                child = mutate(child, rng)
                while rng.random() < cfg.extra_mutation:  # occasional bigger jumps
                    child = mutate(child, rng)
            k = _key(*child)
            if k in seen:
                continue  # keep the population diverse: no duplicate groupings
            seen.add(k)
            children.append(child)
        pool = _make_island(problem, parents + children, cfg, island.generation + 1)
        n = min(cfg.population, len(pool.fitness))
        island = Island(problem, pool.assign[:n], pool.roles[:n], pool.fitness[:n], cfg, pool.generation)
    return island


def merge(islands: Sequence[Island]) -> list[Island]:
    """Ring migration: each island's worst ``migrants`` are replaced by the previous island's
    best. With one island this returns it unchanged. Pure."""
    if len(islands) <= 1:
        return list(islands)
    out = []
    for i, isl in enumerate(islands):
        prev = islands[i - 1]
        k = min(isl.config.migrants, len(prev.fitness), len(isl.fitness))
        a = np.concatenate([isl.assign[: len(isl.fitness) - k], prev.assign[:k]])
        r = np.concatenate([isl.roles[: len(isl.fitness) - k], prev.roles[:k]])
        f = np.concatenate([isl.fitness[: len(isl.fitness) - k], prev.fitness[:k]])
        order = np.argsort(f, kind="stable")
        out.append(Island(isl.problem, a[order], r[order], f[order], isl.config, isl.generation))
    return out


def _moves(a: np.ndarray, r: np.ndarray, focus: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """Every single move from an individual, as ``(kind, x, y)``: 0 device x to replica y (0:
    out); 1 device x to a new replica of role y; 2 devices x and y (of different replicas, or
    one left out) swapped; 3 replica x to role y; 4 replicas x and y made a prefill/decoder
    pair; 5 replica x replaced by device y, left out until then, alone (x's devices left out).
    With ``focus``, only the device moves and swaps that involve a device in it (no
    replacements). Descriptors, not copies: a first-improvement climb builds only the ones it
    tries."""
    m = len(a)
    hot = [True] * m
    if focus is not None:
        fs = set(focus)
        hot = [j in fs for j in range(m)]
    al = a.tolist()
    used = sorted(set(al) - {0})
    room = (max(used) if used else 0) + 1 <= m
    out: list[tuple[int, int, int]] = []
    for j in range(m):
        if not hot[j]:
            continue
        out.extend((0, j, k) for k in [0, *used] if k != al[j])
        if room:
            out.extend((1, j, role) for role in range(3))
    out.extend((2, i, j) for i in range(m) for j in range(i + 1, m) if al[i] != al[j] and (hot[i] or hot[j]))
    out.extend((3, k, role) for k in used for role in range(3) if role != r[k - 1])
    # one flip alone cannot leave an all-BOTH plan for a phase-split one
    out.extend((4, k1, k2) for k1 in used for k2 in used if k1 != k2 and (r[k1 - 1], r[k2 - 1]) != (0, 1))
    if focus is None:
        # a whole replica traded for one device that holds the model alone: three or more
        # single moves, each worse on its own (long prompts: two RTX 3090s and one Jetson
        # AGX as BOTH replicas, where a climb ended at each 3090 with an Orin NX in front)
        out.extend((5, k, j) for k in used for j in range(m) if al[j] == 0)
    return out


def _apply(a: np.ndarray, r: np.ndarray, move: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The individual :func:`_moves`' ``move`` leads to (not normalised)."""
    kind, x, y = move
    if kind == 0:
        b = a.copy()
        b[x] = y
        return b, r
    if kind == 1:
        b, s = a.copy(), r.copy()
        nxt = int(a.max()) + 1
        b[x] = nxt
        s[nxt - 1] = y
        return b, s
    if kind == 2:
        b = a.copy()
        b[x], b[y] = a[y], a[x]
        return b, r
    if kind == 5:
        b = a.copy()
        b[a == x] = 0
        b[y] = x
        return b, r
    s = r.copy()
    if kind == 3:
        s[x - 1] = y
    else:
        s[x - 1], s[y - 1] = 0, 1
    return a, s


def _neighbours(a: np.ndarray, r: np.ndarray, focus: Sequence[int] | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every single move from an individual (:func:`_moves`), built. Not normalised."""
    return [_apply(a, r, mv) for mv in _moves(a, r, focus)]


REVISIT = 0.1  # a look at an individual the search has already evaluated: a memo hit, about a tenth
FULL_ONLY = False
PAIRS = 25  # the least-worsening device moves a finished climb tries two at a time (:func:`climb`)


def climb(problem: Problem, assign: np.ndarray, roles: np.ndarray, rng: np.random.Generator,
          max_evals: float = 100_000, focus: Sequence[int] | None = None,
          seen: set[tuple[bytes, bytes]] | None = None, pairs: int = 0
          ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """First-improvement hill climbing over :func:`_moves` in random order (``rng``): take the
    first move that lowers the fitness, until none does (a local optimum) or ``max_evals`` is
    spent. With ``pairs`` = K > 0, a local optimum is not yet the end: the K single moves that
    worsen it least (their fitness is known from the last scan) are tried two at a time, and
    the best pair that improves on it is taken and the climb goes on (:func:`_pair_step`).
    A look costs 1, or :data:`REVISIT` when the individual is in ``seen`` (which the
    climb adds to): on small meshes most looks are revisits, so the same budget searches them
    far longer for about the same CPU time. Returns the individual, its fitness and the budget
    spent. Pure: same inputs, ``seen`` and generator state, same result."""
    seen = set() if seen is None else seen
    a, r = normalise(assign, roles)
    f = fitness(problem, a, r)
    spent = 0.0
    while spent < max_evals:
        nb = _moves(a, r, focus)
        tried: list[tuple[float, int]] = []
        for i in rng.permutation(len(nb)).tolist():
            b, s = normalise(*_apply(a, r, nb[i]))
            spent += _look(b, s, seen)
            g = fitness(problem, b, s)
            if g < f * (1 - 1e-12):
                a, r, f = b, s, g
                break
            tried.append((g, i))
            if spent >= max_evals:
                return a, r, f, spent
        else:
            if pairs <= 0:
                break
            moves = [nb[i] for _, i in sorted(tried) if nb[i][0] <= 2][:pairs]  # device moves only
            got = _pair_step(problem, a, r, f, moves, seen)
            spent += got[3]
            if got[2] >= f * (1 - 1e-12):
                break
            a, r, f = got[0], got[1], got[2]
    return a, r, f, spent


def _look(b: np.ndarray, s: np.ndarray, seen: set[tuple[bytes, bytes]]) -> float:
    """What a look at ``(b, s)`` costs the search's budget: 1 the first time, :data:`REVISIT`
    after (``seen`` records it)."""
    k = _key(b, s)
    if k in seen:
        return REVISIT
    seen.add(k)
    return 1.0


def _pair_step(problem: Problem, a: np.ndarray, r: np.ndarray, f: float, best: Sequence[tuple[int, int, int]],
               seen: set[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Every pair of the moves ``best`` (the single moves that worsen a local optimum least)
    applied together: the best result, its fitness and the looks spent. Neither move of a
    pair improves alone, but together they can — on the chat mix a device brought in from
    outside and another swapped out, which lets a replica change its size and its members
    at once (the layer split, hence the KV hand-off, changes with both)."""
    top = (a, r, f)
    spent = 0.0
    al = a.tolist()
    new = int(a.max()) + 1
    # the groups each move touches (0: the devices left out; ``new``: a replica it opens)
    touch = [{al[x], y} if kind == 0 else {al[x], new} if kind == 1 else {al[x], al[y]}
             for kind, x, y in best]
    for x in range(len(best)):
        b1, s1 = _apply(a, r, best[x])
        for y in range(x + 1, len(best)):
            if not touch[x] & touch[y]:
                continue  # moves in different groups: their effects about add up, both worsen
            if best[y][0] == 1 and int(b1.max()) >= len(b1):
                continue  # no slot left for a second new replica
            b, s = normalise(*_apply(b1, s1, best[y]))
            spent += _look(b, s, seen)
            g = fitness(problem, b, s)
            if g < top[2] * (1 - 1e-12):
                top = (b, s, g)
    return top[0], top[1], top[2], spent


def _kick(a: np.ndarray, r: np.ndarray, rng: np.random.Generator, swaps: int = 2
          ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A perturbation for iterated local search: ``swaps`` random steps, each a swap of two
    devices, a device moved to another replica or out, or a replica's role changed. Also
    returns the devices it moved (and the members of a replica whose role it changed): the
    climb after it tries only their moves, so a kick costs tens of looks, not a full scan."""
    b = a.copy()
    m = len(b)
    moved: set[int] = set()
    roled: set[int] = set()
    s = r.copy()
    used = sorted(set(b.tolist()) - {0})
    for _ in range(swaps):
        i, j = (int(x) for x in rng.integers(0, m, size=2))
        op = int(rng.integers(0, 3)) if used else 0
        if op == 0:
            b[i], b[j] = b[j], b[i]
            moved |= {i, j}
        elif op == 1:  # a device to another replica or out: sizes change too
            b[i] = [0, *used][int(rng.integers(0, len(used) + 1))]
            moved.add(i)
        elif len(used) >= 2 and rng.random() < 0.5:
            # two replicas made a prefill/decoder pair: the way from all-BOTH plans to
            # phase-split ones (either role alone is infeasible, so one flip never gets there)
            k1, k2 = (int(x) for x in rng.choice(used, size=2, replace=False))
            s[k1 - 1], s[k2 - 1] = 0, 1
            roled |= {k1, k2}
        else:  # a replica's role
            k = used[int(rng.integers(0, len(used)))]
            s[k - 1] = (s[k - 1] + int(rng.integers(1, 3))) % 3
            roled.add(k)
    focus = sorted(moved | {j for j in range(m) if int(b[j]) in roled})
    b, s = normalise(b, s)
    return b, s, focus


def redeal(assign: np.ndarray, roles: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same shape dealt afresh: for each role, the devices of that role's replicas shuffled
    at random among those replicas' places. Replica count, sizes and roles stay, and so do the
    left-out devices; only which device sits in which replica changes. A restart of the local
    search from here lands in another basin of the same shape (normalised; pure)."""
    a = assign.copy()
    k = int(assign.max())
    for role in sorted({int(x) for x in roles[:k].tolist()}):
        slots = [x for x in range(1, k + 1) if int(roles[x - 1]) == role]
        places = np.nonzero(np.isin(assign, slots))[0]
        a[places] = assign[places][rng.permutation(len(places))]
    return normalise(a, roles)


def search(problem: Problem, assign: np.ndarray, roles: np.ndarray, rng: np.random.Generator,
           max_evals: float, swaps: int = 2, polish: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Iterated local search: :func:`climb`, then repeatedly kick the best local optimum
    (:func:`_kick`), climb again over the moves of the devices the kick moved, and keep the
    better, until ``max_evals`` is spent (looks at new individuals count 1, revisits a tenth);
    a last full climb makes the answer a local optimum of every move. A budget in looks, not
    seconds, keeps it pure."""
    seen: set[tuple[bytes, bytes]] = set()
    a, r, f, used = climb(problem, assign, roles, rng, max_evals, seen=seen)
    while used < max_evals:
        b, s, focus = _kick(a, r, rng, swaps)
        b, s, g, n = climb(problem, b, s, rng, max_evals - used, focus, seen)
        used += n + REVISIT
        if g < f * (1 - 1e-12):
            a, r, f = b, s, g
    if polish:
        a, r, f, _ = climb(problem, a, r, rng, seen=seen)
    return a, r, f


@contextmanager
def _no_gc() -> Iterator[None]:
    """Cyclic garbage collection paused for one run. The run's memo grows to tens of thousands
    of tuples and arrays (none of them in reference cycles) and every full collection walks
    them all: a quarter of the CPU time of a 16-device run. Restored on the way out."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run(problem: Problem, rng: np.random.Generator, generations: int = 100, islands: int = 1,
        epoch_len: int = 5, patience: int = 5, config: GAConfig = GAConfig(),
        search_evals: int = 2900, race: int = 3, race_evals: int = 500, restarts: int = 2,
        restart_evals: int = 550, pairs: int = PAIRS) -> Island:
    """The planner's search end to end (a memetic GA):

    1. ``islands`` islands of seeds and random individuals (:func:`initial_island`);
    2. a race between shapes: an iterated local search (:func:`search`) of ``race_evals``
       looks from each of the best ``race`` individuals of distinct shapes (replica count and
       roles); then ``restarts`` searches of ``restart_evals`` looks from the winner with its
       devices re-dealt among its replicas of the same role (:func:`redeal`), and the rest of
       ``search_evals`` from the winner itself; the best of these, climbed to a local optimum
       of single moves and of pairs of the ``pairs`` least-worsening device moves
       (:func:`climb`), goes into every island (elitism keeps it). The replica count is what a local search
       changes least easily, and the best seed's count is not always the best one; within a
       shape, the first climb decides the basin, and a few short searches from other deals
       find a good one more often than one long search;
    3. the islands evolve ``epoch_len`` generations between migrations, stopping after
       ``generations`` or when the best has not improved for ``patience`` generations — they
       explore other shapes (the search moves devices, the GA also recombines groups);
    4. if the GA improved on the search, the same climb from its best.

    Returns the island holding the overall best, best first. Pure."""
    with _no_gc():
        isl = [initial_island(problem, rng, config) for _ in range(islands)]
        top = min(isl, key=lambda x: float(x.fitness[0]))
        if search_evals > 0:
            a, r = top.assign[0], top.roles[0]
            budget = float(search_evals)
            if race > 1:
                tried = []
                for i in _distinct_shapes(top, race):
                    b, s, g = search(problem, top.assign[i], top.roles[i], rng, race_evals, polish=False)
                    budget -= race_evals
                    tried.append((g, i, b, s))
                _, _, a, r = min(tried, key=lambda t: (t[0], t[1]))
            others = []
            for _ in range(restarts):
                if budget < restart_evals:
                    break
                b, s = redeal(a, r, rng)
                others.append(search(problem, b, s, rng, restart_evals, polish=False))
                budget -= restart_evals
            a, r, f = search(problem, a, r, rng, max(budget, 0.0), polish=False)
            for b, s, g in others:
                if g < f * (1 - 1e-12):
                    a, r, f = b, s, g
            a, r, f, _ = climb(problem, a, r, rng, pairs=pairs)
            isl = [_with_best(x, a, r, f) for x in isl]
        best, stale, done = float(min(x.fitness[0] for x in isl)), 0, 0
        start = best
        while done < generations and stale < patience:
            step = min(epoch_len, generations - done)
            isl = [evolve(x, step, rng) for x in isl]
            isl = merge(isl)
            done += step
            cur = min(float(x.fitness[0]) for x in isl)
            if cur < best * (1 - 1e-9):
                best, stale = cur, 0
            else:
                stale += step
        top = min(isl, key=lambda x: float(x.fitness[0]))
        if search_evals > 0 and best < start * (1 - 1e-9):
            a, r, f, _ = climb(problem, top.assign[0], top.roles[0], rng, pairs=pairs)
            top = _with_best(top, a, r, f)
        return top


def _distinct_shapes(isl: Island, n: int) -> list[int]:
    """Indices of the best individuals with distinct shapes (replica count and roles)."""
    out: list[int] = []
    shapes: set[tuple[int, ...]] = set()
    for i in range(len(isl.fitness)):
        k = int(isl.assign[i].max())
        shape = (*sorted(int(x) for x in isl.roles[i][:k]), k)
        if shape not in shapes:
            shapes.add(shape)
            out.append(i)
            if len(out) == n:
                break
    return out


def _with_best(isl: Island, a: np.ndarray, r: np.ndarray, f: float) -> Island:
    """The island with ``(a, r)`` at its head when it beats the island's best (its worst
    individual makes room); else unchanged."""
    if not f < isl.fitness[0]:
        return isl
    return Island(isl.problem, np.concatenate([a[None], isl.assign[:-1]]),
                  np.concatenate([r[None], isl.roles[:-1]]),
                  np.concatenate([[f], isl.fitness[:-1]]), isl.config, isl.generation)


def _set_partitions(m: int):
    """Restricted growth strings: every partition of range(m) once, labels 0..k-1."""
    a = [0] * m

    def rec(i: int, k: int):
        if i == m:
            yield list(a), k
            return
        for lab in range(k + 1):
            a[i] = lab
            yield from rec(i + 1, max(k, lab + 1))

    if m == 0:
        return
    yield from rec(0, 0)


def exhaustive(problem: Problem) -> tuple[float, np.ndarray, np.ndarray]:
    """The exact optimum of the GA's fitness by enumeration: every grouping of the devices
    (one group may be left out) and every role per replica. Feasible up to ~6 devices."""
    import itertools

    m = len(problem.devices)
    best = (math.inf, np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64))
    for labels, k in _set_partitions(m):
        lab = np.array(labels)
        for out in [None, *range(k)]:
            live = [g for g in range(k) if g != out]
            if not live:
                continue
            slot = {g: i + 1 for i, g in enumerate(live)}
            a = np.array([0 if g == out else slot[g] for g in lab.tolist()], dtype=np.int64)
            for rs in itertools.product(range(3), repeat=len(live)):
                r = np.zeros(m, dtype=np.int64)
                r[: len(live)] = rs
                f = fitness(problem, a, r)
                if f < best[0]:
                    best = (f, a, r)
    return best
