"""Layer partitioning by dynamic programming: EdgeShard's two algorithms and the bottleneck DP
the E2LLM replicas use.

All three work on plain arrays so they can be checked against brute force:

- ``comp``  (M, N): seconds block ``i`` takes on device ``j`` (per the objective's unit of work)
- ``out_bytes`` (N,): bytes that cross a boundary after block ``i`` (activations of the tokens in
  one unit of work)
- ``bw``, ``rtt`` (M, M): link bandwidth (bytes/s, inf on the diagonal) and round-trip time (s)
- ``mem`` (M,): device memory budgets; ``req`` (N,): bytes block ``i`` needs on its device
- ``source``: the device that must run block 0 (EdgeShard's privacy constraint), or None
- ``ret_bytes``: bytes that go back from the last device to the source after each pass (the
  sampled token; EdgeShard's t_comm^{N-1,j,0})

A link transfer costs ``rtt / 2 + bytes / bw`` (see :func:`meshllm.planner.cost.transfer_time`).

Memory is checked per contiguous run of blocks on a device (Eq. 5 of the paper for a device
that holds one run). The state of Algorithm 1 — (layer, device) — cannot see runs earlier in the
chain, so a solution that comes back to a device checks each run separately; the planner's
``validate_plan`` checks the node's total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.errors import DoesNotFit

INF = np.inf


@dataclass(frozen=True, slots=True)
class Partition:
    """A DP answer: the objective value and the stages ``(device index, first, end)`` in order."""

    value: float
    stages: tuple[tuple[int, int, int], ...]


def _link(nbytes: np.ndarray | float, bw: np.ndarray, rtt: np.ndarray) -> np.ndarray:
    """Transfer time matrix; zero where bandwidth is infinite (a device to itself)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rtt / 2 + nbytes / bw
    return np.where(np.isinf(bw), 0.0, t)


def _prefix(a: np.ndarray) -> np.ndarray:
    out = np.zeros((*a.shape[:-1], a.shape[-1] + 1))
    np.cumsum(a, axis=-1, out=out[..., 1:])
    return out


def _check(comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
           mem: np.ndarray, req: np.ndarray) -> tuple[int, int]:
    m, n = comp.shape
    if out_bytes.shape != (n,) or req.shape != (n,) or mem.shape != (m,) \
            or bw.shape != (m, m) or rtt.shape != (m, m):
        raise ValueError("DP input shapes disagree")
    return m, n


# --- Algorithm 1: minimum latency ----------------------------------------------------------

def edgeshard_latency(comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
                      mem: np.ndarray, req: np.ndarray, source: int | None = 0,
                      ret_bytes: float = 8.0, no_revisit: bool = False) -> Partition:
    """EdgeShard Algorithm 1: place every block on some device minimising the sum of compute
    and transfer times of one pass plus the token's return to the source (Eq. 2, 7, 9).

    The recurrence is the paper's DP(i, j) (block i on device j), unrolled over runs: a
    transition either keeps the device (no transfer) or switches from device k to j paying
    ``t_comm^{i-1,k,j}``; each run must fit the device's memory. Without a source constraint the
    token returns to whichever device runs block 0 (the DP is solved once per first device).
    O(N^2 M^2) with the run unrolling, vectorised over devices and run ends.

    The recurrence may come back to a device after another one, with each run checked against
    the device's memory on its own. ``no_revisit=True`` carries the set of devices on each
    state's best chain and forbids going back to one of them, so a device holds one run and
    Eq. 5 holds in total. That variant is a heuristic (the best chain to a state may be the one
    that blocks the best continuation); the planner uses it only when the exact recurrence's
    answer overfills a revisited device.

    Raises :class:`DoesNotFit` when no placement fits.
    """
    m, _n = _check(comp, out_bytes, bw, rtt, mem, req)
    firsts = [source] if source is not None else list(range(m))
    best: Partition | None = None
    for f in firsts:
        p = _latency_from(comp, out_bytes, bw, rtt, mem, req, f, ret_bytes, no_revisit)
        if p is not None and (best is None or p.value < best.value):
            best = p
    if best is None:
        raise DoesNotFit("the model fits on no chain of these devices")
    return best


def _latency_from(comp, out_bytes, bw, rtt, mem, req, first, ret_bytes, no_revisit) -> Partition | None:
    m, n = comp.shape
    if no_revisit and m > 62:
        raise ValueError("no_revisit supports at most 62 devices")
    used = np.zeros((n + 1, m), dtype=np.int64)  # bit set of devices on the state's best chain
    used[:, first] = 1 << first
    bits = np.left_shift(1, np.arange(m, dtype=np.int64))
    pc = _prefix(comp)  # (M, N+1)
    pr = _prefix(req)  # (N+1,)
    d = np.full((n + 1, m), INF)  # d[e, j]: blocks [0, e) placed, last run on j ends at e
    prev_e = np.full((n + 1, m), -1, dtype=np.int64)
    prev_k = np.full((n + 1, m), -1, dtype=np.int64)
    # first run on the first device: blocks [0, e)
    fits = pr[1:] - pr[0] <= mem[first]
    d[1:, first] = np.where(fits, pc[first, 1:], INF)
    eye = np.eye(m, dtype=bool)
    for e in range(1, n):
        row = d[e]  # (M,) arrive at boundary e with last device k
        if not np.isfinite(row).any():
            continue
        comm = _link(out_bytes[e - 1], bw, rtt)  # (M_k, M_j)
        cand = row[:, None] + comm  # (M_k, M_j)
        cand[eye] = INF  # a run ends only where the device changes
        if no_revisit:
            cand[(used[e][:, None] & bits[None, :]) != 0] = INF
        k_best = cand.argmin(axis=0)  # (M_j,)
        into = cand[k_best, np.arange(m)]  # (M_j,)
        # runs [e, e2) on device j for every e2 > e
        run = pc[:, e + 1:] - pc[:, e:e + 1]  # (M, n - e)
        ok = (pr[e + 1:] - pr[e])[None, :] <= mem[:, None]
        val = np.where(ok, into[:, None] + run, INF)  # (M, n - e)
        tgt = d[e + 1:].T  # (M, n - e) view order j, e2
        better = val < tgt
        if better.any():
            jj, ee = np.nonzero(better)
            d[e + 1 + ee, jj] = val[jj, ee]
            prev_e[e + 1 + ee, jj] = e
            prev_k[e + 1 + ee, jj] = k_best[jj]
            used[e + 1 + ee, jj] = used[e, k_best[jj]] | bits[jj]
    ret = _link(float(ret_bytes), bw[:, first], rtt[:, first])  # (M,) last device -> first
    total = d[n] + ret
    j = int(np.argmin(total))
    if not np.isfinite(total[j]):
        return None
    stages: list[tuple[int, int, int]] = []
    e = n
    while e > 0:
        pe = int(prev_e[e, j])
        start = 0 if pe < 0 else pe
        stages.append((j, start, e))
        if pe < 0:
            break
        j, e = int(prev_k[e, j]), pe
    return Partition(float(total.min()), tuple(reversed(stages)))


# --- Algorithm 2: maximum throughput (minimum bottleneck) with device selection -----------

def edgeshard_throughput(comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
                         mem: np.ndarray, req: np.ndarray, source: int | None = 0,
                         ret_bytes: float = 8.0, max_exact: int = 12) -> Partition:
    """EdgeShard Algorithm 2: choose a chain of distinct devices and contiguous block ranges
    minimising the pipeline's slowest resource, max over stages of compute and over links of
    transfer (Eq. 10-12), including the token's return to the source when there is one.

    The state is the paper's g(m, S, j): blocks [0, m) placed on the device set S, the last run
    on j. Exact, O(N^2 2^M M) after vectorisation. With more than ``max_exact`` devices a stated
    heuristic first keeps the ``max_exact`` fastest devices (the source always kept; whole-model
    compute time as the speed; ties by memory) and runs the exact DP on them.

    Raises :class:`DoesNotFit` when no placement fits.
    """
    m, n = _check(comp, out_bytes, bw, rtt, mem, req)
    if m > max_exact:
        keep = _preselect(comp, mem, req, source, max_exact)
        sub = np.array(keep)
        p = edgeshard_throughput(comp[sub], out_bytes, bw[np.ix_(sub, sub)], rtt[np.ix_(sub, sub)],
                                 mem[sub], req, None if source is None else keep.index(source),
                                 ret_bytes, max_exact)
        return Partition(p.value, tuple((keep[j], a, b) for j, a, b in p.stages))
    pc = _prefix(comp)
    pr = _prefix(req)
    ns = 1 << m
    g = np.full((n + 1, ns, m), INF)
    prev_e = np.full((n + 1, ns, m), -1, dtype=np.int16)
    prev_k = np.full((n + 1, ns, m), -1, dtype=np.int8)
    starts = [source] if source is not None else list(range(m))
    for j in starts:
        ok = pr[1:] <= mem[j]
        g[1:, 1 << j, j] = np.where(ok, pc[j, 1:], INF)
    subsets = np.arange(ns)
    without = [subsets[(subsets >> j) & 1 == 0] for j in range(m)]
    for e in range(1, n):
        ge = g[e]  # (2^M, M)
        if not np.isfinite(ge).any():
            continue
        comm = _link(out_bytes[e - 1], bw, rtt)  # (M_k, M_j)
        for j in range(m):
            s = without[j]
            cand = np.maximum(ge[s], comm[:, j][None, :])  # (|s|, M_k)
            kb = cand.argmin(axis=1)
            h = cand[np.arange(len(s)), kb]  # (|s|,)
            live = np.isfinite(h)
            if not live.any():
                continue
            s, kb, h = s[live], kb[live], h[live]
            run = pc[j, e + 1:] - pc[j, e]  # (n - e,)
            ok = pr[e + 1:] - pr[e] <= mem[j]
            run = np.where(ok, run, INF)
            val = np.maximum(h[None, :], run[:, None])  # (n - e, |s|)
            tgt_s = s | (1 << j)
            cur = g[e + 1:, tgt_s, j]  # (n - e, |s|)
            better = val < cur
            if better.any():
                g[e + 1:, tgt_s, j] = np.where(better, val, cur)
                pe = prev_e[e + 1:, tgt_s, j]
                pk = prev_k[e + 1:, tgt_s, j]
                prev_e[e + 1:, tgt_s, j] = np.where(better, e, pe)
                prev_k[e + 1:, tgt_s, j] = np.where(better, kb[None, :], pk)
    final = g[n].copy()  # (2^M, M)
    if source is not None:
        ret = _link(float(ret_bytes), bw[:, source], rtt[:, source])  # (M,)
        final = np.maximum(final, ret[None, :])
    idx = int(np.argmin(final))
    sset, j = divmod(idx, m)
    sset, j = int(sset), int(j)
    if not np.isfinite(final[sset, j]):
        raise DoesNotFit("the model fits on no chain of these devices")
    value = float(final[sset, j])
    stages: list[tuple[int, int, int]] = []
    e = n
    while True:
        back = int(prev_e[e, sset, j])
        stages.append((j, back if back > 0 else 0, e))
        if back < 0:
            break
        k = int(prev_k[e, sset, j])
        sset, j, e = sset & ~(1 << j), k, back
    return Partition(value, tuple(reversed(stages)))


def _preselect(comp: np.ndarray, mem: np.ndarray, req: np.ndarray, source: int | None,
               k: int) -> list[int]:
    speed_order = sorted(range(len(mem)), key=lambda j: (comp[j].sum(), -mem[j], j))
    keep = [] if source is None else [source]
    for j in speed_order:
        if len(keep) >= k:
            break
        if j not in keep:
            keep.append(j)
    return sorted(keep)


# --- bottleneck DP for a given ordered device list ----------------------------------------

def bottleneck_split(comp: np.ndarray, out_bytes: np.ndarray, bw: np.ndarray, rtt: np.ndarray,
                     mem: np.ndarray, req: np.ndarray, order: Sequence[int],
                     ret_bytes: float = 8.0) -> Partition:
    """Split blocks [0, N) into contiguous non-empty ranges, one per device of ``order`` in that
    order, minimising the slowest resource: each stage's compute, each boundary's transfer, and
    the token's return from the last device to the first. O(len(order) * N^2), vectorised.

    Raises :class:`DoesNotFit` when no split fits (memory, or more devices than blocks).
    """
    _m, n = _check(comp, out_bytes, bw, rtt, mem, req)
    order = list(order)
    s_count = len(order)
    if s_count == 0 or s_count > n:
        raise DoesNotFit(f"cannot split {n} blocks over {s_count} devices")
    pc = _prefix(comp[order])  # (S, N+1)
    pr = _prefix(req)
    a_idx = np.arange(n + 1)
    seg_mem = pr[None, :] - pr[:, None]  # (a, b) bytes of blocks [a, b)
    valid = a_idx[:, None] < a_idx[None, :]  # a < b
    d = np.full(n + 1, INF)
    first = order[0]
    d[1:] = np.where(pr[1:] <= mem[first], pc[0, 1:], INF)
    choice = np.full((s_count, n + 1), -1, dtype=np.int64)
    for s in range(1, s_count):
        dev, prv = order[s], order[s - 1]
        comm = np.zeros(n + 1)
        comm[1:] = _link(out_bytes, bw[prv, dev], rtt[prv, dev])  # boundary at a: output of a-1
        seg = pc[s][None, :] - pc[s][:, None]  # (a, b)
        ok = valid & (seg_mem <= mem[dev])
        cand = np.where(ok, np.maximum(np.maximum(d, comm)[:, None], seg), INF)  # (a, b)
        am = cand.argmin(axis=0)
        d = cand[am, a_idx]
        choice[s] = am
    ret = float(_link(float(ret_bytes), np.array(bw[order[-1], first]), np.array(rtt[order[-1], first])))
    return split_partition(max(float(d[n]), ret), order, choice)


def split_partition(value: float, order: Sequence[int], choice: np.ndarray) -> Partition:
    """The bottleneck split's answer from its DP: ``value`` (inf: nothing fits) and ``choice``
    (s, b) = where stage s starts when blocks [.., b) end there, walked back from the last block."""
    if not np.isfinite(value):
        raise DoesNotFit("the blocks do not fit on these devices in this order")
    stages: list[tuple[int, int, int]] = []
    b = choice.shape[1] - 1
    for s in range(len(order) - 1, 0, -1):
        a = int(choice[s, b])
        stages.append((order[s], a, b))
        b = a
    stages.append((order[0], 0, b))
    return Partition(value, tuple(reversed(stages)))


def even_split(n_blocks: int, n_devices: int) -> list[tuple[int, int]]:
    """Contiguous ranges as equal in block count as possible (earlier ranges one larger)."""
    if n_devices < 1 or n_devices > n_blocks:
        raise DoesNotFit(f"cannot split {n_blocks} blocks over {n_devices} devices")
    q, r = divmod(n_blocks, n_devices)
    out, a = [], 0
    for i in range(n_devices):
        b = a + q + (1 if i < r else 0)
        out.append((a, b))
        a = b
    return out


def proportional_split(n_blocks: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ranges with block counts proportional to ``weights`` (largest remainder),
    every range at least one block. What exo's ring does with device memory as the weight."""
    k = len(weights)
    if k < 1 or k > n_blocks:
        raise DoesNotFit(f"cannot split {n_blocks} blocks over {k} devices")
    w = np.asarray(weights, dtype=float)
    share = w / w.sum() * n_blocks
    counts = np.maximum(np.floor(share).astype(int), 1)
    while counts.sum() > n_blocks:  # the minimum of one block pushed us over: take from the largest
        counts[int(np.argmax(np.where(counts > 1, counts - share, -np.inf)))] -= 1
    left = n_blocks - counts.sum()
    for i in np.argsort(-(share - counts), kind="stable")[:left]:
        counts[i] += 1
    out, a = [], 0
    for c in counts:
        out.append((a, a + int(c)))
        a += int(c)
    return out
