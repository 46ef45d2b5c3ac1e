"""The shared estimates, checked by hand on a timing oracle whose every figure is known."""

from __future__ import annotations

import pytest

from meshllm.sim import estimates as est
from meshllm.sim.model import SimReplica, SimStage


class Known:
    """Stage s of any replica: prefill 0.01 s/token x (s + 1), decode 0.002 s x batch x (s + 1);
    links: 1 ms latency + 1 µs/byte; activations 100 B/token; KV 10 B/token per block."""

    def prefill_s(self, rep, stage, tokens, ctx_before):
        return 0.01 * tokens * (stage + 1)

    def decode_s(self, rep, stage, batch, ctx):
        self.last_ctx = ctx
        return 0.002 * batch * (stage + 1)

    def idle_s(self, rep, stage, gap_s=0.02):
        return 0.0

    def transfer_s(self, src, dst, nbytes):
        return 0.0 if src == dst else 0.001 + nbytes * 1e-6

    def act_bytes_per_token(self, block):
        return 100

    def kv_bytes_per_token(self, first, end):
        return 10 * (end - first)


def rep(rid: int, role: str, *nodes: str, cap: int = 1000, batch: int = 4) -> SimReplica:
    return SimReplica(rid, role, tuple(SimStage(n, 2 * i, 2 * i + 2) for i, n in enumerate(nodes)), cap, batch)


def test_prefill_is_stages_plus_activations_and_the_bottleneck_is_the_slowest_stage() -> None:
    lat, worst = est.prefill_estimate(Known(), rep(0, "prefill", "a", "b", "c"), 10)
    # compute 0.1 + 0.2 + 0.3; two hops of 1 ms + 1000 B x 1 µs
    assert lat == pytest.approx(0.6 + 2 * 0.002) and worst == pytest.approx(0.3)


class Idling(Known):
    """``Known``, with each stage's work 3 ms slower after its node idled."""

    def idle_s(self, rep, stage, gap_s=0.02):
        return 0.003


def test_the_estimates_charge_each_idle_stage_its_idle_time() -> None:
    """A prompt alone wakes every stage; a ring with fewer micro-batches than stages wakes each
    stage every step; with as many micro-batches as stages, or one stage, nothing idles. The
    serving router and the dashboard read these same estimates."""
    r = rep(0, "decoder", "a", "b")
    assert est.prefill_estimate(Idling(), r, 10)[0] == pytest.approx(est.prefill_estimate(Known(), r, 10)[0] + 0.006)
    assert est.step_estimate(Idling(), r, 1, 5) == pytest.approx(est.step_estimate(Known(), r, 1, 5) + 0.006)
    assert est.step_estimate(Idling(), r, 4, 100) == pytest.approx(est.step_estimate(Known(), r, 4, 100))
    one = rep(1, "decoder", "a")
    assert est.step_estimate(Idling(), one, 1, 5) == pytest.approx(est.step_estimate(Known(), one, 1, 5))


def test_step_is_the_ring_or_the_busiest_node_times_the_micro_batches() -> None:
    t = Known()
    r = rep(0, "decoder", "a", "b")
    # batch 4 in 2 micro-batches of 2: ring = 0.004 + (1 ms + 200 µs) + 0.008 + (1 ms + 16 µs);
    # busiest node 0.008 x 2 micro-batches = 0.016 > ring 0.01422
    assert est.step_estimate(t, r, 4, 100) == pytest.approx(0.016)
    assert t.last_ctx == 64  # contexts are bucketed to a power of two
    # one micro-batch: the ring alone
    assert est.step_estimate(t, r, 1, 5) == pytest.approx(0.002 + 0.0011 + 0.004 + 0.001008)
    assert est.step_estimate(t, r, 4, 100, groups=1) == pytest.approx(0.008 + 0.0014 + 0.016 + 0.001032)
    # two stages on one node add up there
    same = SimReplica(1, "decoder", (SimStage("a", 0, 2), SimStage("a", 2, 4)), 1000, 4)
    assert est.step_estimate(t, same, 2, 1) == pytest.approx(max(0.002 + 0.004, 2 * 0.006))
    assert [est.bucket_ctx(x) for x in (0, 1, 2, 3, 64, 100)] == [1, 1, 2, 2, 64, 64]


def test_tpot_takes_the_observed_figure_only_when_busy_and_slower() -> None:
    assert est.tpot(0.01, 0.05, seqs=2) == 0.05
    assert est.tpot(0.01, 0.005, seqs=2) == 0.01
    assert est.tpot(0.01, 0.05, seqs=0) == 0.01


def test_handoff_room_and_the_decode_candidate() -> None:
    t = Known()
    p = rep(0, "prefill", "a", "b")
    d = rep(1, "decoder", "c", cap=100, batch=2)
    # the last prefill stage holds blocks [2, 4): 20 B/token of KV, 50 tokens -> 1 ms + 1000 µs
    assert est.handoff_time(t, p, d, 50) == pytest.approx(0.002)
    assert est.handoff_time(t, p, p, 50) == 0.0
    assert est.has_kv_room(d, kv_used=40, seqs=1, input_tokens=50, output_tokens=10)
    assert not est.has_kv_room(d, kv_used=41, seqs=1, input_tokens=50, output_tokens=10)
    assert not est.has_kv_room(d, kv_used=0, seqs=2, input_tokens=1, output_tokens=1)
    asked: list[tuple[int, int]] = []
    c = est.decode_candidate(t, d, input_tokens=50, output_tokens=11, kv_used=0, seqs=1,
                             tpot_s=lambda b, ctx: asked.append((b, ctx)) or 0.1, prefill=p)
    assert asked == [(2, 55)]  # one more sequence, at the prompt plus half the output
    assert (c.replica_id, c.decode_s, c.handoff_s, c.has_room) == (1, pytest.approx(1.0), pytest.approx(0.002), True)


def test_slot_wait_is_zero_with_free_slots_and_the_finish_rate_otherwise() -> None:
    calls: list[tuple[int, int]] = []

    def full(i: int, ctx: int) -> float:
        calls.append((i, ctx))
        return [0.1, 0.2][i]

    assert est.slot_wait([(1, 4), (3, 4)], waiting=3, mean_out=10.0, tpot_full=full) == 0.0
    assert calls == []  # not asked when a slot is free
    # 9 busy for 8 slots; rate = 4 / (0.1 x 10) + 4 / (0.2 x 10) = 6 sequences/s; 2 ahead -> 1/3 s
    assert est.slot_wait([(4, 4), (4, 4)], waiting=1, mean_out=10.0, tpot_full=full) == pytest.approx(2 / 6)
    assert calls == [(0, 10), (1, 10)]
    assert est.slot_wait([], waiting=5, mean_out=10.0, tpot_full=full) == 0.0
