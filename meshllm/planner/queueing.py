"""The queueing estimate: predicted waiting time of a set of replicas under a workload.

Model (stated in full in ``docs/planner.md``):

- Requests arrive as a Poisson stream of rate λ. Prompts are split over prefill-capable
  replicas (PREFILL and BOTH) in proportion to their prefill capacity, and decoding over
  decode-capable replicas (DECODER and BOTH) in proportion to their decode capacity, so every
  replica of a pool runs at the same utilisation.
- A replica's prefill pipeline is an M/G/1 server whose service time is the pipeline's slowest
  resource for that prompt (``busy``); the rest of the pass (``lat - busy``) is a pure delay.
  Pollaczek–Khinchine: Wq = λ_i E[busy²] / (2 (1 - ρ_i)).
- A decoding replica has ``B`` KV slots (memory-sized). A sequence holds a slot from the
  admission of its prompt (the decoder is bound then) through the prefill pass, the KV
  hand-off and (O - 1) x τ(n) seconds of decoding, τ(n) being the time per token when n
  sequences are active (micro-batched over the stages, "No-Bubbles"). The occupancy n solves
  Little's law n = λ_j E[hold(n)]; the wait for a slot is Erlang C with B servers, corrected for
  the variability of O by Allen–Cunneen ((1 + cv²) / 2). A prompt waits for both: the simulator
  and the serving router admit a prompt only when a decoder has room for it.
- A BOTH replica gives prefill priority; decoding gets the remaining fraction (1 - ρ_prefill) of
  its time, so its τ stretches by 1 / (1 - ρ_prefill).

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
    sequences active (``tau[0]`` unused); ``batch``: KV slots (0 when it cannot decode).
    """

    role: Role
    feasible: bool
    batch: int
    busy: np.ndarray  # (K,)
    lat: np.ndarray  # (K,)
    tau: np.ndarray  # (batch + 1,)
    busy_mean: float = field(init=False)
    busy_m2: float = field(init=False)
    lat_mean: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "busy_mean", float(self.busy.mean()))
        object.__setattr__(self, "busy_m2", float((self.busy * self.busy).mean()))
        object.__setattr__(self, "lat_mean", float(self.lat.mean()))


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


def _decode_occupancy(lam: float, pre: float, steps: float, tau: np.ndarray, batch: int) -> float:
    """Fixed point of Little's law n = lam * (pre + steps * tau(n)) on [1, batch] (tau linearly
    interpolated): ``pre`` is the time a slot is held before decoding starts."""
    n = 1.0
    for _ in range(30):
        new = min(max(lam * (pre + steps * _tau_at(tau, n)), 1.0), float(batch))
        if abs(new - n) < 1e-6:
            break
        n = new
    return n


def _tau_at(tau: np.ndarray, n: float) -> float:
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


def estimate(perfs: Sequence[ReplicaPerf], workload: Workload, kv_s: np.ndarray,
             tie_break: float = 0.01) -> Estimate:
    """Predicted figures and the GA fitness for ``perfs`` under ``workload``.

    ``kv_s[i, j]``: KV hand-off seconds for a mean-length prompt from replica i to replica j.
    Fitness = mean_wait_s + ``tie_break`` * mean_e2e_s when every server is below saturation
    (the small end-to-end term orders plans that all wait ~0 at light load), else
    OVERLOAD * (1 + worst utilisation); INFEASIBLE-scaled when memory or a phase is missing.
    """
    lam = workload.arrival_rate
    eo1, cv2 = _decode_steps(workload.output_len)
    n_bad = sum(not p.feasible for p in perfs)
    pre = [i for i, p in enumerate(perfs) if p.role in (Role.PREFILL, Role.BOTH)]
    dec = [i for i, p in enumerate(perfs) if p.role in (Role.DECODER, Role.BOTH)]
    has_p = any(p.role == Role.PREFILL for p in perfs)
    has_d = any(p.role == Role.DECODER for p in perfs)
    if not perfs or n_bad or not pre or (has_p and not has_d) or (has_d and not pre):
        return Estimate(INFEASIBLE * (1 + n_bad + (not perfs)), Predicted(), math.inf)

    mu = np.array([1 / perfs[i].busy_mean for i in pre])
    x = mu / mu.sum()  # prefill shares
    rho_p = {i: lam * x[q] * perfs[i].busy_mean for q, i in enumerate(pre)}
    wq_p = np.zeros(len(pre))
    lat_p = np.array([perfs[i].lat_mean for i in pre])
    utils = list(rho_p.values())
    for q, i in enumerate(pre):
        r = rho_p[i]
        if r < 1:
            wq_p[q] = lam * x[q] * perfs[i].busy_m2 / (2 * (1 - r))

    # A decoder's KV room is reserved when the prompt is admitted (the simulator and the router
    # bind the decoder then), so a slot is held for the prefill pass and the hand-off too.
    hold0 = np.zeros(len(dec))
    for r, j in enumerate(dec):
        hold0[r] = sum(x[q] * (lat_p[q] + (0.0 if i == j else float(kv_s[i, j])))
                       for q, i in enumerate(pre))
    stretch = {j: 1 / (1 - rho_p[j]) if perfs[j].role == Role.BOTH and rho_p[j] < 1 else
               (math.inf if perfs[j].role == Role.BOTH else 1.0) for j in dec}
    # decode capacity (requests/s with every slot busy), after the prefill share of BOTH replicas
    cap = np.array([perfs[j].batch / (hold0[r] + eo1 * float(perfs[j].tau[perfs[j].batch]) * stretch[j])
                    for r, j in enumerate(dec)])
    y = cap / cap.sum() if cap.sum() > 0 and np.isfinite(cap.sum()) else np.full(len(dec), 1 / len(dec))
    wq_d = np.zeros(len(dec))
    s_d = np.zeros(len(dec))
    for q, j in enumerate(dec):
        p = perfs[j]
        if not math.isfinite(stretch[j]):
            utils.append(math.inf)
            continue
        lam_j = lam * y[q]
        n = _decode_occupancy(lam_j, hold0[q], eo1 * stretch[j], p.tau, p.batch)
        s_d[q] = eo1 * _tau_at(p.tau, n) * stretch[j]
        hold = hold0[q] + s_d[q]
        a = lam_j * hold
        utils.append(a / p.batch)
        if a < p.batch and hold > 0:
            # Allen-Cunneen: only the decode part varies with the output length
            cv2_hold = cv2 * (s_d[q] / hold) ** 2
            wq_d[q] = erlang_c(p.batch, a) * hold / (p.batch - a) * (1 + cv2_hold) / 2
    max_util = max(utils)

    # KV hand-off: BOTH replicas keep their own prompts' KV (no transfer)
    kv = 0.0
    for q, i in enumerate(pre):
        for r, j in enumerate(dec):
            kv += x[q] * y[r] * (0.0 if i == j else float(kv_s[i, j]))

    wait = float(x @ wq_p + y @ wq_d)
    ttft = wait + float(x @ lat_p)
    e2e = ttft + kv + float(y @ s_d)
    pre_cap = float(mu.sum())
    tau_full = [float(perfs[j].tau[perfs[j].batch]) for j in dec]
    dec_cap = float(sum(perfs[j].batch / (hold0[r] + eo1 * t)
                        for r, (j, t) in enumerate(zip(dec, tau_full, strict=True))))
    thr = float(sum(perfs[j].batch / t for j, t in zip(dec, tau_full, strict=True)))
    lat_tok = min(
        (perfs[i].lat_mean + (0.0 if i == j else float(kv_s[i, j]))
         + eo1 * float(perfs[j].tau[1])) / (eo1 + 1)
        for i in pre for j in dec)
    overloaded = max_util >= 1
    pred = Predicted(latency_ms_per_token=lat_tok * 1000, throughput_tps=thr,
                     prefill_capacity_rps=pre_cap, decode_capacity_rps=dec_cap,
                     mean_wait_s=math.inf if overloaded else wait,
                     mean_ttft_s=math.inf if overloaded else ttft,
                     mean_e2e_s=math.inf if overloaded else float(e2e))
    fitness = OVERLOAD * (1 + max_util) if overloaded else wait + tie_break * e2e
    return Estimate(float(fitness), pred, float(max_util))


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
