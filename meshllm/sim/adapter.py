"""From the planner's plan and cost model to the simulator's ``SimModel``.

Every service time comes from :mod:`meshllm.planner.cost` — this module only caches and
re-slices it:

- stage compute = the sum of the cost model's per-block times over the stage's blocks
  (``prefill_block_times`` for a prompt micro-batch, ``decode_block_times`` for a decode step);
- a transfer = ``cost.transfer_time`` over the network's bandwidth and RTT for that pair;
- a stage's work that starts on a node idle just before it: ``cost.stage_idle_time`` more
  (``idle_s``);
- KV capacity = the tightest node's free memory after weights, divided by the KV bytes per token
  it must hold (``ModelProfile.kv_bytes_per_token``), i.e. the same memory rule as
  ``cost.max_batch_that_fits`` expressed in tokens instead of whole target-length sequences.

One correction lives here: a **measured** device's prefill is affine in the prompt's length, not
proportional to it. A profile records, per block, the time per token of a 32-token prompt
(``PROFILE_PROMPT_TOKENS``, what ``runtime.profile.measure`` runs) and the time of one decode step;
the cost model prefills ``T`` tokens in ``T`` times the former, which makes a 4-token prompt cost
an eighth of a 32-token one, while running a block at all has a fixed cost (the decode step is
that cost for one row). Here a prompt of ``T`` tokens costs, per block, the decode step plus
``T - 1`` times the marginal per-token time that reproduces the measured 32-token prompt, and
never less than the proportional figure: exact at 32 tokens, one decode step for one token.
Measured on SmolLM2 int4 (one runner for the whole model, 1 thread; docs/experiments.md):
prompts of 1, 4, 8 and 16 tokens took 17.7, 24.1, 33.3 and 50.7 ms; the proportional model
said 3.1, 12.2, 24.4 and 48.9, the affine one 21.9, 29.3, 39.0 and 58.6. The decode model already
has that form (``cost.decode_block_times``: the step plus a per-token time per extra row).

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

PROFILE_PROMPT_TOKENS = 32  # the prompt length a device profile's per-token prefill time was measured at


def prefill_block_times(p: ModelProfile, dev: Device, tokens: int, eff: Efficiency = EFFICIENCY) -> np.ndarray:
    """(N,) seconds each block takes on ``dev`` to prefill ``tokens`` tokens: the cost model's
    figure, made affine for a measured device (see the module's docstring)."""
    linear = cost.prefill_block_times(p, dev, tokens, eff)
    if dev.prefill_s_per_token is None or dev.decode_s_per_step is None or len(dev.decode_s_per_step) != p.n_blocks:
        return linear
    k = PROFILE_PROMPT_TOKENS
    per_tok = np.asarray(dev.prefill_s_per_token, dtype=float)
    step = np.asarray(dev.decode_s_per_step, dtype=float)
    marginal = np.maximum(0.0, (k * per_tok - step) / (k - 1))
    return np.maximum(linear, step + (max(1, tokens) - 1) * marginal)


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
        self._idle: dict[tuple[str, int, int], float] = {}

    def _cum(self, arr: np.ndarray) -> np.ndarray:
        return np.concatenate(([0.0], np.cumsum(arr)))  # (N+1,) prefix sums over blocks

    def prefill_s(self, replica: SimReplica, stage: int, tokens: int, ctx_before: int) -> float:
        st = replica.stages[stage]
        key = (st.node, tokens)
        cs = self._pre.get(key)
        if cs is None:
            cs = self._pre[key] = self._cum(prefill_block_times(self.p, self.devices[st.node], tokens, self.eff))
        return float(cs[st.end] - cs[st.first])

    def decode_s(self, replica: SimReplica, stage: int, batch: int, ctx: float) -> float:
        st = replica.stages[stage]
        key = (st.node, batch, round(ctx))
        cs = self._dec.get(key)
        if cs is None:
            cs = self._dec[key] = self._cum(
                cost.decode_block_times(self.p, self.devices[st.node], batch, round(ctx), self.eff))
        return float(cs[st.end] - cs[st.first])

    def idle_s(self, replica: SimReplica, stage: int) -> float:
        st = replica.stages[stage]
        key = (st.node, st.first, st.end)
        got = self._idle.get(key)
        if got is None:
            dev = self.devices[st.node]
            got = self._idle[key] = cost.stage_idle_time(self.p, dev, st.first, st.end, dev.decode_ctx, self.eff)
        return got

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
