"""Every placement strategy under one interface, and the registry ``make_plan`` dispatches on.

=====================  ==============================================================
``edge-solo``          the whole model on the source device (EdgeShard baseline)
``cloud-edge-even``    source + the fastest other device ("cloud"), decoder layers split in half
``cloud-edge-opt``     source + cloud, split by Algorithm 1 (latency) or 2 (throughput)
``edgeshard-latency``  Algorithm 1 over all devices, source constraint
``edgeshard-throughput``  Algorithm 2 over all devices (heuristic beyond 12), batch sized
``edgeshard-even``     the devices Algorithm 2 selects, blocks split evenly (EdgeShard-Even)
``splitwise``          phase-split pools assuming identical machines (see :func:`splitwise`)
``ring``               all devices in testbed order, blocks proportional to memory (exo)
``e2llm``              the GA: replicas, roles and DP splits (:mod:`meshllm.planner.ga`)
=====================  ==============================================================

Every strategy returns a :class:`Plan` whose predicted figures come from the same queueing
estimate, so plans compare on equal terms; a model that fits nowhere raises
:class:`DoesNotFit` (Table IV's OOM cells).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.errors import DoesNotFit, PlanError
from meshllm.planner import cost, ga, queueing
from meshllm.planner.cost import TOKEN_BYTES, ModelProfile
from meshllm.planner.dp import Partition, edgeshard_throughput, even_split, proportional_split
from meshllm.planner.latency import MAX_EXACT, LatencyPlacement, place_latency
from meshllm.planner.problem import Problem
from meshllm.planner.types import Device, Network, Plan, Role, Workload
from meshllm.planner.validate import validate_plan

OBJECTIVES = ("latency", "throughput", "waiting")
Stages = list[tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class Placed:
    """A strategy's replicas with a note on how they were found (printed with the plan)."""

    replicas: list[tuple[Role, Stages]]
    note: str = ""


StrategyFn = Callable[[Problem, str, np.random.Generator], "list[tuple[Role, Stages]] | Placed"]


# --- EdgeShard inputs ---------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def _latency_inputs(pb: Problem):
    """Alg. 1's unit of work: one generated token, its share of the prompt included."""
    w = pb.workload
    t_in, t_out = w.input_len.mean, max(w.output_len.mean, 1.0)
    comp = cost.per_token_table(pb.profile, pb.devices, w, 1, pb.eff)
    out = pb.profile.act * (t_in + t_out - 1) / t_out
    return comp, out, pb.req(w.target_len)


def _throughput_inputs(pb: Problem, batch: int):
    """Alg. 2's unit of work: one step of a ``batch``-sequence batch, prompts amortised."""
    w = pb.workload
    t_in, t_out = w.input_len.mean, max(w.output_len.mean, 1.0)
    comp = (batch * pb.pre_mean + (t_out - 1) * pb.dec[batch]) / t_out
    out = pb.profile.act * batch * (t_in + t_out - 1) / t_out
    return comp, out, pb.req(batch * w.target_len)


def _source(pb: Problem) -> int:
    s = pb.source
    return 0 if s is None else s


def _cloud(pb: Problem) -> int:
    src = _source(pb)
    others = [j for j in range(len(pb.devices)) if j != src]
    if not others:
        raise DoesNotFit("cloud-edge: does not fit: it needs a second device besides the source")
    return max(others, key=lambda j: (pb.devices[j].flops, pb.devices[j].mem_bw, -j))


def _sub(pb: Problem, idx: Sequence[int]):
    ix = np.array(idx)
    return ix, pb.bw[np.ix_(ix, ix)], pb.rtt[np.ix_(ix, ix)], pb.mem[ix]


def _alg1(pb: Problem, idx: Sequence[int], source_pos: int | None) -> tuple[Partition, LatencyPlacement]:
    """Minimum latency on the devices ``idx`` with each device's memory summed over all of its
    runs (:func:`meshllm.planner.latency.place_latency`: Algorithm 1 when its chain fits,
    else branch and bound; a stated heuristic above ``MAX_EXACT`` devices)."""
    comp, out, req = _latency_inputs(pb)
    ix, bw, rtt, mem = _sub(pb, idx)
    p = place_latency(comp[ix], out, bw, rtt, mem, req, source_pos, TOKEN_BYTES)
    return Partition(p.value, tuple((int(ix[j]), a, b) for j, a, b in p.stages)), p


def latency_note(p: LatencyPlacement) -> str:
    """One line on how exact a latency placement is."""
    if p.exact:
        return "latency placement: exact (optimum proven" + (f"; {p.nodes} search nodes)" if p.nodes else ")")
    if p.method == "heuristic":
        return (f"latency placement: heuristic (more than {MAX_EXACT} devices: no MILP, a search of "
                f"{p.nodes} nodes); within {100 * p.gap:.2f}% of the optimum (proven bound)")
    return (f"latency placement: best found within the MILP's node limit ({p.nodes} nodes); "
            f"within {100 * p.gap:.2f}% of the optimum (proven bound)")


def _alg2(pb: Problem, idx: Sequence[int], source_pos: int | None) -> tuple[Partition, int]:
    """Algorithm 2 at the largest batch <= max_batch (halving) whose KV fits (memoised on the
    problem: ``edgeshard-throughput`` and ``edgeshard-even`` share it)."""
    key = ("alg2", tuple(int(j) for j in idx), source_pos)
    if key not in pb._cache:
        try:
            pb._cache[key] = _alg2_uncached(pb, idx, source_pos)
        except DoesNotFit as e:
            pb._cache[key] = e
    got = pb._cache[key]
    if isinstance(got, DoesNotFit):
        raise got
    return got


def _alg2_uncached(pb: Problem, idx: Sequence[int], source_pos: int | None) -> tuple[Partition, int]:
    ix, bw, rtt, mem = _sub(pb, idx)
    batch = pb.workload.max_batch
    while True:
        comp, out, req = _throughput_inputs(pb, batch)
        try:
            p = edgeshard_throughput(comp[ix], out, bw, rtt, mem, req, source_pos, TOKEN_BYTES * batch)
            return Partition(p.value, tuple((int(ix[j]), a, b) for j, a, b in p.stages)), batch
        except DoesNotFit:
            if batch == 1:
                raise
            batch = max(1, batch // 2)


def _merge_runs(stages) -> Stages:
    """Adjacent runs on one device become one stage."""
    out: Stages = []
    for j, a, b in stages:
        if out and out[-1][0] == j and out[-1][2] == a:
            out[-1] = (j, out[-1][1], b)
        else:
            out.append((j, a, b))
    return out


def _fits_one(pb: Problem, stages: Stages, what: str) -> Stages:
    need: dict[int, float] = {}
    seq = pb.workload.target_len
    for j, a, b in stages:
        need[j] = need.get(j, 0.0) + pb.profile.weight_bytes(a, b) + pb.profile.kv_bytes_per_token(a, b) * seq
    for j, nb in need.items():
        if nb > pb.mem[j]:
            raise DoesNotFit(f"{what}: does not fit: {pb.devices[j].name} would need {_gib(nb)} but has "
                             f"{_gib(pb.mem[j])}")
    return stages


# --- strategies -----------------------------------------------------------------------------

def edge_solo(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]]:
    s = _source(pb)
    return [(Role.BOTH, _fits_one(pb, [(s, 0, pb.n_blocks)], "edge-solo"))]


def cloud_edge_even(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]]:
    """EdgeShard's Cloud-Edge-Even: the decoder layers split evenly between the source and the
    cloud (the source takes the odd one), the embedding on the source where the prompt enters.
    The head follows the last decoder layer onto the cloud when it fits there (source
    [0, 1+L/2), cloud [1+L/2, L+2): one crossing of the source-cloud link per token);
    otherwise it stays on the source, where the generated token is wanted anyway (source
    [0, 1+L/2), cloud [1+L/2, 1+L), source [1+L, L+2): one replica in which the source holds
    two stages, at the price of a second crossing). Llama2-13B in fp32 is the second case."""
    s, c = _source(pb), _cloud(pb)
    n_layers = pb.n_blocks - 2
    if n_layers < 2:
        raise DoesNotFit("cloud-edge-even: does not fit: the model has fewer than two decoder layers")
    mid = 1 + (n_layers + 1) // 2
    two = [(s, 0, mid), (c, mid, pb.n_blocks)]
    try:
        return [(Role.BOTH, _fits_one(pb, two, "cloud-edge-even"))]
    except DoesNotFit:
        three = [(s, 0, mid), (c, mid, 1 + n_layers), (s, 1 + n_layers, pb.n_blocks)]
        return [(Role.BOTH, _fits_one(pb, three, "cloud-edge-even"))]


def cloud_edge_opt(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]] | Placed:
    s, c = _source(pb), _cloud(pb)
    try:
        if objective == "throughput":
            p, _ = _alg2(pb, [s, c], 0)
        else:
            p, lp = _alg1(pb, [s, c], 0)
            return Placed([(Role.BOTH, _merge_runs(p.stages))], latency_note(lp))
    except DoesNotFit:
        raise DoesNotFit("cloud-edge-opt: the model does not fit on the source and the cloud") from None
    return [(Role.BOTH, _merge_runs(p.stages))]


def edgeshard_latency_plan(pb: Problem, objective: str, rng: np.random.Generator) -> Placed:
    try:
        p, lp = _alg1(pb, range(len(pb.devices)), pb.source)
    except DoesNotFit:
        raise DoesNotFit("edgeshard-latency: the model does not fit on these devices") from None
    return Placed([(Role.BOTH, _merge_runs(p.stages))], latency_note(lp))


def edgeshard_throughput_plan(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]]:
    try:
        p, _ = _alg2(pb, range(len(pb.devices)), pb.source)
    except DoesNotFit:
        raise DoesNotFit("edgeshard-throughput: the model does not fit on these devices") from None
    return [(Role.BOTH, list(p.stages))]


def edgeshard_even(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]]:
    try:
        p, _ = _alg2(pb, range(len(pb.devices)), pb.source)
    except DoesNotFit:
        raise DoesNotFit("edgeshard-even: the model does not fit on these devices") from None
    devs = [j for j, _, _ in p.stages]
    parts = even_split(pb.n_blocks, len(devs))
    return [(Role.BOTH, _fits_one(pb, [(j, a, b) for j, (a, b) in zip(devs, parts, strict=True)],
                                  "edgeshard-even"))]


def ring(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]]:
    m = len(pb.devices)
    src = pb.source
    order = sorted(range(m), key=lambda j: (j != src, j))[: pb.n_blocks]
    parts = proportional_split(pb.n_blocks, [pb.mem[j] for j in order])
    return [(Role.BOTH, _fits_one(pb, [(j, a, b) for j, (a, b) in zip(order, parts, strict=True)], "ring"))]


def splitwise(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]]:
    """Splitwise (Patel et al., ISCA 2024) transplanted to a mesh, as faithfully as its
    assumptions allow: machines are taken as identical, so

    1. replica size n = the fewest devices of the mesh's *mean* memory that hold the weights
       plus one batch of KV; replicas are consecutive groups of n devices, the devices ordered
       by their prefill time of the whole model at the mean prompt, fastest first (leftovers,
       the slowest, idle), each split evenly by blocks; if an even split does not fit some
       group, n grows by one and grouping starts over;
    2. pool sizes by Splitwise's provisioning rule: with R identical replicas of prompt capacity
       μ_p and token capacity μ_d (requests/s; the mean over the groups), choose the number of
       prompt replicas n_p in [1, R-1] maximising the load both pools sustain,
       min(n_p μ_p, (R - n_p) μ_d); one replica serves both phases (BOTH).

    The prompt pool is the first groups: the fastest devices, as Splitwise's heterogeneous
    variant (Splitwise-HA) gives the prompt phase the stronger machines. The order was the
    source, then the devices' order in the mesh: in a live mesh that is the leader, then the
    members, so the device that prefilled changed from one mesh to the next, and with it
    whether e2llm's plan beat splitwise's (docs/experiments.md, "Time dilated").
    """
    m, nb, w = len(pb.devices), pb.n_blocks, pb.workload
    speed = pb.pre_mean.sum(axis=1)  # (M,) seconds to prefill the mean prompt through every block
    order = sorted(range(m), key=lambda j: (float(speed[j]), pb.devices[j].name))  # ties: by name
    need = pb.profile.total_weight_bytes + pb.profile.kv_bytes_per_token(0, nb) * w.max_batch * w.target_len
    n = max(1, math.ceil(need / float(pb.mem.mean())))
    groups: list[Stages] = []
    while n <= min(m, nb):
        groups = []
        for g in range(m // n):
            members = order[g * n:(g + 1) * n]
            groups.append([(j, a, b) for j, (a, b) in zip(members, even_split(nb, n), strict=True)])
        if groups and all(pb.decode_batch(st) >= 1 for st in groups):
            break
        n += 1
        groups = []
    if not groups:
        raise DoesNotFit("splitwise: does not fit: no grouping of identical-size replicas holds the model")
    r = len(groups)
    if r == 1:
        return [(Role.BOTH, groups[0])]
    pre = [pb.perf(st, Role.PREFILL) for st in groups]
    dec = [pb.perf(st, Role.DECODER) for st in groups]
    eo1 = max(w.output_len.mean - 1, 1e-9)
    mu_p = float(np.mean([1 / p.busy_mean for p in pre]))
    mu_d = float(np.mean([d.batch / (eo1 * float(d.tau[d.batch])) for d in dec]))
    n_p = max(range(1, r), key=lambda k: (min(k * mu_p, (r - k) * mu_d), -k))
    return [(Role.PREFILL if i < n_p else Role.DECODER, st) for i, st in enumerate(groups)]


def e2llm(pb: Problem, objective: str, rng: np.random.Generator) -> list[tuple[Role, Stages]] | Placed:
    best = ga.run(pb, rng)
    a, r, f = best.best
    got = None
    if f < ga.INFEASIBLE:
        _, reps = ga.decode(pb, a, r)
        got = [(role, list(st)) for role, st in reps]
    out, who = with_baselines(pb, got, objective)
    if out is None:
        raise DoesNotFit("e2llm: does not fit: no grouping of these devices holds a full replica")
    return Placed(out, baseline_note(who)) if who else out


def baseline_note(who: str) -> str:
    """The plan's note where ``with_baselines`` took strategy ``who``'s plan over the GA's."""
    return (f"the {who} plan: predicted better than the GA's answer (a lower fitness; where both are "
            "overloaded, a higher saturation)")


# The other strategies whose plans e2llm's answer is checked against (all but the exact latency
# placement, a MILP of up to a second, whose one replica Algorithm 2's and the GA's pipelines
# cover). The GA's encoding cannot hold every plan they make: inside a replica it orders the
# devices along the fastest links and splits the blocks by its DP, where Algorithm 2 chooses the
# order and the devices; on random tight meshes its pipeline scored up to 37 times lower (docs/planner.md).
BASELINES = ("splitwise", "edgeshard-throughput", "edgeshard-latency", "edgeshard-even", "ring", "edge-solo",
             "cloud-edge-even", "cloud-edge-opt")


def with_baselines(pb: Problem, reps: list[tuple[Role, Stages]] | None,
                   objective: str) -> tuple[list[tuple[Role, Stages]] | None, str]:
    """``reps`` (the GA's answer; None where it found none that fits), or the plan of a baseline
    strategy when the GA's fitness scores that one lower, and the baseline's name ("" for the
    GA's own): e2llm is never predicted worse than the strategies it is compared with. Pure.

    Where the GA's answer is overloaded at the workload's rate, plans are compared by their
    predicted saturation rate instead (the highest wins; a plan that is not overloaded beats
    every one that is). The overloaded fitness, ``OVERLOAD x (1 + worst utilisation)``, reads
    the utilisation of the load shares the estimate gives each replica, and those are not the
    plan's capacity: on the home testbed's long prompts, at 1.2 x splitwise's saturation, it
    scored a plan that saturates at 0.43 requests/s (worst utilisation 1.0) below splitwise's at
    0.56 (2.0), and the simulator's e2llm then waited 2-3 times splitwise's at every load
    (docs/simulator.md). Computing the saturation costs a search over rates, so the GA's
    thousands of candidates do not; the few plans compared here do."""
    if reps is None:
        f: float = math.inf
    else:
        f = pb.estimate_stages(reps).fitness
    overloaded = queueing.OVERLOAD <= f < ga.INFEASIBLE

    def key(cand: list[tuple[Role, Stages]], fit: float) -> tuple[float, float]:
        if not overloaded or fit < queueing.OVERLOAD:
            return (0.0 if fit < queueing.OVERLOAD else 1.0, fit)
        sat = pb.estimate_stages(cand, with_saturation=True).predicted.saturation_rps or 0.0
        return (1.0, -sat)

    best, who = reps, ""
    best_key = key(reps, f) if reps is not None else (math.inf, math.inf)
    for name in BASELINES:
        try:
            got = STRATEGIES[name](pb, objective, np.random.default_rng(0))
        except (DoesNotFit, PlanError):
            continue
        cand = [(role, list(st)) for role, st in (got.replicas if isinstance(got, Placed) else got)]
        g = pb.estimate_stages(cand).fitness
        if g >= ga.INFEASIBLE:
            continue
        k = key(cand, g)
        if k[0] < best_key[0] or (k[0] == best_key[0] and k[1] < best_key[1] - 1e-12 * abs(best_key[1])):
            best, best_key, who = cand, k, name
    return best, who


MAX_PINNED = 8  # devices a pinned search enumerates every grouping of


def parse_strategy(spec: str) -> tuple[str, tuple[Role, ...] | int | None]:
    """``NAME`` or, for experiments, ``e2llm:ROLES`` / ``e2llm:N``: the GA's search with the
    replicas pinned — ``e2llm:prefill,decoder`` plans exactly one PREFILL and one DECODER
    replica, ``e2llm:both,both`` two BOTH replicas, ``e2llm:2`` two replicas of any roles. The
    planner still groups the devices and splits the layers. Raises :class:`PlanError`."""
    name, sep, pin = spec.partition(":")
    if name not in STRATEGIES:
        raise PlanError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if not sep:
        return name, None
    if name != "e2llm":
        raise PlanError(f"strategy {spec!r}: only e2llm takes pinned replicas (e2llm:prefill,decoder or e2llm:N)")
    if pin.strip().isdigit():
        if int(pin) < 1:
            raise PlanError(f"strategy {spec!r}: at least one replica")
        return name, int(pin)
    words = [w.strip().lower() for w in pin.split(",")]
    try:
        roles = tuple(Role(w) for w in words)
    except ValueError:
        raise PlanError(f"strategy {spec!r}: roles are {', '.join(r.value for r in Role)} "
                        "(e2llm:prefill,decoder), or a replica count (e2llm:2)") from None
    if (Role.PREFILL in roles) != (Role.DECODER in roles):
        raise PlanError(f"strategy {spec!r}: a PREFILL replica needs a DECODER replica and the other way round")
    return name, roles


def e2llm_pinned(pb: Problem, pin: tuple[Role, ...] | int) -> Placed:
    """The GA's fitness minimised over the plans with the pinned replicas, exactly: every
    grouping of the devices into that many replicas (one more group may stay idle) and every
    way of giving them the pinned roles (every role, for a count)."""
    m = len(pb.devices)
    k = pin if isinstance(pin, int) else len(pin)
    if m > MAX_PINNED:
        raise PlanError(f"pinned replicas are found by enumeration: at most {MAX_PINNED} devices, not {m}")
    if k > m:
        raise DoesNotFit(f"e2llm: does not fit: {k} replicas need at least {k} devices, there are {m}")
    codes = {r: i for i, r in enumerate(ga.ROLES)}
    role_sets = list(itertools.product(range(3), repeat=k)) if isinstance(pin, int) \
        else sorted(set(itertools.permutations(codes[r] for r in pin)))
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for labels, groups in ga._set_partitions(m):
        if groups not in (k, k + 1):
            continue
        for idle in ([None] if groups == k else range(groups)):
            live = [g for g in range(groups) if g != idle]
            slot = {g: i + 1 for i, g in enumerate(live)}
            a = np.array([0 if g == idle else slot[g] for g in labels], dtype=np.int64)
            for rs in role_sets:
                r = np.zeros(m, dtype=np.int64)
                r[:k] = rs
                f = ga.fitness(pb, a, r)
                if best is None or f < best[0]:
                    best = (f, a, r)
    if best is None or best[0] >= ga.INFEASIBLE:
        what = f"{pin} replicas" if isinstance(pin, int) else "replicas " + ", ".join(r.value.upper() for r in pin)
        raise DoesNotFit(f"e2llm: does not fit: no grouping of these devices holds {what}")
    _, reps = ga.decode(pb, best[1], best[2])
    return Placed([(role, list(st)) for role, st in reps], "replicas pinned by the operator")


STRATEGIES: dict[str, StrategyFn] = {
    "edge-solo": edge_solo,
    "cloud-edge-even": cloud_edge_even,
    "cloud-edge-opt": cloud_edge_opt,
    "edgeshard-latency": edgeshard_latency_plan,
    "edgeshard-throughput": edgeshard_throughput_plan,
    "edgeshard-even": edgeshard_even,
    "splitwise": splitwise,
    "ring": ring,
    "e2llm": e2llm,
}


def make_plan(strategy: str, model_profile: ModelProfile, devices: Sequence[Device], network: Network,
              workload: Workload, objective: str = "waiting", rng: np.random.Generator | None = None,
              *, epoch: int = 0) -> Plan:
    """Plan with the named strategy. ``objective`` (latency | throughput | waiting) matters to
    ``cloud-edge-opt``; the other strategies have their own. ``rng`` drives the GA (default:
    ``default_rng(0)``). The plan passes :func:`validate_plan` and carries predicted figures.
    Raises :class:`DoesNotFit` when the model fits nowhere, :class:`PlanError` for bad input."""
    parse_strategy(strategy)
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    pb = Problem(model_profile, tuple(devices), network, workload)
    return plan_problem(strategy, pb, objective, rng if rng is not None else np.random.default_rng(0), epoch)


def plan_problem(strategy: str, pb: Problem, objective: str, rng: np.random.Generator, epoch: int = 0) -> Plan:
    """:func:`make_plan` on a prepared :class:`Problem` (its tables reused). ``strategy`` may
    pin the replicas (:func:`parse_strategy`)."""
    name, pin = parse_strategy(strategy)
    got = STRATEGIES[name](pb, objective, rng) if pin is None else e2llm_pinned(pb, pin)
    reps, note = (got.replicas, got.note) if isinstance(got, Placed) else (got, "")
    est = pb.estimate_stages(reps, with_saturation=True)
    plan = Plan(epoch, pb.to_replicas(reps), est.predicted, strategy, note)
    validate_plan(plan, pb.profile, pb.devices, pb.workload)
    return plan


def cost_inputs(pb: Problem) -> dict:
    """The cost tables behind a plan, in human units, for checking a result by hand:
    per-device per-block prefill ms per prompt token (at the mean prompt) and decode ms per step
    (batch 1, mean context), per-device memory, per-pair ms to send one token's activations."""
    p, w = pb.profile, pb.workload
    names = pb.names
    act = float(p.act[1]) if p.n_blocks > 2 else float(p.act[0])
    return {
        "model": {"name": p.name, "blocks": p.n_blocks,
                  "block_weight_bytes": [int(x) for x in p.param_bytes],
                  "kv_bytes_per_token": [int(x) for x in p.kv],
                  "activation_bytes_per_token": [int(x) for x in p.act]},
        "workload": w.to_dict(),
        "efficiency": {"compute": pb.eff.compute, "memory": pb.eff.memory,
                       "block_overhead_s": pb.eff.block_overhead_s},
        "devices": {d.name: {"memory_bytes": d.memory_bytes, "tflops": d.tflops, "mem_bw_gbs": d.mem_bw_gbs,
                             "source": d.source,
                             "prefill_ms_per_token": [round(float(x) * 1e3 / max(w.input_len.mean, 1), 6)
                                                      for x in pb.pre_mean[j]],
                             "decode_ms_per_step": [round(float(x) * 1e3, 6) for x in pb.dec[1][j]]}
                    for j, d in enumerate(pb.devices)},
        "activation_ms_per_token": {a: {b: round(float(pb.link(act, i, k)) * 1e3, 6)
                                        for k, b in enumerate(names) if k != i}
                                    for i, a in enumerate(names)},
    }
