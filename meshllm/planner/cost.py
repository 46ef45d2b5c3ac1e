"""The cost model: how long a block takes on a device, how long bytes take on a link, and
whether a placement fits in memory. Every time the planner (and the simulator) predicts comes
from here.

Compute model (a roofline per block)::

    t = max(FLOPs / (eff.compute * peak FLOPS), bytes read / (eff.memory * peak bandwidth))
        + eff.block_overhead_s

- Prefill of ``T`` prompt tokens: FLOPs = T * flops_per_token + attn_flops * T(T+1)/2; bytes =
  the block's weights + the KV it writes. Large ``T`` is compute-bound.
- One decode step of ``b`` sequences at context ``c``: FLOPs = b * flops_per_token +
  attn_flops * b * c; bytes = weights + b * c * kv_bytes_per_token. Small ``b`` is memory-bound.
- The embedding reads one row per token, not its whole table.
- A device with measured times (``Device.prefill_s_per_token`` / ``decode_s_per_step``) uses
  them instead: prefill(T) affine in T (``prefill_block_times``); decode(b) = step time + (b - 1) *
  the measured time of a decode row (``decode_s_per_row``: it runs the head, which a prompt runs
  for its last position only), or the per-token prompt time where the profile predates it.

- A stage's work after idling: a stage's work (a decode step, a prompt chunk) takes
  ``max(0, idle_step_s + idle_step_frac * step)`` more when its device was idle just before it, ``step``
  being the stage's own decode step at batch 1: the caches fill again once (its core perhaps taken
  by other work meanwhile), whatever the work; measured by the device's profile
  (``runtime/profile.py``). It is paid by every stage of a prompt that finds its replica idle, and
  by every stage of a decode ring with fewer micro-batches in flight than stages (each waits while
  the others compute); a one-stage ring steps back to back and pays nothing. ``idle_time``.
  After a longer pause it costs more, up to the profile's long pause (``idle_long_s +
  idle_long_frac * step`` after ``LONG_IDLE_GAP_S``, the next prompt of a quiet mesh; SmolLM2 int4
  on the build machine: a 5-token prompt 1.3 ms slower after 20 ms, 4.5 ms after 0.3-1 s). The
  simulator charges it by the pause each node had; the planner, whose stages wait a step of the
  others, the short pause's.

Link model: ``rtt / 2 + bytes / bandwidth``; nothing for a device talking to itself.

The efficiency factors live in one place, :data:`EFFICIENCY`, and are stated in
``docs/planner.md``: memory 0.92 reproduces EdgeShard's Edge-Solo figure (Llama2-7B fp32 on one
Jetson AGX Orin, 140.34 ms/token: 26.4 GB of weights read per token at 0.92 x 204.8 GB/s);
compute 0.5 is a typical fraction of peak for fp32 matmuls at prompt sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from meshllm.errors import PlanError
from meshllm.model.config import PRESETS, BlockCost, block_costs
from meshllm.planner.types import Device, Network, Replica, Stage, Workload

TOKEN_BYTES = 8  # a sampled token id travelling back to the first stage


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fractions of peak a device reaches, and a fixed cost per block call."""

    compute: float = 0.5
    memory: float = 0.92
    block_overhead_s: float = 0.0


EFFICIENCY = Efficiency()


@dataclass(frozen=True, slots=True, eq=False)
class ModelProfile:
    """A model's per-block costs as numpy arrays (index = block index: 0 embed, 1..L, L+1 head)."""

    name: str
    blocks: tuple[BlockCost, ...]
    param_bytes: np.ndarray = field(init=False)  # (N,)
    flops: np.ndarray = field(init=False)  # (N,) matmul FLOPs per token
    attn: np.ndarray = field(init=False)  # (N,) FLOPs per token per context position
    act: np.ndarray = field(init=False)  # (N,) output bytes per token
    kv: np.ndarray = field(init=False)  # (N,) KV bytes per token
    read_fixed: np.ndarray = field(init=False)  # (N,) weight bytes read per call (0 for embed)
    read_per_token: np.ndarray = field(init=False)  # (N,) extra bytes read per token (embed rows)
    max_context: int = 0  # tokens of context a sequence may hold (prompt + output); 0: unknown

    def __post_init__(self) -> None:
        if not self.blocks:
            raise PlanError("model profile has no blocks")
        for i, b in enumerate(self.blocks):
            if b.index != i:
                raise PlanError(f"model profile block {i} has index {b.index}")
        arr = lambda f: np.array([float(f(b)) for b in self.blocks])  # noqa: E731
        object.__setattr__(self, "param_bytes", arr(lambda b: b.param_bytes))
        object.__setattr__(self, "flops", arr(lambda b: b.flops_per_token))
        object.__setattr__(self, "attn", arr(lambda b: b.attn_flops_per_token_per_ctx))
        object.__setattr__(self, "act", arr(lambda b: b.activation_bytes_per_token))
        object.__setattr__(self, "kv", arr(lambda b: b.kv_bytes_per_token))
        is_embed = np.array([b.kind == "embed" for b in self.blocks])
        object.__setattr__(self, "read_fixed", np.where(is_embed, 0.0, self.param_bytes))
        object.__setattr__(self, "read_per_token", np.where(is_embed, self.act, 0.0))

    @classmethod
    def from_costs(cls, costs: Sequence[BlockCost], name: str = "", max_context: int = 0) -> ModelProfile:
        """From ``block_costs(cfg)`` or ``load_manifest(dir).costs``; ``max_context`` is the
        model's context window (``config.max_position``; 0 when not known)."""
        return cls(name, tuple(costs), max_context=int(max_context))

    @classmethod
    def from_preset(cls, name: str) -> ModelProfile:
        """From a named preset in :data:`meshllm.model.config.PRESETS`."""
        if name not in PRESETS:
            raise PlanError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name, tuple(block_costs(PRESETS[name])), max_context=PRESETS[name].max_position)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def weight_bytes(self, first: int, end: int) -> float:
        """Weight bytes of blocks ``[first, end)``."""
        return float(self.param_bytes[first:end].sum())

    def kv_bytes_per_token(self, first: int, end: int) -> float:
        """KV cache bytes per token of context held by blocks ``[first, end)``."""
        return float(self.kv[first:end].sum())

    @property
    def total_weight_bytes(self) -> float:
        return float(self.param_bytes.sum())


# --- compute --------------------------------------------------------------------------------

def _roofline(p: ModelProfile, dev: Device, n_tok: float, attn_ctx: float, kv_read_tokens: float,
              eff: Efficiency) -> np.ndarray:
    flops = n_tok * p.flops + attn_ctx * p.attn  # (N,)
    nbytes = p.read_fixed + n_tok * p.read_per_token + kv_read_tokens * p.kv  # (N,)
    return np.maximum(flops / (eff.compute * dev.flops), nbytes / (eff.memory * dev.mem_bw)) \
        + eff.block_overhead_s


# the pauses a device profile times a step after (runtime.profile's IDLE_GAP_S and LONG_IDLE_GAP_S,
# the same figures: the planner does not import the runtime; tests/test_profile.py holds them equal)
IDLE_GAP_S = 0.02
LONG_IDLE_GAP_S = 0.3
PROFILE_PROMPT_TOKENS = 32  # the prompt length a device profile's per-token prefill time was measured at


def prefill_block_times(p: ModelProfile, dev: Device, tokens: float,
                        eff: Efficiency = EFFICIENCY) -> np.ndarray:
    """(N,) seconds each block takes on ``dev`` to prefill a prompt of ``tokens`` tokens.

    A **measured** device's prefill is affine in the prompt's length, not proportional to it. Its
    profile records, per block, the time per token of a 32-token prompt (``PROFILE_PROMPT_TOKENS``,
    what ``runtime.profile.measure`` runs) and the time of one decode step. Running a block at all
    has a fixed cost (the decode step is that cost for one row), so ``T`` tokens cost the decode
    step plus ``T - 1`` times the marginal per-token time that reproduces the measured 32-token
    prompt, and never less than ``T`` times the per-token time: exact at 32 tokens, one decode
    step for one token. Measured on SmolLM2 int4 (one runner for the whole model, 1 thread;
    docs/experiments.md): prompts of 1, 4, 8 and 16 tokens took 17.7, 24.1, 33.3 and 50.7 ms; the
    proportional figure is 3.1, 12.2, 24.4 and 48.9, this one 21.9, 29.3, 39.0 and 58.6. The
    planner and the simulator both read it: the planner's once proportional figure put a PREFILL
    replica on a slow device for short prompts at half the time the simulator and the mesh took
    (docs/experiments.md, "Time dilated")."""
    if dev.prefill_s_per_token is not None:
        per_tok = _measured(dev.prefill_s_per_token, p, dev)
        linear = tokens * per_tok
        if dev.decode_s_per_step is None or len(dev.decode_s_per_step) != p.n_blocks:
            return linear
        step = np.asarray(dev.decode_s_per_step, dtype=float)
        k = PROFILE_PROMPT_TOKENS
        marginal = np.maximum(0.0, (k * per_tok - step) / (k - 1))
        return np.maximum(linear, step + (max(1.0, float(tokens)) - 1) * marginal)
    return _roofline(p, dev, tokens, tokens * (tokens + 1) / 2, tokens, eff)


def decode_block_times(p: ModelProfile, dev: Device, batch: float, ctx: float,
                       eff: Efficiency = EFFICIENCY) -> np.ndarray:
    """(N,) seconds each block takes on ``dev`` for one decode step of ``batch`` sequences
    at ``ctx`` tokens of context each."""
    if dev.decode_s_per_step is not None:
        step = _measured(dev.decode_s_per_step, p, dev)
        per_row: np.ndarray | float = 0.0
        if dev.decode_s_per_row is not None and len(dev.decode_s_per_row) == p.n_blocks:
            per_row = np.asarray(dev.decode_s_per_row, dtype=float)
        elif dev.prefill_s_per_token is not None:  # a profile before version 7: about a prompt token
            per_row = _measured(dev.prefill_s_per_token, p, dev)
        out = step + (batch - 1) * per_row
        if dev.decode_s_per_ctx_token is not None:  # attention's share grows with each sequence's context
            out = out + batch * max(0.0, ctx - dev.decode_ctx) * _measured(dev.decode_s_per_ctx_token, p, dev)
        return out
    return _roofline(p, dev, batch, batch * ctx, batch * ctx, eff)


def idle_time(dev: Device, step_s: float, gap_s: float = IDLE_GAP_S) -> float:
    """Seconds a stage's work on ``dev`` takes more when ``dev`` was idle for ``gap_s`` just
    before it, for a stage whose decode step at batch 1 takes ``step_s``. After the short pause
    the profile times (``IDLE_GAP_S``, a pipeline stage's wait; any shorter pause alike):
    ``idle_step_s + idle_step_frac * step_s``, never below 0 (the fraction is negative on a device
    whose long steps are cold anyway). After ``LONG_IDLE_GAP_S`` or more (a quiet mesh's next
    prompt) the long pause's line, never below the short one's; in between, linear in the
    pause's logarithm. 0 for a stage of nothing, and for a device whose profile did not measure
    it; the short figure for any pause where the long one was not measured."""
    if step_s <= 0:
        return 0.0
    short = max(0.0, dev.idle_step_s + dev.idle_step_frac * step_s)
    if gap_s <= IDLE_GAP_S or not (dev.idle_long_s or dev.idle_long_frac):
        return short
    long = max(short, dev.idle_long_s + dev.idle_long_frac * step_s)
    if gap_s >= LONG_IDLE_GAP_S:
        return long
    w = math.log(gap_s / IDLE_GAP_S) / math.log(LONG_IDLE_GAP_S / IDLE_GAP_S)
    return short + w * (long - short)


def stage_idle_time(p: ModelProfile, dev: Device, first: int, end: int, ctx: float = 0.0,
                    eff: Efficiency = EFFICIENCY) -> float:
    """``idle_time`` of the stage of blocks ``[first, end)`` on ``dev`` (its step at batch 1)."""
    return idle_time(dev, float(decode_block_times(p, dev, 1, ctx, eff)[first:end].sum()))


def _measured(values: Sequence[float], p: ModelProfile, dev: Device) -> np.ndarray:
    if len(values) != p.n_blocks:
        raise PlanError(f"device {dev.name}: {len(values)} measured block times for a model of "
                        f"{p.n_blocks} blocks")
    return np.asarray(values, dtype=float)


def prefill_table(p: ModelProfile, devices: Sequence[Device], tokens: float,
                  eff: Efficiency = EFFICIENCY) -> np.ndarray:
    """(M, N) prefill seconds per block per device for a prompt of ``tokens`` tokens."""
    return np.stack([prefill_block_times(p, d, tokens, eff) for d in devices])


def decode_table(p: ModelProfile, devices: Sequence[Device], batch: float, ctx: float,
                 eff: Efficiency = EFFICIENCY) -> np.ndarray:
    """(M, N) seconds per block per device for one decode step of ``batch`` at context ``ctx``."""
    return np.stack([decode_block_times(p, d, batch, ctx, eff) for d in devices])


def per_token_table(p: ModelProfile, devices: Sequence[Device], workload: Workload,
                    batch: float = 1, eff: Efficiency = EFFICIENCY) -> np.ndarray:
    """(M, N) mean seconds per generated token per block: (prefill of the mean prompt + the
    mean number of decode steps at batch ``batch``) / mean output length, at mean lengths.
    This is EdgeShard's profiled "time per token, prefill and generation averaged"."""
    t_in, t_out = workload.input_len.mean, workload.output_len.mean
    ctx = t_in + t_out / 2  # mean context during generation
    pre = prefill_table(p, devices, t_in, eff)
    dec = decode_table(p, devices, batch, ctx, eff)
    return (pre + max(t_out - 1, 0) * dec) / max(t_out, 1)


# --- links ----------------------------------------------------------------------------------

def transfer_time(nbytes: float, bandwidth: float, rtt: float) -> float:
    """Seconds to move ``nbytes`` over a link: one-way delay (rtt / 2) + bytes / bandwidth.
    Zero when nothing moves or the link is a device to itself (infinite bandwidth)."""
    if nbytes <= 0 or bandwidth == np.inf:
        return 0.0
    return rtt / 2 + nbytes / bandwidth


def activation_transfer_time(p: ModelProfile, boundary: int, tokens: float, a: str, b: str,
                             network: Network) -> float:
    """Seconds to send the activations of ``tokens`` tokens across a stage boundary at block
    ``boundary`` (the output of block ``boundary - 1``) from device ``a`` to device ``b``."""
    nbytes = float(p.act[boundary - 1]) * tokens if boundary > 0 else 0.0
    return transfer_time(nbytes, network.bandwidth(a, b), network.rtt(a, b))


def kv_transfer_time(p: ModelProfile, src: Replica, dst: Replica, tokens: float,
                     network: Network) -> float:
    """Seconds to move the KV cache of one ``tokens``-token sequence from replica ``src``
    (where it was prefilled) to replica ``dst`` (where it will be decoded). Each block's KV goes
    from the source device holding it to the destination device holding it; distinct device
    pairs transfer in parallel, so the time is the slowest pair's."""
    per_pair: dict[tuple[str, str], float] = {}
    for s in src.stages:
        for d in dst.stages:
            lo, hi = max(s.first, d.first), min(s.end, d.end)
            if lo < hi:
                key = (s.node, d.node)
                per_pair[key] = per_pair.get(key, 0.0) + p.kv_bytes_per_token(lo, hi) * tokens
    return max((transfer_time(nb, network.bandwidth(a, b), network.rtt(a, b))
                for (a, b), nb in per_pair.items()), default=0.0)


# --- a replica's stages ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StageTimes:
    """Per-stage times of one pass through a replica.

    ``compute[s]`` is stage s's compute, ``comm[s]`` the transfer *into* stage s (0 for the
    first), ``ret`` the sampled token's trip from the last stage back to the first.
    ``latency`` is a single pass end to end; ``bottleneck`` the slowest resource (a stage or a
    link) when passes are pipelined.
    """

    compute: tuple[float, ...]
    comm: tuple[float, ...]
    ret: float

    @property
    def latency(self) -> float:
        return sum(self.compute) + sum(self.comm) + self.ret

    @property
    def bottleneck(self) -> float:
        return max(*self.compute, *self.comm, self.ret)


def _stage_times(p: ModelProfile, devices: Mapping[str, Device], stages: Sequence[Stage],
                 network: Network, tokens: float, block_times) -> StageTimes:
    comp, comm = [], []
    for i, s in enumerate(stages):
        t = block_times(devices[s.node])
        comp.append(float(t[s.first:s.end].sum()))
        comm.append(0.0 if i == 0 else activation_transfer_time(
            p, s.first, tokens, stages[i - 1].node, s.node, network))
    last, first = stages[-1].node, stages[0].node
    ret = transfer_time(TOKEN_BYTES * tokens, network.bandwidth(last, first), network.rtt(last, first))
    return StageTimes(tuple(comp), tuple(comm), ret)


def prefill_stage_times(p: ModelProfile, devices: Mapping[str, Device], replica: Replica,
                        network: Network, tokens: float, eff: Efficiency = EFFICIENCY) -> StageTimes:
    """Stage times for prefilling one prompt of ``tokens`` tokens on ``replica`` (the first
    token comes back to the first stage: ``ret`` carries one token id)."""
    st = _stage_times(p, devices, replica.stages, network, tokens,
                      lambda d: prefill_block_times(p, d, tokens, eff))
    last, first = replica.stages[-1].node, replica.stages[0].node
    ret = transfer_time(TOKEN_BYTES, network.bandwidth(last, first), network.rtt(last, first))
    return StageTimes(st.compute, st.comm, ret)


def decode_stage_times(p: ModelProfile, devices: Mapping[str, Device], replica: Replica,
                       network: Network, batch: float, ctx: float,
                       eff: Efficiency = EFFICIENCY) -> StageTimes:
    """Stage times for one decode step of ``batch`` sequences at context ``ctx`` on ``replica``
    (``batch`` token activations cross each boundary; ``batch`` token ids return)."""
    return _stage_times(p, devices, replica.stages, network, batch,
                        lambda d: decode_block_times(p, d, batch, ctx, eff))


# --- memory ---------------------------------------------------------------------------------

def stage_memory(p: ModelProfile, stage: Stage, kv_tokens: float) -> float:
    """Bytes a stage needs: its weights + KV for ``kv_tokens`` tokens (summed over sequences)."""
    return p.weight_bytes(stage.first, stage.end) + p.kv_bytes_per_token(stage.first, stage.end) * kv_tokens


def replica_memory(p: ModelProfile, replica: Replica, batch: int, seq_len: int) -> dict[str, float]:
    """Bytes each node of ``replica`` needs for weights + KV of ``batch`` sequences of
    ``seq_len`` tokens (summed when a node holds several stages)."""
    out: dict[str, float] = {}
    for s in replica.stages:
        out[s.node] = out.get(s.node, 0.0) + stage_memory(p, s, batch * seq_len)
    return out


def replica_fits(p: ModelProfile, devices: Mapping[str, Device], replica: Replica, batch: int,
                 seq_len: int) -> bool:
    """Whether every node of ``replica`` holds its weights + KV for ``batch`` x ``seq_len``."""
    return all(nb <= devices[n].memory_bytes
               for n, nb in replica_memory(p, replica, batch, seq_len).items())


def max_batch_that_fits(p: ModelProfile, devices: Mapping[str, Device], replica: Replica,
                        seq_len: int, cap: int) -> int:
    """Largest batch in ``[0, cap]`` whose KV (``seq_len`` tokens each) fits next to the
    weights on every node of ``replica``; 0 when even the weights do not fit."""
    best = cap
    for s in replica.stages:
        free = devices[s.node].memory_bytes - sum(
            p.weight_bytes(t.first, t.end) for t in replica.stages if t.node == s.node)
        kv = sum(p.kv_bytes_per_token(t.first, t.end) for t in replica.stages if t.node == s.node)
        if free < 0:
            return 0
        if kv > 0:
            best = min(best, int(free // (kv * seq_len)))
    return max(best, 0)


def memory_requirement(p: ModelProfile, workload: Workload, batch: int | None = None) -> np.ndarray:
    """(N,) bytes per block: weights + KV for ``batch`` (default ``workload.max_batch``)
    sequences of ``workload.target_len`` tokens. EdgeShard's Req_i."""
    b = workload.max_batch if batch is None else batch
    return p.param_bytes + p.kv * (b * workload.target_len)
