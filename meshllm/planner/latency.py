"""Latency placement that is exact under each device's memory summed over all of its runs.

EdgeShard's Algorithm 1 (:func:`meshllm.planner.dp.edgeshard_latency`) checks memory per run:
its (block, device) state cannot see a device's earlier runs, so its chain may come back to a
device and overfill it. The true problem — every block on some device, block 0 on the source,
the sum of compute, the transfers at each change of device and the token's return minimised,
each device's *total* within its memory — is a shortest path with one resource per device, and
NP-hard in general (it contains bin packing). :func:`place_latency` solves it in steps:

1. Algorithm 1: when its chain fits every device in total it is optimal (its value is a lower
   bound).
2. Incumbents and bounds: the no-revisit DP; the Lagrangian dual — price each device's memory
   at ``lam[j]`` per byte, solve Algorithm 1 with the prices, subtract ``sum(lam * mem)``;
   ``lam`` by subgradient ascent (Polyak steps) — whose chains that fit are incumbents too.
3. Up to ``max_exact`` devices (the switch size, 8): a mixed-integer program on HiGHS
   (:func:`_milp`), with a node limit so its work is bounded and deterministic.
4. Above it: depth first over chains of maximal runs, best bound first, the Lagrangian prices
   giving every node a cost-to-go bound; a node is dropped when its bound reaches the
   incumbent, when the free memory cannot hold the remaining blocks, or when an expanded node
   at the same boundary and device had no more cost and no more memory used on any device
   (the same runs in another order). At most ``node_budget`` nodes: a stated heuristic.

The answer says whether it is proven optimal (``exact``), or else carries the smallest lower
bound proven (``bound``, ``gap``). No clock anywhere: the limits count nodes.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import numpy as np

from meshllm.errors import DoesNotFit
from meshllm.planner.dp import _check, _link, _prefix, edgeshard_latency

INF = np.inf
MAX_EXACT = 8  # devices: the switch size (docs/planner.md)
NODE_LIMIT = 100  # branch-and-bound nodes of the MILP per first device
NODE_BUDGET = 2000  # nodes of the depth-first search above the switch size
ROUNDS = 60  # subgradient rounds of the Lagrangian dual

Stages = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class LatencyPlacement:
    """The answer: ``stages`` (device, first, end) as maximal runs in chain order (a device may
    appear more than once), their latency ``value``, a proven lower ``bound`` on the optimum,
    whether the search proved ``value`` optimal, and the search nodes it expanded."""

    value: float
    stages: Stages
    bound: float
    exact: bool
    nodes: int
    method: str  # "exact" | "budget" (search stopped at its budget) | "heuristic" (above max_exact)

    @property
    def gap(self) -> float:
        """Relative distance to the bound: 0 when proven optimal."""
        if self.value <= 0 or not np.isfinite(self.value):
            return 0.0
        return max(0.0, (self.value - self.bound) / self.value)


def chain_latency(comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
                  stages: Stages, ret_bytes: float = 8.0) -> float:
    """Latency of a chain of runs: compute, a transfer at each change of device, and the
    token's return from the last device to the first."""
    t = sum(float(comp[j, a:b].sum()) for j, a, b in stages)
    for (k, _, _), (j, a, _) in itertools.pairwise(stages):
        t += float(_link(float(out_bytes[a - 1]), np.array(bw[k, j]), np.array(rtt[k, j])))
    last, first = stages[-1][0], stages[0][0]
    return t + float(_link(float(ret_bytes), np.array(bw[last, first]), np.array(rtt[last, first])))


def memory_used(req: np.ndarray, stages: Stages, m: int) -> np.ndarray:
    """(M,) bytes each device holds over all of its runs."""
    used = np.zeros(m)
    pr = _prefix(req)
    for j, a, b in stages:
        used[j] += pr[b] - pr[a]
    return used


class _Tables:
    """Per first device: transfer tables and the Lagrangian block DP."""

    def __init__(self, comp, out_bytes, bw, rtt, mem, req, first, ret_bytes):
        m, n = comp.shape
        self.m, self.n, self.first = m, n, first
        self.comp, self.mem, self.req = comp, mem, req
        self.trans = np.zeros((n + 1, m, m))  # trans[e, k, j]: boundary e from k to j
        for e in range(1, n):
            self.trans[e] = _link(float(out_bytes[e - 1]), bw, rtt)
        self.ret = _link(float(ret_bytes), bw[:, first], rtt[:, first])  # (M,) last -> first
        self.fits = req[None, :] <= mem[:, None]  # (M, N): a block alone fits the device
        self.pc = _prefix(comp)
        self.pr = _prefix(req)

    def dual(self, lam: np.ndarray) -> tuple[float, np.ndarray, Stages]:
        """Lagrangian relaxation at prices ``lam`` (per byte per device): Algorithm 1's problem
        (each run within its device's memory) with ``lam[j] * bytes`` added to a run on j, solved
        backwards. Returns (bound on the optimum, ``h`` (N+1, M): cheapest priced cost of blocks
        [e, N) after a run on k ended at e, the minimising chain)."""
        m, n = self.m, self.n
        pc = _prefix(self.comp + lam[:, None] * self.req[None, :])  # (M, N+1) priced compute
        pr = self.pr
        h = np.full((n + 1, m), INF)
        h[n] = self.ret
        nxt_j = np.zeros((n + 1, m), dtype=np.int64)
        nxt_e = np.zeros((n + 1, m), dtype=np.int64)
        off = ~np.eye(m, dtype=bool)
        for e in range(n - 1, -1, -1):
            run = pc[:, e + 1:] - pc[:, e:e + 1]  # (M, n - e): run [e, e2) on j
            ok = (pr[e + 1:] - pr[e])[None, :] <= self.mem[:, None]
            v = np.where(ok, run + h[e + 1:].T, INF)  # (M, n - e)
            be = v.argmin(axis=1)  # best end per next device j
            w = v[np.arange(m), be]  # (M,)
            if e == 0:
                root_e = int(be[self.first])
                root = float(w[self.first])
                break
            cand = np.where(off, self.trans[e] + w[None, :], INF)  # (M_k, M_j)
            bj = cand.argmin(axis=1)
            h[e] = cand[np.arange(m), bj]
            nxt_j[e], nxt_e[e] = bj, e + 1 + be[bj]
        bound = root - float(lam @ self.mem)
        if not np.isfinite(bound):
            return bound, h, ()
        chain = [(self.first, 0, 1 + root_e)]
        k, e = self.first, 1 + root_e
        while e < n:
            j, e2 = int(nxt_j[e, k]), int(nxt_e[e, k])
            chain.append((j, e, e2))
            k, e = j, e2
        return bound, h, tuple(chain)


def _subgradient(tb: _Tables, upper: float, lower: float) -> tuple[float, np.ndarray, list[Stages]]:
    """Maximise the Lagrangian dual; returns the best bound, its prices, and the chains seen."""
    lam = np.zeros(tb.m)
    best_b, best_lam = -INF, lam
    chains: list[Stages] = []
    theta, stale = 2.0, 0
    target = upper if np.isfinite(upper) else max(lower, 1e-12) * 1.5
    for _ in range(ROUNDS):
        b, _, st = tb.dual(lam)
        if not np.isfinite(b):
            break
        chains.append(st)
        used = memory_used(tb.req, st, tb.m)
        if b > best_b * (1 + 1e-12) or best_b == -INF:
            best_b, best_lam, stale = b, lam.copy(), 0
        else:
            stale += 1
            if stale >= 5:
                theta, stale = theta / 2, 0
        sub = used - tb.mem
        if np.all(sub <= 0) and lam @ sub > -1e-12 * max(abs(b), 1.0):
            break  # complementary slackness: this chain is optimal
        norm = float(sub @ sub)
        if norm == 0 or theta < 1e-4:
            break
        lam = np.maximum(0.0, lam + theta * (target - b) / norm * sub)
    return best_b, best_lam, chains


def _search(tb: _Tables, lam: np.ndarray, incumbent: float, best: Stages | None,
            budget: int) -> tuple[float, Stages | None, float, int, bool]:
    """Branch and bound from the first device. Returns (incumbent value, its chain, the
    smallest open bound, nodes expanded, finished)."""
    m, n, first = tb.m, tb.n, tb.first
    mem, pc, pr = tb.mem, tb.pc, tb.pr
    _, h_lam, _ = tb.dual(lam)
    _, h_0, _ = tb.dual(np.zeros(m))
    cut = 1 - 1e-12
    total = float(pr[n])
    # a node: (bound, cost so far, boundary e, last device k, used (M,), chain as a linked list)
    stack: list[tuple[float, float, int, int, np.ndarray, tuple | None]] = []
    u0 = np.zeros(m)

    def children(g: float, e: int, k: int, used: np.ndarray, path: tuple | None, root: bool) -> None:
        nonlocal incumbent, best
        amount = pr[e + 1:] - pr[e]  # (n - e,) bytes of runs [e, e2), e2 = e+1..n
        ok = used[:, None] + amount[None, :] <= mem[:, None]  # (M, n - e)
        if root:
            ok[np.arange(m) != first] = False
        else:
            ok[k] = False
        run = pc[:, e + 1:] - pc[:, e:e + 1]  # (M, n - e)
        gp = g + (0.0 if root else tb.trans[e, k][:, None]) + run
        slack = float(lam @ (mem - used))
        lb = np.maximum(gp + h_lam[e + 1:].T + lam[:, None] * amount[None, :] - slack,
                        gp + h_0[e + 1:].T)
        free = float((mem - used).sum()) - amount  # (n - e,) free memory after the run
        ok &= (free >= total - pr[e + 1:] - 1e-9 * total)[None, :]
        ok &= lb < incumbent * cut
        if not ok.any():
            return
        done = ok[:, -1]
        if done.any():  # runs to the last block: complete chains
            val = gp[:, -1] + tb.ret
            val[~done] = INF
            j = int(np.argmin(val))
            if val[j] < incumbent * cut:
                incumbent = float(val[j])
                best = _unwind((path, (j, e, n)))
            ok[:, -1] = False
        jj, ee = np.nonzero(ok & (lb < incumbent * cut))
        if len(jj) == 0:
            return
        order = np.argsort(-lb[jj, ee], kind="stable")  # best popped first
        for q in order:
            j, c = int(jj[q]), int(ee[q])
            u = used.copy()
            u[j] += amount[c]
            stack.append((float(lb[j, c]), float(gp[j, c]), e + 1 + c, j, u, (path, (j, e, e + 1 + c))))

    children(0.0, 0, first, u0, None, root=True)
    seen: dict[tuple[int, int], tuple[list[float], list[np.ndarray]]] = {}
    nodes = 0
    while stack:
        if nodes >= budget:
            open_bound = min(min(s[0] for s in stack), incumbent)
            return incumbent, best, open_bound, nodes, False
        lb, g, e, k, used, path = stack.pop()
        if lb >= incumbent * cut:
            continue
        gs, us = seen.setdefault((e, k), ([], []))
        if gs:
            dom = (np.asarray(gs) <= g * (1 + 1e-12)) & np.all(np.asarray(us) <= used + 1e-9 * total, axis=1)
            if dom.any():
                continue
        gs.append(g)
        us.append(used)
        nodes += 1
        children(g, e, k, used, path, root=False)
    return incumbent, best, incumbent, nodes, True


def _milp(tb: _Tables, comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
          ret_bytes: float, scale: float, node_limit: int) -> tuple[Stages | None, float, bool, int]:
    """The exact problem from the first device as a mixed-integer program, solved by HiGHS
    (scipy.optimize.milp). Returns (the best chain found, a proven lower bound, proven
    optimal, branch-and-bound nodes).

    Variables ``y[b, k, j]`` in {0, 1}: block b-1 on k and block b on j (b = 1..N-1; k = j
    keeps the device). They form a path through the (block, device) layers — flow
    conservation at every (block, device) — so the LP without memory is integral; the memory
    rows (each device's blocks over all of its runs) are what make it hard. Cost of
    ``y[b, k, j]``: block b's compute on j, the transfer at boundary b when k != j, the
    token's return when b is the last block. Pairs whose block cannot fit its device alone
    are left out. ``scale`` normalises the objective so HiGHS's absolute gap is negligible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csc_array

    m, n, first = tb.m, tb.n, tb.first
    mem, req = tb.mem, tb.req
    bs, ks, js, cs = [], [], [], []
    for b in range(1, n):
        kk = np.array([first]) if b == 1 else np.nonzero(tb.fits[:, b - 1])[0]
        jj = np.nonzero(tb.fits[:, b])[0]
        k_, j_ = np.repeat(kk, len(jj)), np.tile(jj, len(kk))
        c = comp[j_, b] + tb.trans[b, k_, j_] + (tb.ret[j_] if b == n - 1 else 0.0)
        bs.append(np.full(len(k_), b))
        ks.append(k_)
        js.append(j_)
        cs.append(c)
    b_, k_, j_, c_ = (np.concatenate(x) for x in (bs, ks, js, cs))
    nv = len(c_)
    v = np.arange(nv)
    # rows: flow at (b, j) for b = 1..n-2 (in - out = 0); one path out of the first device;
    # each device's memory, as a fraction of its budget
    inn, out = b_ <= n - 2, b_ >= 2
    rows = [(b_[inn] - 1) * m + j_[inn], (b_[out] - 2) * m + k_[out], np.full(int((b_ == 1).sum()), (n - 2) * m),
            (n - 2) * m + 1 + j_]
    cols = [v[inn], v[out], v[b_ == 1], v]
    vals = [np.ones(int(inn.sum())), -np.ones(int(out.sum())), np.ones(int((b_ == 1).sum())), req[b_] / mem[j_]]
    n_rows = (n - 2) * m + 1 + m
    a = csc_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, nv))
    held0 = np.where(np.arange(m) == first, req[0], 0.0) / mem
    lo = np.concatenate([np.zeros((n - 2) * m), [1.0], np.full(m, -np.inf)])
    hi = np.concatenate([np.zeros((n - 2) * m), [1.0], (1.0 - held0) * (1 - 1e-9)])
    res = milp(c_ * scale, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(nv), bounds=Bounds(0, 1),
               options={"disp": False, "mip_rel_gap": 0.0, "node_limit": node_limit})
    dual = getattr(res, "mip_dual_bound", None)
    bound = (float(dual) / scale + float(comp[first, 0])) if dual is not None and np.isfinite(dual) else -INF
    nodes = int(getattr(res, "mip_node_count", 0) or 0)
    if res.status == 2:  # infeasible: nothing starts on this device
        return None, INF, True, nodes
    if res.x is None:
        return None, bound, False, nodes
    assign = np.empty(n, dtype=np.int64)
    assign[0] = first
    chosen = np.nonzero(res.x > 0.5)[0]
    assign[b_[chosen]] = j_[chosen]
    stages = _runs(assign)
    if np.any(memory_used(req, stages, m) > mem):
        return None, bound, False, nodes
    optimal = res.status == 0
    value = chain_latency(comp, out_bytes, bw, rtt, stages, ret_bytes)
    return stages, (value if optimal else bound), optimal, nodes


def _runs(assign: np.ndarray) -> Stages:
    out: list[tuple[int, int, int]] = []
    a = 0
    for i in range(1, len(assign) + 1):
        if i == len(assign) or assign[i] != assign[a]:
            out.append((int(assign[a]), a, i))
            a = i
    return tuple(out)


def _unwind(path: tuple | None) -> Stages:
    out = []
    while path is not None:
        path, st = path
        out.append(st)
    return tuple(reversed(out))


def place_latency(comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
                  mem: np.ndarray, req: np.ndarray, source: int | None = 0, ret_bytes: float = 8.0,
                  *, max_exact: int = MAX_EXACT, node_limit: int = NODE_LIMIT,
                  node_budget: int = NODE_BUDGET) -> LatencyPlacement:
    """Minimum-latency placement (arrays as :func:`meshllm.planner.dp.edgeshard_latency`) with
    each device's memory summed over all of its runs; block 0 on ``source`` (any device when
    None; the token then returns to whichever runs block 0). Raises :class:`DoesNotFit` when
    no placement fits (or none was found within the budget)."""
    m, _n = _check(comp, out_bytes, bw, rtt, mem, req)
    if float(req.sum()) > float(mem.sum()):
        raise DoesNotFit("the model fits on no chain of these devices")
    firsts = [source] if source is not None else list(range(m))
    value, stages = INF, None  # the incumbent over every first device
    bound = INF  # min over first devices of a lower bound on their best chain
    nodes = 0
    for f in firsts:
        # Algorithm 1 (memory per run) is a lower bound; when its chain fits in total, it is optimal
        try:
            relaxed = edgeshard_latency(comp, out_bytes, bw, rtt, mem, req, f, ret_bytes)
        except DoesNotFit:
            continue  # nothing starts on f
        if np.all(memory_used(req, relaxed.stages, m) <= mem):
            if relaxed.value < value:
                value, stages = relaxed.value, _merge(relaxed.stages)
            bound = min(bound, relaxed.value)
            continue
        tb = _Tables(comp, out_bytes, bw, rtt, mem, req, f, ret_bytes)
        cands: list[Stages] = []
        with contextlib.suppress(DoesNotFit):
            cands.append(_merge(edgeshard_latency(comp, out_bytes, bw, rtt, mem, req, f, ret_bytes,
                                                  no_revisit=True).stages))
        up = min([chain_latency(comp, out_bytes, bw, rtt, c, ret_bytes) for c in cands] + [value])
        lag, lam, chains = _subgradient(tb, up, relaxed.value)
        cands += [_merge(c) for c in chains if np.all(memory_used(req, c, m) <= mem)]
        for c in cands:
            v = chain_latency(comp, out_bytes, bw, rtt, c, ret_bytes)
            if v < value:
                value, stages = v, c
        f_bound = max(relaxed.value, lag)
        if value <= f_bound * (1 + 1e-12):
            bound = min(bound, f_bound)  # nothing from f beats the incumbent
            continue
        if m <= max_exact:
            ref = value if np.isfinite(value) else f_bound
            got, m_bound, _, k = _milp(tb, comp, out_bytes, bw, rtt, ret_bytes, 1e6 / max(ref, 1e-12), node_limit)
            nodes += k
            if got is not None:
                v = chain_latency(comp, out_bytes, bw, rtt, got, ret_bytes)
                if v < value:
                    value, stages = v, got
            bound = min(bound, max(f_bound, m_bound))
            continue
        # above the switch size: a depth-first search with a node budget improves the chain
        value, stages, open_b, k, _done = _search(tb, lam, value, stages, node_budget)
        nodes += k
        bound = min(bound, max(f_bound, open_b))
    if stages is None:
        raise DoesNotFit("the model fits on no chain of these devices")
    bound = min(bound, value)
    exact = value <= bound * (1 + 1e-12)
    method = "exact" if exact else ("heuristic" if m > max_exact else "budget")
    return LatencyPlacement(value, stages, value if exact else bound, exact, nodes, method)


def _merge(stages: Stages) -> Stages:
    out: list[tuple[int, int, int]] = []
    for j, a, b in stages:
        if out and out[-1][0] == j and out[-1][2] == a:
            out[-1] = (j, out[-1][1], b)
        else:
            out.append((j, a, b))
    return tuple(out)
