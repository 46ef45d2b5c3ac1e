"""The queueing estimate: predicted waiting time of a set of replicas under a workload.

Model (stated in full in ``docs/planner.md``), following how requests are served:

- Requests arrive as a Poisson stream of rate λ. A BOTH replica serves its own requests from
  prompt to last token; a PREFILL replica hands each prompt's KV cache to a DECODER replica.
  Arrivals split over the BOTH replicas and the prefill/decoder pool in proportion to their
  capacities; inside the pool, prompts split over the PREFILL replicas in proportion to their
  prefill capacity and hand-offs over the DECODER replicas in proportion to their decode
  capacity, so replicas of a kind run at about the same utilisation.
- A replica's prefill pipeline is a server whose service time is the pipeline's slowest
  resource for that prompt (``busy``; the stages are separate nodes and overlap different
  prompts); the rest of the pass (``lat - busy``) is a pure delay. The router starts a prompt
  on whichever replica can start it first, so the PREFILL replicas are one M/G/c queue: Erlang
  C with the Allen–Cunneen correction, the servers' rates summed; with one replica,
  Pollaczek–Khinchine: Wq = λ E[busy²] / (2 (1 - ρ)). The BOTH replicas, likewise, are one
  M/G/c queue of prompts (the router sends a request to the BOTH replica that can start it
  soonest).
- A prompt's KV goes from its prefill replica to its decoder over the links between them;
  each (prefill, decoder) pair is an M/G/1 queue of hand-offs (links are first come first
  served).
- A decoding replica has ``B`` KV slots (memory-sized). A sequence holds a slot from the
  admission of its prompt (the decoder is bound then) through the prefill pass, the KV
  hand-off and its queueing, and (O - 1) x τ(n) seconds of decoding, τ(n) being the time per
  token when n sequences are active (micro-batched over the stages, "No-Bubbles"). The
  occupancy n solves Little's law n = λ_j E[hold(n)]. The router takes any decoder with room,
  so the decoders' slots form one pool (and the BOTH replicas' slots another): the wait for a
  slot is Erlang C with c = the pool's slots, corrected for the variability of O by
  Allen–Cunneen ((1 + cv²) / 2). A prompt waits for both: the simulator and the serving router
  admit a prompt only when a decoder has room for it.
- A BOTH replica serves prompts and decode micro-batches first come first served on every
  resource (each device's compute, each link between stages): each token's micro-batch waits,
  at every resource, for the prompt work queued there — the M/G/1 wait λ E[S_r²] / (2 (1 - ρ_r))
  of resource r under the prompt load alone, summed over the resources and added to τ — and
  a prompt also waits for the decode micro-batches queued ahead of it at the bottleneck stage
  (half of those in flight, when the replica is decoding).

``mean_wait_s`` = prefill queueing + decode slot queueing (arrival to prefill start);
``mean_ttft_s`` adds the prefill pass; ``mean_e2e_s`` adds the KV hand-off and decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from meshllm.planner.types import LengthDist, Predicted, Role, Workload

OVERLOAD = 1e3  # fitness of an overloaded set of replicas: OVERLOAD * (1 + worst utilisation)
INFEASIBLE = 1e6  # fitness of a set that does not fit in memory or lacks a phase


@dataclass(frozen=True, slots=True, eq=False)
class ReplicaPerf:
    """What the queueing estimate needs to know about one replica.

    ``busy[k]`` / ``lat[k]``: prefill bottleneck and end-to-end pass time for the k-th of the
    workload's representative prompt lengths; ``tau[n]``: seconds per generated token with n
    sequences active (``tau[0]`` unused); ``batch``: KV slots (0 when it cannot decode);
    ``ahead[n]``: decode work a new prompt finds queued before it at the bottleneck stage of a
    BOTH replica with n sequences active (stages serve prefill and decode first come first
    served); ``res_m1`` / ``res_m2``: mean and second moment of the time a prompt occupies each
    resource of the replica (each device's compute, each link between stages).
    """

    role: Role
    feasible: bool
    batch: int
    busy: np.ndarray  # (K,)
    lat: np.ndarray  # (K,)
    tau: np.ndarray  # (batch + 1,)
    ahead: np.ndarray = field(default_factory=lambda: np.zeros(1))  # (batch + 1,)
    res_m1: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) prompt time per resource
    res_m2: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) its second moment
    busy_mean: float = field(init=False)
    busy_m2: float = field(init=False)
    lat_mean: float = field(init=False)
    tau_l: list = field(init=False)  # ``tau`` and ``ahead`` as Python floats: the estimate
    ahead_l: list = field(init=False)  # reads them one at a time, thousands of times per GA run
    res_l: list = field(init=False)  # (``res_m1``, ``res_m2``) per resource, Python floats
    res_max: float = field(init=False)  # the largest ``res_m1`` (0 with no resources)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau_l", self.tau.tolist())
        object.__setattr__(self, "ahead_l", self.ahead.tolist())
        object.__setattr__(self, "res_l", list(zip(self.res_m1.tolist(), self.res_m2.tolist(), strict=True)))
        object.__setattr__(self, "res_max", float(self.res_m1.max()) if len(self.res_m1) else 0.0)
        k = len(self.busy)  # (sum / count: numpy's mean, bit for bit, without its overhead)
        object.__setattr__(self, "busy_mean", float(self.busy.sum()) / k)
        object.__setattr__(self, "busy_m2", float((self.busy * self.busy).sum()) / k)
        object.__setattr__(self, "lat_mean", float(self.lat.sum()) / len(self.lat))


def erlang_c(c: int, a: float) -> float:
    """Probability an arrival waits in an M/M/c queue with offered load ``a`` (< c)."""
    if a <= 0:
        return 0.0
    # recursive Erlang B, numerically stable for large c
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    rho = a / c
    return b / (1 - rho + rho * b)


@dataclass(frozen=True, slots=True)
class Estimate:
    fitness: float
    predicted: Predicted
    max_util: float


def _decode_occupancy(lam: float, pre: float, steps: float, tau: Sequence[float], batch: int) -> float:
    """Fixed point of Little's law n = lam * (pre + steps * tau(n)) on [1, batch] (tau linearly
    interpolated): ``pre`` is the time a slot is held before decoding starts."""
    n = 1.0
    for _ in range(30):
        new = min(max(lam * (pre + steps * _tau_at(tau, n)), 1.0), float(batch))
        if abs(new - n) < 1e-6:
            break
        n = new
    return n


def _tau_at(tau: Sequence[float], n: float) -> float:
    lo = int(min(max(math.floor(n), 1), len(tau) - 1))
    hi = min(lo + 1, len(tau) - 1)
    return float(tau[lo] + (tau[hi] - tau[lo]) * (n - lo))


@lru_cache(maxsize=64)
def _decode_steps(dist: LengthDist) -> tuple[float, float]:
    """Mean decode steps per request (output length - 1) and their squared coefficient of
    variation. Memoised: a pure function of a frozen value."""
    o1 = np.maximum(dist.quantiles(64) - 1, 0)
    eo1, eo1_2 = float(o1.mean()), float((o1 * o1).mean())
    return eo1, ((eo1_2 - eo1 ** 2) / eo1 ** 2 if eo1 > 0 else 0.0)


@lru_cache(maxsize=64)
def _cv2(dist: LengthDist) -> float:
    """Squared coefficient of variation of a length distribution (memoised)."""
    q = dist.quantiles(64)
    m = float(q.mean())
    return float(q.var()) / (m * m) if m > 0 else 0.0


def _slot_wait(slots: int, load: float, lam: float, dec_work: float, cv2: float) -> float:
    """M/G/c wait for one of ``slots`` KV slots at offered load ``load`` (Erlang C with an
    Allen-Cunneen correction for the part of the holding time that varies with the output)."""
    if lam <= 0 or load <= 0 or load >= slots:
        return 0.0
    hold_mean = load / lam
    cv2_hold = cv2 * (dec_work / load) ** 2
    return erlang_c(slots, load) * hold_mean / (slots - load) * (1 + cv2_hold) / 2


def _pool_wait(lam: float, means: Sequence[float], m2s: Sequence[float], x: Sequence[float]) -> float:
    """Mean wait for a server in a pool of c servers that share one queue (the router's
    ``"start"`` policy: a prompt goes to whichever replica can start it first, never queues for
    one while another is free): M/G/c, Erlang C with the Allen–Cunneen correction, the servers'
    rates summed (heterogeneous servers: the queue drains at the pool's rate once all are busy).
    ``means`` / ``m2s``: each server's service time moments; ``x``: the share of prompts each
    serves (in proportion to its rate). With one server this is Pollaczek–Khinchine."""
    mu = float(sum(1 / s for s in means))
    if lam <= 0 or lam >= mu:
        return 0.0
    c = len(means)
    es = float(sum(xi * s for xi, s in zip(x, means, strict=True)))
    es2 = float(sum(xi * s2 for xi, s2 in zip(x, m2s, strict=True)))
    cv2 = max(es2 / (es * es) - 1, 0.0) if es > 0 else 0.0
    return erlang_c(c, c * lam / mu) * (1 + cv2) / 2 / (mu - lam)


def estimate(perfs: Sequence[ReplicaPerf], workload: Workload, kv_s: np.ndarray,
             tie_break: float = 1e-3, figures: bool = True) -> Estimate:
    """Predicted figures and the GA fitness for ``perfs`` under ``workload``.

    ``kv_s[i, j]``: KV hand-off seconds for a mean-length prompt from replica i to replica j.
    A BOTH replica serves its own requests start to end; a PREFILL replica hands its prompts
    to the DECODER replicas. Arrivals split over the BOTH replicas and the prefill/decoder pool
    in proportion to their capacities.
    Fitness = mean_wait_s + ``tie_break`` * mean_e2e_s when every server is below saturation
    (the small end-to-end term orders plans that all wait ~0 at light load), else
    OVERLOAD * (1 + worst utilisation) (:func:`overload_fitness`); INFEASIBLE-scaled when memory
    or a phase is missing. With ``figures=False`` (the GA's thousands of looks) only the
    fitness, the waits and the worst utilisation are computed; the headline capacities,
    throughput and latency are left unset.

    The replicas are few (a handful per role), so the arithmetic runs on Python floats: at
    these sizes each numpy call costs more than the loop it replaces.
    """
    lam = workload.arrival_rate
    eo1, cv2 = _decode_steps(workload.output_len)
    cv2_in = _cv2(workload.input_len)
    n_bad = sum(not p.feasible for p in perfs)
    pre = [p for p in perfs if p.role == Role.PREFILL]
    dec = [p for p in perfs if p.role == Role.DECODER]
    both = [p for p in perfs if p.role == Role.BOTH]
    if not perfs or n_bad or (pre and not dec) or (dec and not pre):
        return Estimate(INFEASIBLE * (1 + n_bad + (not perfs)), Predicted(), math.inf)
    pre_i = [i for i, p in enumerate(perfs) if p.role == Role.PREFILL]
    dec_i = [i for i, p in enumerate(perfs) if p.role == Role.DECODER]

    # --- capacities at zero load, to split the arrivals ----------------------------------
    caps = [min(1 / p.busy_mean, p.batch / (p.lat_mean + eo1 * p.tau_l[p.batch])) for p in both]
    n_pre, n_dec = len(pre), len(dec)
    if pre:
        mu = [1 / p.busy_mean for p in pre]
        mu_sum = sum(mu)
        x = [v / mu_sum for v in mu]  # prefill shares inside the pool
        lat_p = [p.lat_mean for p in pre]
        kv = [[float(kv_s[i, j]) for j in dec_i] for i in pre_i]  # (P, D)
        full = [eo1 * p.tau_l[p.batch] for p in dec]

        def decode_shares(hold0: list[float]) -> tuple[list[float], float]:
            cap = [p.batch / (h + f) for p, h, f in zip(dec, hold0, full, strict=True)]
            tot = sum(cap)
            if tot > 0 and math.isfinite(tot):
                return [c / tot for c in cap], tot
            return [1 / n_dec] * n_dec, tot

        y, dec_cap_pool = decode_shares([sum([x[q] * (lat_p[q] + kv[q][r]) for q in range(n_pre)])
                                         for r in range(n_dec)])
        caps.append(min(mu_sum, dec_cap_pool))
    cap_sum = sum(caps)
    share = [c / cap_sum for c in caps] if cap_sum > 0 else [1 / len(caps)] * len(caps)

    max_util = 0.0
    wait = ttft = e2e = 0.0

    # --- BOTH replicas: one queue for their prompts, one pool of their slots -----------------
    # the router sends a request to whichever BOTH replica can start it soonest (the simulator's
    # "start" policy: its queued prompts and its wait for a slot of its own), or serving to the
    # least loaded one with room (``serve/router.py``: the least predicted decode time, scaled by
    # the sequences it runs): the load follows whichever replica is free, as one queue would. So,
    # as for PREFILL replicas, the BOTH replicas' prompts are one M/G/c queue and their slots one
    # pool, not each its own
    b_lam, b_mean, b_m2, b_extra, b_lat, b_dec = [], [], [], [], [], []
    b_slots, b_load, b_work = 0, 0.0, 0.0
    b_ok, b_rho = True, 0.0
    for k, p in enumerate(both):
        lam_b = lam * share[k]
        # the prompt load on the slowest resource, and on each resource: a resource's mean is
        # at most the pipeline's bottleneck in exact arithmetic, but the two are summed in
        # different orders, and near saturation one can round to >= 1 while the other is < 1
        rho = max(lam_b * p.busy_mean, lam_b * p.res_max)
        max_util = max(max_util, rho)
        if rho >= 1:
            # past saturation the offered load still counts on the slots too (at a full batch),
            # so the worst utilisation keeps growing with the rate whichever resource binds
            max_util = max(max_util, lam_b * (p.lat_mean + eo1 * p.tau_l[p.batch]) / p.batch)
            b_ok = False
            continue
        # every token's micro-batch meets the prompts at each resource (device compute, link)
        # first come first served: it waits for the prompt work queued there, the M/G/1 wait of
        # that resource under the prompt load alone (a 12 MB activation over 50 Mb/s holds a
        # link for 2 s, and every token behind it waits)
        hol = sum([lam_b * m2 / (2 * (1 - lam_b * m1)) for m1, m2 in p.res_l])
        n = _decode_occupancy(lam_b, p.lat_mean + eo1 * hol, eo1, p.tau_l, p.batch)
        s_dec = eo1 * (_tau_at(p.tau_l, n) + hol)
        a = lam_b * (p.lat_mean + s_dec)
        max_util = max(max_util, a / p.batch)
        # a prompt queues behind the decode micro-batches at its replica's bottleneck stage
        extra = _tau_at(p.ahead_l, n) * min(1.0, a) if len(p.ahead_l) > 1 and eo1 > 0 else 0.0
        b_rho = rho  # (the one replica's, read when there is only one)
        b_lam.append(lam_b)
        b_mean.append(p.busy_mean)
        b_m2.append(p.busy_m2)
        b_extra.append(extra)
        b_lat.append(p.lat_mean)
        b_dec.append(s_dec)
        b_slots += p.batch
        b_load += a
        b_work += lam_b * s_dec
    if both and b_ok:
        lam_B = sum(b_lam)
        if len(both) == 1:  # Pollaczek–Khinchine, its own M/G/1 queue (what _pool_wait gives for one)
            wq_B = lam_B * b_m2[0] / (2 * (1 - b_rho))
        else:
            xb = [v / lam_B for v in b_lam] if lam_B > 0 else [1 / len(b_lam)] * len(b_lam)
            wq_B = _pool_wait(lam_B, b_mean, b_m2, xb)
        wq_B += _slot_wait(b_slots, b_load, lam_B, b_work, cv2)
        for k in range(len(both)):
            wq = wq_B + b_extra[k]
            wait += share[k] * wq
            ttft += share[k] * (wq + b_lat[k])
            e2e += share[k] * (wq + b_lat[k] + b_dec[k])

    # --- the prefill/decoder pool -------------------------------------------------------------
    if pre:
        lam_pd = lam * share[-1]
        rho_p = [lam_pd * x[q] * p.busy_mean for q, p in enumerate(pre)]
        max_util = max(max_util, *rho_p)

        def link_wait(y: list[float]) -> tuple[list[list[float]], float]:
            # each (prefill, decoder) pair's hand-offs queue first come first served on the
            # links between them: M/G/1 per pair, the transfer varying with the prompt length
            w, top = [], 0.0
            for q in range(n_pre):
                row = []
                for r in range(n_dec):
                    t = kv[q][r]
                    rho = lam_pd * x[q] * y[r] * t
                    top = max(top, rho)
                    row.append(rho * t * (1 + cv2_in) / (2 * (1 - rho)) if rho < 1 else 0.0)
                w.append(row)
            return w, top

        def holds(w: list[list[float]]) -> list[float]:
            return [sum([x[q] * (lat_p[q] + kv[q][r] + w[q][r]) for q in range(n_pre)]) for r in range(n_dec)]

        # a decoder's KV room is reserved when the prompt is admitted (the simulator and the
        # router bind the decoder then): a slot is held for the prefill pass and the hand-off
        w_kv, _ = link_wait(y)
        y, _ = decode_shares(holds(w_kv))
        w_kv, top = link_wait(y)
        hold0 = holds(w_kv)
        max_util = max(max_util, top)
        s_d = [0.0] * n_dec
        slots, load, dec_work = 0, 0.0, 0.0
        for q, p in enumerate(dec):
            lam_j = lam_pd * y[q]
            n = _decode_occupancy(lam_j, hold0[q], eo1, p.tau_l, p.batch)
            s_d[q] = eo1 * _tau_at(p.tau_l, n)
            a = lam_j * (hold0[q] + s_d[q])
            max_util = max(max_util, a / p.batch)
            slots += p.batch
            load += a
            dec_work += lam_j * s_d[q]
        # the router takes any decoder with room: the decoders' slots form one pool
        # the router starts a prompt on whichever PREFILL replica can start it first: the
        # replicas are one multi-server queue, not each its own (see :func:`_pool_wait`)
        if n_pre == 1:
            wq_pre = lam_pd * pre[0].busy_m2 / (2 * (1 - rho_p[0])) if rho_p[0] < 1 else 0.0
        else:
            wq_pre = _pool_wait(lam_pd, [p.busy_mean for p in pre], [p.busy_m2 for p in pre], x)
        wq = wq_pre + _slot_wait(slots, load, lam_pd, dec_work, cv2)
        lat_x = sum([xq * lq for xq, lq in zip(x, lat_p, strict=True)])
        handoff = sum([y[r] * sum([x[q] * (kv[q][r] + w_kv[q][r]) for q in range(n_pre)])
                        for r in range(n_dec)])
        wait += share[-1] * wq
        ttft += share[-1] * (wq + lat_x)
        e2e += share[-1] * (wq + lat_x + handoff + sum([yr * sr for yr, sr in zip(y, s_d, strict=True)]))
    overloaded = max_util >= 1
    fitness = overload_fitness(max_util) if overloaded else wait + tie_break * e2e
    if not figures:
        return Estimate(float(fitness), Predicted(), float(max_util))

    # --- headline figures ------------------------------------------------------------------
    pre_cap = sum([1 / p.busy_mean for p in pre + both])
    dec_cap = sum(caps[:len(both)]) + (dec_cap_pool if pre else 0.0)
    thr = sum([p.batch / p.tau_l[p.batch] for p in dec + both])
    paths = [(p.lat_mean + eo1 * p.tau_l[1]) / (eo1 + 1) for p in both]
    paths += [(perfs[i].lat_mean + float(kv_s[i, j]) + eo1 * perfs[j].tau_l[1]) / (eo1 + 1)
              for i in pre_i for j in dec_i]
    pred = Predicted(latency_ms_per_token=min(paths) * 1000, throughput_tps=thr,
                     prefill_capacity_rps=pre_cap, decode_capacity_rps=dec_cap,
                     mean_wait_s=math.inf if overloaded else float(wait),
                     mean_ttft_s=math.inf if overloaded else float(ttft),
                     mean_e2e_s=math.inf if overloaded else float(e2e))
    return Estimate(float(fitness), pred, float(max_util))


def overload_fitness(max_util: float) -> float:
    """OVERLOAD x (1 + worst utilisation), up to a utilisation of 100; above it the growth is
    logarithmic (still increasing, so the least overloaded plan still wins) and stays below
    INFEASIBLE: a rate 10^300 times what any plan serves is an overloaded plan, not one that
    does not fit."""
    u = min(max_util, 100.0) + math.log1p(max(max_util - 100.0, 0.0))
    return OVERLOAD * (1 + min(u, 900.0))


def saturation_rate(perfs: Sequence[ReplicaPerf], workload: Workload, kv_s: np.ndarray,
                    hi: float = 1e6) -> float:
    """Arrival rate (requests/s) at which the worst utilisation reaches 1 (bisection)."""
    lo_r, hi_r = 0.0, 1.0
    while hi_r < hi and estimate(perfs, workload.with_rate(hi_r), kv_s).max_util < 1:
        hi_r *= 2
    for _ in range(50):
        mid = (lo_r + hi_r) / 2
        if estimate(perfs, workload.with_rate(mid), kv_s).max_util < 1:
            lo_r = mid
        else:
            hi_r = mid
    return lo_r
