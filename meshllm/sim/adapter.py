"""From the planner's plan and cost model to the simulator's ``SimModel``.

Every service time comes from :mod:`meshllm.planner.cost` — this module only caches and
re-slices it:

- stage compute = the sum of the cost model's per-block times over the stage's blocks
  (``prefill_block_times`` for a prompt micro-batch, ``decode_block_times`` for a decode step);
- a transfer = ``cost.transfer_time`` over the network's bandwidth and RTT for that pair;
- a stage's work that starts on a node idle just before it: ``cost.idle_time`` of the stage's
  decode step more, after a pause as long as the node's (``idle_s``);
- KV capacity = the tightest node's free memory after weights, divided by the KV bytes per token
  it must hold (``ModelProfile.kv_bytes_per_token``), i.e. the same memory rule as
  ``cost.max_batch_that_fits`` expressed in tokens instead of whole target-length sequences.

A measured device's prefill is affine in the prompt's length (``cost.prefill_block_times``), in
the simulator as in the planner.

One approximation lives here and is stated: a prompt micro-batch after the first (chunked
prefill of a long prompt) is timed as a prompt of its own length; its attention over the earlier
chunks is left out (the cost model has no "context before" argument). The experiments use
micro-batches of 512 tokens, larger than most prompts, so this rarely applies.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from meshllm.planner import cost
from meshllm.planner.cost import EFFICIENCY, Efficiency, ModelProfile
from meshllm.planner.types import Device, Network, Plan, Workload
from meshllm.sim.engine import SimError
from meshllm.sim.model import SimModel, SimReplica, SimStage


class CostTiming:
    """The ``Timing`` oracle backed by the planner's cost model (results cached per call)."""

    def __init__(self, profile: ModelProfile, devices: Mapping[str, Device], network: Network,
                 eff: Efficiency = EFFICIENCY) -> None:
        self.p = profile
        self.devices = dict(devices)
        self.net = network
        self.eff = eff
        self._pre: dict[tuple[str, int], np.ndarray] = {}
        self._dec: dict[tuple[str, int, int], np.ndarray] = {}
        self._bw: dict[tuple[str, str], tuple[float, float]] = {}
        self._step: dict[tuple[str, int, int], float] = {}

    def _cum(self, arr: np.ndarray) -> np.ndarray:
        return np.concatenate(([0.0], np.cumsum(arr)))  # (N+1,) prefix sums over blocks

    def prefill_s(self, replica: SimReplica, stage: int, tokens: int, ctx_before: int) -> float:
        st = replica.stages[stage]
        key = (st.node, tokens)
        cs = self._pre.get(key)
        if cs is None:
            cs = self._pre[key] = self._cum(cost.prefill_block_times(self.p, self.devices[st.node], tokens, self.eff))
        return float(cs[st.end] - cs[st.first])

    def decode_s(self, replica: SimReplica, stage: int, batch: int, ctx: float) -> float:
        st = replica.stages[stage]
        key = (st.node, batch, round(ctx))
        cs = self._dec.get(key)
        if cs is None:
            cs = self._dec[key] = self._cum(
                cost.decode_block_times(self.p, self.devices[st.node], batch, round(ctx), self.eff))
        return float(cs[st.end] - cs[st.first])

    def idle_s(self, replica: SimReplica, stage: int, gap_s: float = cost.IDLE_GAP_S) -> float:
        st = replica.stages[stage]
        key = (st.node, st.first, st.end)
        dev = self.devices[st.node]
        step = self._step.get(key)
        if step is None:  # the stage's decode step at batch 1, at the context its profile measured
            step = self._step[key] = float(
                cost.decode_block_times(self.p, dev, 1, dev.decode_ctx, self.eff)[st.first:st.end].sum())
        return cost.idle_time(dev, step, gap_s)

    def transfer_s(self, src: str, dst: str, nbytes: float) -> float:
        if src == dst:
            return 0.0
        link = self._bw.get((src, dst))
        if link is None:
            link = self._bw[(src, dst)] = (self.net.bandwidth(src, dst), self.net.rtt(src, dst))
        bw, rtt = link
        # cost.transfer_time is 0 for 0 bytes; the simulator asks for the bare latency that way
        return rtt / 2 if nbytes <= 0 else cost.transfer_time(nbytes, bw, rtt)

    def act_bytes_per_token(self, block: int) -> int:
        return int(self.p.act[block])

    def kv_bytes_per_token(self, first: int, end: int) -> int:
        return int(self.p.kv_bytes_per_token(first, end))


def kv_capacity_tokens(profile: ModelProfile, devices: Mapping[str, Device],
                       stages: tuple[SimStage, ...]) -> int:
    """KV tokens the replica can hold: min over its nodes of free memory / KV bytes per token."""
    best = None
    for node in {s.node for s in stages}:
        mine = [s for s in stages if s.node == node]
        free = devices[node].memory_bytes - sum(profile.weight_bytes(s.first, s.end) for s in mine)
        if free < 0:
            raise SimError(f"node {node}: the weights of its stages do not fit in its memory")
        kv = sum(profile.kv_bytes_per_token(s.first, s.end) for s in mine)
        if kv > 0:
            cap = int(free // kv)
            best = cap if best is None else min(best, cap)
    return best if best is not None else 1 << 40


def to_sim_model(plan: Plan, profile: ModelProfile, devices: Mapping[str, Device],
                 network: Network, workload: Workload, *, entry: str | None = None,
                 max_batch: int | None = None, eff: Efficiency = EFFICIENCY) -> SimModel:
    """The simulator's view of ``plan``. ``max_batch`` (default ``workload.max_batch``) caps the
    sequences a decoding replica runs at once; KV memory caps them further, per token."""
    cap = workload.max_batch if max_batch is None else max_batch
    reps = []
    for r in plan.replicas:
        missing = [s.node for s in r.stages if s.node not in devices]
        if missing:
            raise SimError(f"plan replica {r.id} uses unknown devices: {', '.join(missing)}")
        stages = tuple(SimStage(s.node, s.first, s.end) for s in r.stages)
        reps.append(SimReplica(r.id, r.role.value, stages,
                               kv_capacity_tokens(profile, devices, stages), cap))
    return SimModel(tuple(reps), CostTiming(profile, devices, network, eff), entry)
