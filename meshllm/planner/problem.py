"""A planning problem with its cost tables computed once: model profile x devices x network x
workload. Strategies, the GA and ``meshllm plan --json`` all read the same tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from meshllm.errors import ConfigError, DoesNotFit, PlanError
from meshllm.planner import cost
from meshllm.planner.cost import EFFICIENCY, TOKEN_BYTES, Efficiency, ModelProfile
from meshllm.planner.dp import Partition, split_partition
from meshllm.planner.queueing import Estimate, ReplicaPerf, estimate, saturation_rate
from meshllm.planner.types import Device, Network, Predicted, Replica, Role, Stage, Workload

N_QUANT = 32  # representative prompt lengths for the prefill moments


def check_workload(w: Workload, max_context: int = 0) -> None:
    """Refuse, with one line, a workload no plan can serve: a sequence longer than the model's
    context window (at the percentile whose KV the plan sizes memory for). The commands that
    plan what an operator asks (``meshllm plan``, ``meshllm simulate``) call it; a node plans its
    configured workload regardless (the serving layer refuses a request beyond the context)."""
    if max_context > 0 and w.target_len > max_context:
        i, o = w.input_len.percentile(w.kv_percentile), w.output_len.percentile(w.kv_percentile)
        raise ConfigError(f"workload: a prompt of {i} tokens and an output of {o} (p{w.kv_percentile:g}) "
                          f"exceed the model's context of {max_context} tokens; shorten them "
                          "(or clip a lognormal length with its MAX)")


@dataclass(eq=False)
class Problem:
    """Inputs plus precomputed tables (index j = position in ``devices``):

    - ``pre[k]`` (K, M, N): prefill seconds per block for the k-th representative prompt length
      ``t_in[k]``; ``pre_mean`` (M, N) at the mean prompt length
    - ``dec[b]`` (B+1, M, N): one decode step of ``b`` sequences at the mean context
    - ``bw``, ``rtt`` (M, M)
    - memoised replica evaluations (pure: same inputs, same answer)
    """

    profile: ModelProfile
    devices: tuple[Device, ...]
    network: Network
    workload: Workload
    eff: Efficiency = EFFICIENCY
    t_in: np.ndarray = field(init=False)
    pre: np.ndarray = field(init=False)
    pre_mean: np.ndarray = field(init=False)
    dec: np.ndarray = field(init=False)
    bw: np.ndarray = field(init=False)
    rtt: np.ndarray = field(init=False)
    mem: np.ndarray = field(init=False)
    ctx: float = field(init=False)
    _cache: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.devices:
            raise PlanError("no devices to plan over")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise PlanError("device names must be unique")
        p, w = self.profile, self.workload
        q = w.input_len.quantiles(N_QUANT)
        self.t_in = q
        self.pre = np.stack([cost.prefill_table(p, self.devices, float(t), self.eff) for t in q])
        self.pre_mean = cost.prefill_table(p, self.devices, w.input_len.mean, self.eff)
        self.ctx = w.input_len.mean + w.output_len.mean / 2
        self.dec = np.stack([np.zeros((len(self.devices), p.n_blocks))] + [
            cost.decode_table(p, self.devices, b, self.ctx, self.eff)
            for b in range(1, w.max_batch + 1)])
        self.bw, self.rtt = self.network.matrices(names)
        self.mem = np.array([float(d.memory_bytes) for d in self.devices])
        # a stage's work after its device idled costs idle_s + idle_frac x its step (cost.idle_time)
        self.idle_s = np.array([d.idle_step_s for d in self.devices])
        self.idle_frac = np.array([d.idle_step_frac for d in self.devices])
        self._pre_prefix = np.concatenate([np.zeros((*self.pre.shape[:-1], 1)),
                                           np.cumsum(self.pre, axis=-1)], axis=-1)
        self._dec_prefix = np.concatenate([np.zeros((*self.dec.shape[:-1], 1)),
                                           np.cumsum(self.dec, axis=-1)], axis=-1)
        self.index = {n: j for j, n in enumerate(names)}
        self.t_mean = w.input_len.mean
        self._kv_prefix = np.concatenate([[0.0], np.cumsum(p.kv)])
        self._kv_prefix_l = self._kv_prefix.tolist()
        self._ranges: dict[tuple[int, int], tuple[float, float]] = {}
        self._source = next((j for j, d in enumerate(self.devices) if d.source), None)
        self._bw_l, self._rtt_l = self.bw.tolist(), self.rtt.tolist()
        self.in_pct = w.input_len.percentile(w.kv_percentile)
        self.target_len = w.target_len

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    @property
    def n_blocks(self) -> int:
        return self.profile.n_blocks

    @property
    def source(self) -> int | None:
        """Index of the first device flagged as the source, or None."""
        return self._source

    def link(self, nbytes: np.ndarray | float, a: int, b: int) -> np.ndarray | float:
        """Transfer seconds of ``nbytes`` from device a to device b (cost.transfer_time)."""
        if a == b:
            return np.zeros_like(nbytes) if isinstance(nbytes, np.ndarray) else 0.0
        return self.rtt[a, b] / 2 + nbytes / self.bw[a, b]

    # --- memory -------------------------------------------------------------------------
    def req(self, kv_tokens: float) -> np.ndarray:
        """(N,) bytes per block: weights + KV for ``kv_tokens`` tokens of context."""
        return self.profile.param_bytes + self.profile.kv * kv_tokens

    def decode_batch(self, stages: Sequence[tuple[int, int, int]]) -> int:
        """Sequences the stages decode at once: KV room for sequences of the workload's target
        length (prompt and output percentiles), capped by ``max_batch``; 0 when not even one
        fits next to the weights. Counting at the percentile, not the mean, is deliberate: KV
        room is reserved per request at its real length, first come first served, so a long
        request at the head of the queue blocks the ones behind it; a replica whose room holds
        only a few long requests really does serve like a replica with few slots."""
        best = self.workload.max_batch
        per_dev: dict[int, tuple[float, float]] = {}
        for j, a, b in stages:
            wb, kv = per_dev.get(j, (0.0, 0.0))
            rw, rk = self._range_bytes(a, b)
            per_dev[j] = (wb + rw, kv + rk)
        for j, (wb, kv) in per_dev.items():
            free = self.mem[j] - wb
            if free < 0:
                return 0
            if kv > 0:
                best = min(best, int(free // (kv * self.target_len)))
        return max(best, 0)

    def prefill_fits(self, stages: Sequence[tuple[int, int, int]]) -> bool:
        """Weights + KV of one prompt (at the prompt percentile) fit."""
        tokens = self.in_pct
        per_dev: dict[int, float] = {}
        for j, a, b in stages:
            rw, rk = self._range_bytes(a, b)
            per_dev[j] = per_dev.get(j, 0.0) + rw + rk * tokens
        return all(v <= self.mem[j] for j, v in per_dev.items())

    def _range_bytes(self, a: int, b: int) -> tuple[float, float]:
        """Weight bytes and KV bytes per token of blocks ``[a, b)`` (memoised per range)."""
        got = self._ranges.get((a, b))
        if got is None:
            got = self._ranges[(a, b)] = (self.profile.weight_bytes(a, b), self.profile.kv_bytes_per_token(a, b))
        return got

    # --- a replica's performance --------------------------------------------------------
    def perf(self, stages: Sequence[tuple[int, int, int]], role: Role) -> ReplicaPerf:
        """Prefill and decode figures of a replica given as ``(device index, first, end)``."""
        p = self.profile
        s_n = len(stages)
        dev, a_, b_ = np.array(stages, dtype=np.int64).reshape(s_n, 3).T
        # prefill, per representative prompt length
        comp = self._pre_prefix[:, dev, b_] - self._pre_prefix[:, dev, a_]  # (K, S)
        # each link into a stage carries the activations at its first block; a device to
        # itself costs nothing (:meth:`link`)
        hop = dev[:-1] != dev[1:]
        hop_act, hop_bw, hop_rtt = p.act[a_[1:] - 1], self.bw[dev[:-1], dev[1:]], self.rtt[dev[:-1], dev[1:]]
        comm = np.zeros_like(comp)
        comm[:, 1:] = np.where(hop, hop_rtt / 2 + (hop_act * self.t_in[:, None]) / hop_bw, 0.0)
        ret = float(self.link(float(TOKEN_BYTES), dev[-1], dev[0]))
        # a device holding several stages (the source with embedding and head) is one server:
        # its stages' compute adds up before the slowest resource is taken
        # (C order either way: the means below sum in memory order, and must not change)
        distinct = len({s[0] for s in stages}) == s_n  # the GA's replicas: one stage per device
        owners = [] if distinct else [dev == j for j in dict.fromkeys(dev.tolist())]
        node = np.ascontiguousarray(comp) if distinct \
            else np.stack([comp[:, o].sum(axis=1) for o in owners], axis=1)  # (K, devices)
        busy = np.maximum(np.maximum(node.max(axis=1), comm.max(axis=1)), ret)
        # every resource a prompt occupies (each device's compute, each link into a stage),
        # first come first served: a BOTH replica's decode micro-batches queue behind it there
        res = np.concatenate([node, comm[:, 1:]], axis=1)  # (K, resources)
        # what each stage's work costs more after it idled (cost.idle_time: its step at batch 1)
        step1 = self._dec_prefix[1, dev, b_] - self._dec_prefix[1, dev, a_]  # (S,)
        idle = np.where(step1 > 0, np.maximum(0.0, self.idle_s[dev] + self.idle_frac[dev] * step1), 0.0)  # (S,)
        # a prompt alone finds every stage idle
        lat = comp.sum(axis=1) + comm.sum(axis=1) + ret + float(idle.sum())
        feasible = True
        batch = 0
        tau = np.full(1, math.inf)
        stage_busy = np.zeros(1)
        if role in (Role.DECODER, Role.BOTH):
            batch = self.decode_batch(stages)
            feasible = batch >= 1
        if role == Role.PREFILL:
            feasible = self.prefill_fits(stages)
        if batch >= 1:
            n = np.arange(1, batch + 1)
            g = np.minimum(n, s_n)  # micro-batches in flight
            x = np.ceil(n / g).astype(int)  # sequences per micro-batch
            dcomp = self._dec_prefix[x[:, None], dev[None, :], b_[None, :]] \
                - self._dec_prefix[x[:, None], dev[None, :], a_[None, :]]  # (B, S)
            dcomm = np.zeros_like(dcomp)
            dcomm[:, 1:] = np.where(hop, hop_rtt / 2 + (hop_act * x[:, None]) / hop_bw, 0.0)
            dret = self.link(TOKEN_BYTES * x.astype(float), dev[-1], dev[0])
            one_pass = dcomp.sum(axis=1) + dcomm.sum(axis=1) + dret
            # fewer micro-batches than stages: each stage idles while the others compute, and
            # its next step comes back to it cold (cost.idle_time); a one-stage ring never idles
            one_pass = one_pass + np.where(g < s_n, float(idle.sum()), 0.0)
            dnode = np.ascontiguousarray(dcomp) if distinct \
                else np.stack([dcomp[:, o].sum(axis=1) for o in owners], axis=1)  # (B, devices)
            slow = np.maximum(np.maximum(dnode.max(axis=1), dcomm.max(axis=1)), dret)
            tau = np.concatenate([[math.inf], np.maximum(one_pass, g * slow)])
            # work a prompt finds ahead of it at the bottleneck stage: half the micro-batches
            stage_busy = np.concatenate([[0.0], 0.5 * g * slow])
        k = len(res)
        return ReplicaPerf(role, feasible, batch, busy, lat, tau, stage_busy,
                           res.sum(axis=0) / k, (res * res).sum(axis=0) / k)  # (the means)

    def kv_seconds(self, reps: Sequence[Sequence[tuple[int, int, int]]],
                   pairs: tuple[Sequence[int], Sequence[int]] | None = None) -> np.ndarray:
        """(R, R) KV hand-off seconds of a mean-length prompt between replicas
        (:meth:`kv_pair` for each ordered pair of distinct replicas). With ``pairs`` (senders,
        receivers) only those entries are computed, the rest left 0 (the GA reads only prefill
        -> decoder hand-offs)."""
        r = len(reps)
        out = np.zeros((r, r))
        src, dst = pairs if pairs is not None else (range(r), range(r))
        keys = [tuple((j, a, b) for j, a, b in st) for st in reps]
        for i in src:
            for j in dst:
                if i != j:
                    out[i, j] = self.kv_pair(keys[i], keys[j])
        return out

    def kv_pair(self, send: tuple[tuple[int, int, int], ...], recv: tuple[tuple[int, int, int], ...]) -> float:
        """KV hand-off seconds of a mean-length prompt from the replica of stages ``send`` to
        the one of stages ``recv``: each block's KV goes from the device holding it to the
        device holding it on the other side; distinct device pairs transfer in parallel (as
        :func:`meshllm.planner.cost.kv_transfer_time`), so the slowest pair's time counts. A
        device holding several stages of one replica is counted per stage. Memoised per pair:
        a GA move changes one or two replicas, and the other pairs' hand-offs stay."""
        key = ("kv", send, recv)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if not send or not recv:
            self._cache[key] = 0.0
            return 0.0
        # a handful of stages on each side: Python floats beat numpy's per-call cost here
        kvp, t_mean, bw, rtt = self._kv_prefix_l, self.t_mean, self._bw_l, self._rtt_l
        out = 0.0
        for j, a, b in send:
            bw_j, rtt_j = bw[j], rtt[j]
            for k, c, d in recv:
                lo, hi = max(a, c), min(b, d)
                if hi <= lo:
                    continue
                nbytes = (kvp[hi] - kvp[lo]) * t_mean
                link = bw_j[k]
                if nbytes > 0 and math.isfinite(link):
                    out = max(out, rtt_j[k] / 2 + nbytes / link if link > 0 else math.inf)
        self._cache[key] = out
        return out

    # --- DP inside a replica --------------------------------------------------------------
    def split(self, members: Sequence[int], role: Role) -> Partition:
        """Bottleneck DP over ``members`` in that order, with the role's unit of work:
        PREFILL a mean prompt; DECODER one decode step of a micro-batch at full batch; BOTH a
        whole mean request (prompt + mean output). Memory: full target batch of KV, falling
        back to one sequence when that does not fit (the batch is then sized to what fits)."""
        key = ("split", tuple(members), role)
        hit = self._cache.get(key)
        if hit is not None:
            if isinstance(hit, DoesNotFit):
                raise hit
            return hit
        p, w = self.profile, self.workload
        s_n = len(members)
        micro = max(1, math.ceil(w.max_batch / s_n))
        t_mean = self.t_mean
        eo1 = max(w.output_len.mean - 1, 0.0)
        if role == Role.PREFILL:
            comp, tokens = self.pre_mean, t_mean
            kv_tokens = [self.in_pct * s_n, self.in_pct]
        elif role == Role.DECODER:
            comp, tokens = self.dec[micro], float(micro)
            kv_tokens = [w.max_batch * self.target_len, self.target_len]
        else:
            comp = self.pre_mean + eo1 * self.dec[micro] / micro
            tokens = t_mean + eo1
            kv_tokens = [w.max_batch * self.target_len, self.target_len]
        result: Partition | DoesNotFit = DoesNotFit("no split")
        for kvt in kv_tokens:
            try:
                result = self._bottleneck(members, (role, micro), comp, p.act * tokens, kvt,
                                          TOKEN_BYTES * tokens)
                break
            except DoesNotFit as e:
                result = e
        self._cache[key] = result
        if isinstance(result, DoesNotFit):
            raise result
        return result

    def _bottleneck(self, members: Sequence[int], unit: tuple, comp: np.ndarray, out_bytes: np.ndarray,
                    kv_tokens: float, ret_bytes: float) -> Partition:
        """:func:`meshllm.planner.dp.bottleneck_split` with its per-device tables memoised per
        unit of work (``unit`` names ``comp`` and ``out_bytes``): the GA splits thousands of
        device groups drawn from the same few devices, so each device's (first, end) block-time
        matrix, with the splits that do not fit its memory ruled out, is built once. The DP's
        row after each stage depends only on the devices up to it, so it is memoised per prefix
        of the order too: groups that start alike (the source and its fastest links, in
        :func:`meshllm.planner.ga.chain_order`) share their first stages. Same arithmetic, same
        answer (tests check it)."""
        n = self.n_blocks
        order = tuple(members)
        s_count = len(order)
        if s_count == 0 or s_count > n:
            raise DoesNotFit(f"cannot split {n} blocks over {s_count} devices")
        tkey = ("tables", unit)
        tab = self._cache.get(tkey)
        if tab is None:
            pc = np.zeros((comp.shape[0], n + 1))
            np.cumsum(comp, axis=-1, out=pc[:, 1:])
            tab = self._cache[tkey] = (pc, {})
        pc, segs = tab
        segs_: dict[tuple[float, int], np.ndarray] = segs
        mkey = ("fits", kv_tokens)
        fits = self._cache.get(mkey)
        if fits is None:
            pr = np.zeros(n + 1)
            np.cumsum(self.req(kv_tokens), out=pr[1:])
            a_idx = np.arange(n + 1)
            fits = self._cache[mkey] = (pr, pr[None, :] - pr[:, None], a_idx[:, None] < a_idx[None, :])
        pr, seg_mem, valid = fits
        a_idx = np.arange(n + 1)
        first = order[0]
        choice = np.full((s_count, n + 1), -1, dtype=np.int64)
        rows: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = \
            self._cache.setdefault(("rows", unit, kv_tokens), {})
        got = rows.get(order[:1])
        if got is None:
            d = np.full(n + 1, np.inf)
            d[1:] = np.where(pr[1:] <= self.mem[first], pc[first, 1:], np.inf)
            got = rows[order[:1]] = (d, choice[0].copy())
        d = got[0]
        for s in range(1, s_count):
            hit = rows.get(order[:s + 1])
            if hit is not None:
                d, choice[s] = hit
                continue
            dev, prv = order[s], order[s - 1]
            seg = segs_.get((kv_tokens, dev))
            if seg is None:  # (a, b): stage time of blocks [a, b) on dev; inf where they do not fit
                seg = segs_[(kv_tokens, dev)] = np.where(valid & (seg_mem <= self.mem[dev]),
                                                          pc[dev][None, :] - pc[dev][:, None], np.inf)
            bw = self.bw[prv, dev]
            comm = np.zeros(n + 1)
            comm[1:] = 0.0 if np.isinf(bw) else self.rtt[prv, dev] / 2 + out_bytes / bw
            cand = np.maximum(np.maximum(d, comm)[:, None], seg)  # (a, b)
            am = cand.argmin(axis=0)
            d = cand[am, a_idx]
            choice[s] = am
            rows[order[:s + 1]] = (d, am)
        last = order[-1]
        bw = self.bw[last, first]
        ret = 0.0 if np.isinf(bw) else float(self.rtt[last, first] / 2 + ret_bytes / bw)
        return split_partition(max(float(d[n]), ret), list(order), choice)

    def replica_perf(self, members: Sequence[int], role: Role) -> tuple[ReplicaPerf, tuple] | None:
        """DP split + performance of a replica of ``members`` (ordered); None if it cannot fit."""
        key = ("perf", tuple(members), role)
        if key in self._cache:
            return self._cache[key]
        try:
            part = self.split(members, role)
            perf = self.perf(part.stages, role)
            out: tuple[ReplicaPerf, tuple] | None = (perf, part.stages) if perf.feasible else None
        except DoesNotFit:
            out = None
        self._cache[key] = out
        return out

    # --- whole plans ----------------------------------------------------------------------
    def estimate_stages(self, reps: Sequence[tuple[Role, Sequence[tuple[int, int, int]]]],
                        with_saturation: bool = False) -> Estimate:
        """Queueing estimate for replicas given as (role, stages)."""
        perfs = [self.perf(st, role) for role, st in reps]
        kv = self.kv_seconds([st for _, st in reps])
        est = estimate(perfs, self.workload, kv)
        if with_saturation and est.predicted.prefill_capacity_rps is not None:
            sat = saturation_rate(perfs, self.workload, kv)
            pr = est.predicted
            est = Estimate(est.fitness, Predicted(
                pr.latency_ms_per_token, pr.throughput_tps, pr.prefill_capacity_rps,
                pr.decode_capacity_rps, pr.mean_wait_s, pr.mean_ttft_s, pr.mean_e2e_s, sat),
                est.max_util)
        return est

    def to_replicas(self, reps: Sequence[tuple[Role, Sequence[tuple[int, int, int]]]]) -> tuple[Replica, ...]:
        """(role, stages by device index) -> Replica values with device names."""
        names = self.names
        return tuple(Replica(i, role, tuple(Stage(names[j], (a, b)) for j, a, b in st))
                     for i, (role, st) in enumerate(reps))

    def from_replicas(self, replicas: Sequence[Replica]) -> list[tuple[Role, list[tuple[int, int, int]]]]:
        """Inverse of :meth:`to_replicas` (unknown node names raise PlanError)."""
        out = []
        for r in replicas:
            st = []
            for s in r.stages:
                if s.node not in self.index:
                    raise PlanError(f"replica {r.id}: unknown node {s.node!r}")
                st.append((self.index[s.node], s.first, s.end))
            out.append((r.role, st))
        return out
