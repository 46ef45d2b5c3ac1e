"""What a request will cost on a replica: the estimates the simulator scores replicas with, and
that the serving router calls with the same inputs, so the two never drift apart. Pure.

Every figure is a function of a ``Timing`` oracle (``sim.adapter.CostTiming`` over the planner's
cost model, or a synthetic one in tests), a ``SimReplica`` (its stages and limits) and plain
numbers describing the request and the replica's load. Nothing here keeps state; callers cache
(the simulator keys its caches by replica id and the bucketed context, see ``bucket_ctx``).

- ``prefill_estimate``: a prompt alone on a replica: its latency through the stages (compute,
  each stage's ``Timing.idle_s`` as it finds it idle, and activations between them) and the
  busiest stage's time (the replica's prefill bottleneck).
- ``step_estimate``: time per token of a sequence decoding in a batch, with the batch split into
  micro-batches that circulate the stage ring (EdgeShard's No-Bubbles): the slower of one trip
  round the ring and the busiest node's work for every micro-batch. With fewer micro-batches than
  stages each stage idles between its steps and the trip pays each one's ``Timing.idle_s``.
- ``tpot``: that estimate, or what the replica has been doing lately if slower.
- ``handoff_time``: the KV of the prefill replica's last stage, which nothing can hide.
- ``slot_wait``: the wait for a decode slot when every slot of a pool of decoders is taken.
- ``decode_candidate``: all of it for one decoder, as a ``routing.Candidate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from meshllm.sim.model import SimReplica, Timing
from meshllm.sim.routing import Candidate

TOKEN_BYTES = 8  # a sampled token id on the wire


def bucket_ctx(ctx: float) -> int:
    """Contexts rounded down to a power of two (at least 1): decode estimates vary slowly with
    context, and bucketing keeps callers' caches small."""
    return 1 << max(0, int(ctx).bit_length() - 1)


def max_groups(rep: SimReplica, configured: int = 0) -> int:
    """Decode micro-batches in flight on ``rep``: ``configured``, or one per stage (0)."""
    return configured or len(rep.stages)


def prefill_estimate(t: Timing, rep: SimReplica, tokens: int) -> tuple[float, float]:
    """(latency, bottleneck stage time) in seconds of a ``tokens``-token prompt alone on ``rep``."""
    lat = 0.0
    worst = 0.0
    for s, st in enumerate(rep.stages):
        c = t.prefill_s(rep, s, tokens, 0)
        lat += c + t.idle_s(rep, s)  # alone: every stage was idle before it
        worst = max(worst, c)
        if s + 1 < len(rep.stages):
            lat += t.transfer_s(st.node, rep.stages[s + 1].node, tokens * t.act_bytes_per_token(st.end - 1))
    return lat, worst


def step_estimate(t: Timing, rep: SimReplica, batch: int, ctx: float, groups: int = 0) -> float:
    """Seconds per token of a sequence decoding in a batch of ``batch`` on ``rep`` at context
    ``ctx`` (bucketed, see ``bucket_ctx``); the batch is split into up to ``max_groups(rep,
    groups)`` micro-batches."""
    ctx_b = bucket_ctx(ctx)
    n = len(rep.stages)
    g = max(1, min(batch, max_groups(rep, groups)))
    mb = math.ceil(batch / g)
    ring = 0.0
    per_node: dict[str, float] = {}
    for s, st in enumerate(rep.stages):
        c = t.decode_s(rep, s, mb, ctx_b)
        # activations to the next stage; from the last stage only token ids go back
        per_seq = t.act_bytes_per_token(st.end - 1) if s + 1 < n else TOKEN_BYTES
        ring += c + t.transfer_s(st.node, rep.stages[(s + 1) % n].node, mb * per_seq)
        if g < n:  # fewer micro-batches than stages: each stage idles between its steps
            ring += t.idle_s(rep, s)
        per_node[st.node] = per_node.get(st.node, 0.0) + c  # a node's stages add up
    return max(ring, g * max(per_node.values()))


def tpot(step_s: float, observed_s: float, seqs: int) -> float:
    """Predicted time per token: the cost model's (``step_s``), or what the replica has been doing
    lately (``observed_s``, a moving average it reports) if that is slower and it is busy (an idle
    replica's old figure no longer applies)."""
    return max(step_s, observed_s) if seqs else step_s


def has_kv_room(rep: SimReplica, kv_used: int, seqs: int, input_tokens: int, output_tokens: int) -> bool:
    """Whether ``rep`` (holding ``kv_used`` KV tokens for ``seqs`` sequences) can take a request
    of these lengths now: KV for the whole request, preallocated, and a free slot."""
    return kv_used + input_tokens + output_tokens <= rep.kv_capacity_tokens and seqs < rep.max_batch


def decode_ctx(input_tokens: int, output_tokens: int) -> int:
    """The mean context over a request's decode: the prompt and half its output."""
    return input_tokens + output_tokens // 2


def handoff_time(t: Timing, prefill: SimReplica, decoder: SimReplica, input_tokens: int) -> float:
    """Seconds of KV hand-off the request waits for: the prefill replica's last stage finishes
    last, so its layers' KV cannot overlap anything (the other stages' KV goes while later stages
    compute). 0 when the same replica decodes."""
    if prefill is decoder or prefill.id == decoder.id:
        return 0.0
    last = prefill.stages[-1]
    kvb = input_tokens * t.kv_bytes_per_token(last.first, last.end)
    return t.transfer_s(last.node, decoder.stages[0].node, kvb)


def decode_candidate(t: Timing, rep: SimReplica, *, input_tokens: int, output_tokens: int,
                     kv_used: int, seqs: int, tpot_s: Callable[[int, int], float],
                     prefill: SimReplica | None = None) -> Candidate:
    """``rep`` as a decoder for a request of these lengths: its decode time (the first token comes
    from prefill), the hand-off from ``prefill`` and whether it has room. ``tpot_s(batch, ctx)`` is
    ``rep``'s predicted time per token (``tpot`` over ``step_estimate``, cached by the caller)."""
    room = has_kv_room(rep, kv_used, seqs, input_tokens, output_tokens)
    dec = tpot_s(seqs + 1, decode_ctx(input_tokens, output_tokens)) * (output_tokens - 1)
    handoff = 0.0 if prefill is None else handoff_time(t, prefill, rep, input_tokens)
    return Candidate(rep.id, 0.0, 0.0, dec, handoff, room)


def slot_wait(pool: Sequence[tuple[int, int]], waiting: int, mean_out: float,
              tpot_full: Callable[[int, int], float]) -> float:
    """Predicted wait for a decode slot in ``pool`` (per decoder: (sequences bound to it, max
    batch)) when ``waiting`` prompts are already queued for it: slots free at the rate the pool
    finishes sequences (batch / time per sequence, at the mean output length ``mean_out``).
    ``tpot_full(i, ctx)`` is decoder ``i``'s time per token at its full batch and context ``ctx``;
    it is only called when every slot is taken."""
    busy = sum(s for s, _ in pool) + waiting
    slots = sum(b for _, b in pool)
    if busy < slots or not pool:
        return 0.0
    ctx = int(mean_out)
    rate = sum(b / (tpot_full(i, ctx) * mean_out) for i, (_, b) in enumerate(pool))
    return (busy - slots + 1) / rate
