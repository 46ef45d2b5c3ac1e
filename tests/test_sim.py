"""The serving simulator's core against closed forms and invariants (synthetic timings)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from meshllm.errors import UserError
from meshllm.sim.engine import EventQueue, SimError
from meshllm.sim.model import SimConfig, SimModel, SimReplica, SimStage
from meshllm.sim.routing import Candidate, choose, policy_for, predicted_completion
from meshllm.sim.serving import simulate
from meshllm.sim.workload import Fixed, Request, bursty, closed_batch, parse_trace, poisson


class ConstTiming:
    """Service times that do not depend on context: prefill ``p`` s per token per replica,
    decode ``d`` s per step at any batch (split evenly over stages), links ``lat`` + bytes/bw."""

    def __init__(self, p: float = 1 / 32, d: float = 0.1, lat: float = 0.0, bw: float = 1e9,
                 act: int = 100, kv: int = 10, d_per_seq: float = 0.0) -> None:
        self.p, self.d, self.lat, self.bw, self.act, self.kv = p, d, lat, bw, act, kv
        self.d_per_seq = d_per_seq

    def prefill_s(self, rep, stage, tokens, ctx_before):
        return self.p * tokens / len(rep.stages)

    def decode_s(self, rep, stage, batch, ctx):
        return (self.d + self.d_per_seq * batch) / len(rep.stages)

    def idle_s(self, rep, stage, gap_s=0.02):
        return 0.0

    def transfer_s(self, src, dst, nbytes):
        return 0.0 if src == dst else self.lat + nbytes / self.bw

    def act_bytes_per_token(self, block):
        return self.act

    def kv_bytes_per_token(self, first, end):
        return self.kv * (end - first)


def _both(nstages: int = 1, cap: int = 10**9, batch: int = 10**6, rid: int = 0,
          prefix: str = "n") -> SimReplica:
    stages = tuple(SimStage(f"{prefix}{rid}.{i}", 2 * i, 2 * i + 2) for i in range(nstages))
    return SimReplica(rid, "both", stages, cap, batch)


def _split_model(timing, dec_batch: int = 16, dec_cap: int = 10**9) -> SimModel:
    p = SimReplica(0, "prefill", (SimStage("a", 0, 2), SimStage("b", 2, 4)), 10**9, 10**6)
    d = SimReplica(1, "decoder", (SimStage("c", 0, 1), SimStage("d", 1, 4)), dec_cap, dec_batch)
    return SimModel((p, d), timing)


def _md1_wait(rho: float, service: float) -> float:
    return rho * service / (2 * (1 - rho))


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_md1_prefill_only(rho: float) -> None:
    # one replica, one stage, fixed prompts, a single output token (made by prefill): M/D/1
    timing = ConstTiming(p=1 / 32)
    service = 1.0  # 32 tokens * 1/32 s
    n = 60000 if rho > 0.6 else 30000
    reqs = poisson(rho / service, n, Fixed(32), Fixed(1), np.random.default_rng(7))
    res = simulate(SimModel((_both(),), timing), reqs, warmup=1000)
    want = _md1_wait(rho, service)
    assert res.summary.waiting_s.mean == pytest.approx(want, rel=0.05)
    assert res.summary.utilisation["n0.0"] == pytest.approx(rho, rel=0.03)


def test_md1_whole_request_with_batch_of_one() -> None:
    # batch limit 1: the next prompt cannot start until the previous request has finished, so
    # the service time is deterministic: prefill + (out - 1) decode steps
    timing = ConstTiming(p=0.5 / 32, d=0.05)
    service = 0.5 + 9 * 0.05
    rho = 0.6
    reqs = poisson(rho / service, 40000, Fixed(32), Fixed(10), np.random.default_rng(3))
    res = simulate(SimModel((_both(batch=1),), timing), reqs, warmup=1000)
    assert res.summary.waiting_s.mean == pytest.approx(_md1_wait(rho, service), rel=0.05)
    assert res.summary.e2e_s.p50 >= service - 1e-9


def test_zero_load_latency_is_the_timing_sum() -> None:
    timing = ConstTiming(p=0.2 / 32, d=0.08, lat=0.003, bw=1e6, act=1000, kv=500)
    model = _split_model(timing)
    # one request alone, far apart from any other
    reqs = [poisson(1.0, 1, Fixed(32), Fixed(5), np.random.default_rng(0))[0]]
    res = simulate(model, reqs)
    r = res.records[0]
    assert r.waiting_s == 0.0
    # prefill: two stages of 0.1 s, activations 32*1000 B over 1 MB/s + 3 ms
    hop_act = 0.003 + 32 * 1000 / 1e6
    t_prefill = 0.1 + hop_act + 0.1
    token_hop = 0.003 + 8 / 1e6
    # the first token is made on the last prefill stage and delivered to the entry (stage 0)
    assert r.ttft_s == pytest.approx(t_prefill + token_hop, abs=1e-12)
    # hand-off: last prefill stage (blocks 2..4) -> decoder stage 1 (blocks 1..4): 2 blocks of KV;
    # first stage (0..2) -> decoder stage 0 (0..1) and stage 1 (1..2); the last stage's KV is
    # what the decode start waits for (the first stage's overlaps the second stage's compute)
    kv_last = 0.003 + 32 * 500 * 2 / 1e6
    start_decode = max(t_prefill + kv_last, t_prefill + token_hop)
    # 4 decode steps: each is two stages (0.04 each) + hop c->d (1 seq * 1000 B) + token back d->c
    step = 0.08 + (0.003 + 1000 / 1e6) + (0.003 + 8 / 1e6)
    # the last token leaves the last decoder stage for the entry (node "a"), not for stage 0
    want = start_decode + 4 * step - (0.003 + 8 / 1e6) + (0.003 + 8 / 1e6)
    assert r.e2e_s == pytest.approx(want, abs=1e-9)


def test_conservation_and_monotone_time() -> None:
    timing = ConstTiming(p=0.3 / 32, d=0.05, lat=0.001, bw=1e7, d_per_seq=0.002)
    model = SimModel((_both(2, rid=0), _both(1, rid=1, batch=3)), timing)
    reqs = poisson(4.0, 800, Fixed(40), Fixed(12), np.random.default_rng(11))
    trace: list = []
    res = simulate(model, reqs, trace=trace)
    times = [t for t, _, _ in trace]
    assert all(b >= a for a, b in itertools.pairwise(times))
    for kind in ("arrive", "prefill_start", "finish"):
        ids = sorted(i for _, k, i in trace if k == kind)
        assert ids == list(range(len(reqs))), kind
    for r in res.records:
        assert r.arrival <= r.prefill_start <= r.first_token <= r.finish
    assert sum(r.output_tokens for r in res.records) == 800 * 12
    assert {r.prefill_replica for r in res.records} == {0, 1}  # routing uses both


def test_kv_limit_holds_and_blocks_admission() -> None:
    timing = ConstTiming(p=0.01 / 32, d=0.1)
    model = _split_model(timing, dec_batch=100, dec_cap=3 * (32 + 20))  # room for 3 sequences
    res = simulate(model, closed_batch(10, 32, 20))
    starts = sorted(r.prefill_start for r in res.records)
    finishes = sorted(r.finish for r in res.records)
    # the 4th prompt cannot start before the 1st request has finished
    assert starts[3] >= finishes[0] - 1e-6  # finish includes the 8-byte hop to the entry
    assert res.summary.waiting_s.mean > 0


def test_same_seed_same_numbers() -> None:
    timing = ConstTiming(p=0.3 / 32, d=0.05, lat=0.001, bw=1e7, d_per_seq=0.002)
    model = _split_model(timing)
    a = simulate(model, poisson(2.0, 300, Fixed(64), Fixed(30), np.random.default_rng(5)))
    b = simulate(model, poisson(2.0, 300, Fixed(64), Fixed(30), np.random.default_rng(5)))
    c = simulate(model, poisson(2.0, 300, Fixed(64), Fixed(30), np.random.default_rng(6)))
    assert a.records == b.records and a.summary == b.summary
    assert a.records != c.records


def test_no_bubbles_beats_bubbles_on_a_pipeline() -> None:
    # a 4-stage decoder: with a barrier each iteration drains the pipeline
    timing = ConstTiming(p=0.01 / 32, d=0.4, lat=0.01, bw=1e9)
    model = SimModel((_both(4, batch=8),), timing)
    reqs = closed_batch(8, 32, 50)
    nb = simulate(model, reqs, SimConfig(pipeline="no-bubbles")).summary.throughput_tok_s
    bb = simulate(model, reqs, SimConfig(pipeline="bubbles")).summary.throughput_tok_s
    assert nb > 1.5 * bb
    # a stage serves one micro-batch (2 sequences) per 0.1 s: 20 tokens/s is the ceiling
    assert nb <= 20.0


def test_bubbles_single_micro_batch_token_time() -> None:
    # one sequence alone: both modes give the same ring time per token
    timing = ConstTiming(p=0.01 / 32, d=0.4, lat=0.01, bw=1e9)
    model = SimModel((_both(4),), timing)
    for mode in ("bubbles", "no-bubbles"):
        r = simulate(model, closed_batch(1, 32, 11), SimConfig(pipeline=mode)).records[0]
        # 4 stages of 0.1 s, 3 activation hops, the token back from the last stage to stage 0
        assert r.tpot_s == pytest.approx(0.4 + 3 * (0.01 + 100 / 1e9) + (0.01 + 8 / 1e9), rel=1e-9)


def test_chunked_prefill_pipelines_long_prompts() -> None:
    timing = ConstTiming(p=1 / 1024, d=0.01, act=0)
    model = SimModel((_both(4),), timing)
    whole = simulate(model, closed_batch(1, 1024, 1), SimConfig(prefill_chunk_tokens=1024))
    chunked = simulate(model, closed_batch(1, 1024, 1), SimConfig(prefill_chunk_tokens=128))
    assert whole.records[0].ttft_s == pytest.approx(1.0)
    # 8 chunks through 4 stages of 1/32 s each: (8 + 3) * 1/32
    assert chunked.records[0].ttft_s == pytest.approx(11 / 32)


def test_request_too_big_for_every_decoder_is_a_clear_error() -> None:
    model = SimModel((_both(cap=100),), ConstTiming())
    with pytest.raises(SimError, match="needs 130 KV tokens"):
        simulate(model, closed_batch(1, 100, 30))


def test_plan_without_decoder_is_rejected() -> None:
    p = SimReplica(0, "prefill", (SimStage("a", 0, 4),), 10**9, 8)
    with pytest.raises(SimError, match="no decoder"):
        SimModel((p,), ConstTiming())


def test_event_queue_tie_break_and_no_time_travel() -> None:
    q = EventQueue()
    q.push(1.0, "b")
    q.push(1.0, "a")
    q.push(0.5, "c")
    assert [q.pop()[1] for _ in range(3)] == ["c", "b", "a"]
    with pytest.raises(SimError):
        q.push(0.2, "late")


def test_routing_least_predicted_completion() -> None:
    c = [Candidate(2, 1.0, 0.5, 3.0), Candidate(1, 0.0, 0.5, 4.5), Candidate(3, 0.0, 0.2, 1.0,
                                                                             has_room=False)]
    assert predicted_completion(c[0]) == 4.5
    assert choose(c) == 3
    assert choose(c, need_room=True) == 2  # 4.5 beats 5.0
    assert choose([Candidate(5, 0, 1, 0), Candidate(4, 1, 0, 0)]) == 4  # a tie goes to the lower id
    assert choose([]) is None


def test_bursty_keeps_mean_rate_and_is_burstier() -> None:
    rng = np.random.default_rng(2)
    b = bursty(2.0, 20000, Fixed(8), Fixed(8), rng, mean_on_s=5, mean_off_s=5)
    p = poisson(2.0, 20000, Fixed(8), Fixed(8), np.random.default_rng(2))
    rate = len(b) / b[-1].arrival
    assert rate == pytest.approx(2.0, rel=0.08)
    gaps_b = np.diff([r.arrival for r in b])
    gaps_p = np.diff([r.arrival for r in p])
    assert np.std(gaps_b) / np.mean(gaps_b) > 1.3 * np.std(gaps_p) / np.mean(gaps_p)


def test_trace_parsing() -> None:
    reqs = parse_trace("arrival_s,input_tokens,output_tokens\n# comment\n2.5,10,3\n0.5,7,1\n")
    assert [(r.id, r.arrival, r.input_tokens, r.output_tokens) for r in reqs] == [
        (0, 0.5, 7, 1), (1, 2.5, 10, 3)]
    with pytest.raises(UserError, match="line 2"):
        parse_trace("1,2,3\n1,x,3\n")
    with pytest.raises(UserError, match="no requests"):
        parse_trace("# nothing\n")
    assert math.isfinite(reqs[1].arrival)


class TwoSpeedTiming(ConstTiming):
    """Replica 0 decodes at ``fast`` s per token, replica 1 at ``slow``."""

    def __init__(self, fast: float, slow: float) -> None:
        super().__init__(p=0.001 / 32, d=0.0)
        self.speeds = (fast, slow)

    def decode_s(self, rep, stage, batch, ctx):
        return self.speeds[rep.id] / len(rep.stages)


@pytest.mark.parametrize("slow, second_goes_to", [(0.15, 1), (0.3, 0)])
def test_router_weighs_the_wait_for_a_slot_against_a_slower_replica(slow, second_goes_to) -> None:
    # one slot each; the first request takes the fast replica (10 tokens: ~0.9 s there). The
    # second, right after, either waits ~0.9 s for that slot and decodes in 0.9 s (~1.8 s), or
    # starts at once on the slow one: 9 * 0.15 = 1.35 s (goes there) or 9 * 0.3 = 2.7 s (waits)
    model = SimModel((_both(batch=1, rid=0), _both(batch=1, rid=1)), TwoSpeedTiming(0.1, slow))
    reqs = [Request(0, 0.0, 32, 10), Request(1, 0.01, 32, 10)]
    res = simulate(model, reqs)
    assert res.records[0].prefill_replica == 0
    assert res.records[1].prefill_replica == second_goes_to
    if second_goes_to == 0:
        assert res.records[1].waiting_s > 0.8  # it chose to wait for the fast replica's slot


def test_a_node_holding_two_stages_is_one_server() -> None:
    # stages a, b, a (the source with embedding and head): 0.1 s of decode each, so node a
    # works 0.2 s per micro-batch; three micro-batches circulate, so a, not the 0.1 s stages,
    # sets the pace: 3 tokens per 0.6 s
    timing = ConstTiming(p=1e-6, d=0.3)
    stages = (SimStage("a", 0, 2), SimStage("b", 2, 4), SimStage("a", 4, 6))
    model = SimModel((SimReplica(0, "both", stages, 10**9, 3),), timing)
    res = simulate(model, closed_batch(3, 4, 201))
    assert res.summary.throughput_tok_s == pytest.approx(5.0, rel=0.03)
    assert res.busy_s["a"] == pytest.approx(2 * res.busy_s["b"], rel=1e-6)
    assert res.summary.utilisation["a"] == pytest.approx(1.0, rel=0.03)
    # one request alone: the three stages in turn, nothing overlaps
    alone = simulate(model, closed_batch(1, 4, 11)).records[0]
    assert alone.e2e_s == pytest.approx(10 * 0.3 + 4e-6, rel=1e-6)


def test_two_replicas_sharing_a_node_are_rejected() -> None:
    r0 = SimReplica(0, "both", (SimStage("a", 0, 2), SimStage("b", 2, 4)), 10**9, 4)
    r1 = SimReplica(1, "both", (SimStage("b", 0, 4),), 10**9, 4)
    with pytest.raises(SimError, match="two replicas"):
        simulate(SimModel((r0, r1), ConstTiming()), closed_batch(1, 4, 2))


def test_start_policy_prefers_a_replica_that_can_start_now() -> None:
    c = [Candidate(0, 0.9, 0.1, 1.0), Candidate(1, 0.0, 0.1, 2.0), Candidate(2, 0.0, 0.1, 2.5, busy_s=0.2),
         Candidate(3, 0.0, 0.1, 2.0, reach_s=0.05)]
    assert choose(c) == 0  # least completion: 2.0 s, after waiting 0.9 s
    assert choose(c, policy="start") == 1  # starts now; 3 starts after 0.05 s, 2 after 0.2 s
    assert choose(c[2:], policy="start") == 3
    # equal starts: the least completion decides, then the lowest id
    assert choose([Candidate(4, 0.0, 0.1, 3.0), Candidate(5, 0.0, 0.1, 2.0)], policy="start") == 5
    assert choose([Candidate(5, 0.0, 0.1, 2.0), Candidate(4, 0.0, 0.1, 2.0)], policy="start") == 4
    with pytest.raises(UserError, match="unknown routing policy"):
        choose(c, policy="fastest")
    with pytest.raises(SimError, match="unknown routing policy"):
        SimConfig(routing="fastest")


def test_first_token_policy_weighs_the_prefill_against_the_start() -> None:
    c = [Candidate(0, 0.0, 0.5, 1.0), Candidate(1, 0.0, 0.1, 2.0, busy_s=0.2),
         Candidate(2, 0.3, 0.1, 2.0)]
    assert choose(c, policy="start") == 0  # idle, but its prefill takes 0.5 s
    assert choose(c, policy="first_token") == 1  # first token at 0.3 s, replica 2's at 0.4 s
    # equally soon: the least completion, then the lowest id
    assert choose([Candidate(4, 0.1, 0.1, 3.0), Candidate(5, 0.0, 0.2, 2.0)], policy="first_token") == 5
    assert choose([Candidate(5, 0.0, 0.2, 2.0), Candidate(4, 0.0, 0.2, 2.0)], policy="first_token") == 4
    # the objective picks the policy: the node's router, the serving experiment and the E2LLM one alike
    assert (policy_for("waiting"), policy_for("latency"), policy_for("throughput")) == (
        "first_token", "completion", "completion")


def test_first_token_routing_answers_sooner_than_start_over_unequal_replicas() -> None:
    """A slow idle replica wins every prompt under "start" whenever the fast one is a step away;
    "first_token" sends the prompt there only when its first token comes sooner: less time to the
    first token, at some more time before the prefill starts."""
    class Slow(TwoSpeedTiming):  # replica 1 prefills 4x slower too
        def prefill_s(self, rep, stage, tokens, ctx_before):
            return 0.002 * tokens * (4 if rep.id else 1) / len(rep.stages)

    model = SimModel((_both(batch=4, rid=0), _both(batch=4, rid=1)), Slow(0.01, 0.04))
    reqs = poisson(8.0, 400, Fixed(32), Fixed(10), np.random.default_rng(5))
    start = simulate(model, reqs, SimConfig(routing="start")).summary
    first = simulate(model, reqs, SimConfig(routing="first_token")).summary
    assert first.ttft_s.mean < start.ttft_s.mean
    assert start.waiting_s.mean <= first.waiting_s.mean


def test_a_replica_that_can_never_hold_a_request_is_no_candidate() -> None:
    """A BOTH replica whose KV room is smaller than a request is not routed to (it would wait
    there for good); one that can hold it is, however slow."""
    small = SimReplica(0, "both", (SimStage("a", 0, 4),), 20, 4)
    big = SimReplica(1, "both", (SimStage("b", 0, 4),), 10**6, 4)
    for policy in ("first_token", "start", "completion"):
        res = simulate(SimModel((small, big), TwoSpeedTiming(0.01, 0.5)), [Request(0, 0.0, 32, 10)],
                       SimConfig(routing=policy))
        assert [r.prefill_replica for r in res.records] == [1]


def test_start_policy_never_waits_for_a_fast_replica_while_another_is_free() -> None:
    # the case where "completion" waits ~0.9 s for the fast replica's slot (test above): under
    # "start" the second request starts at once on the slow replica
    model = SimModel((_both(batch=1, rid=0), _both(batch=1, rid=1)), TwoSpeedTiming(0.1, 0.3))
    reqs = [Request(0, 0.0, 32, 10), Request(1, 0.01, 32, 10)]
    res = simulate(model, reqs, SimConfig(routing="start"))
    assert [r.prefill_replica for r in res.records] == [0, 1]
    assert res.records[1].waiting_s == 0.0
    # many requests over unequal replicas: no prompt waits while a replica has a free slot
    model = SimModel((_both(batch=2, rid=0), _both(batch=2, rid=1)), TwoSpeedTiming(0.05, 0.2))
    reqs = poisson(1.0, 400, Fixed(32), Fixed(10), np.random.default_rng(5))
    start = simulate(model, reqs, SimConfig(routing="start")).summary
    compl = simulate(model, reqs, SimConfig(routing="completion")).summary
    assert start.waiting_s.mean < compl.waiting_s.mean


def test_a_stage_that_idled_pays_its_measured_idle_time():
    """The simulator charges a stage's work ``cost.stage_idle_time`` more when its node was idle
    just before: one request through a two-stage ring pays it at both stages on every step (each
    waits while the other computes) and on its prompt; through one stage only on the prompt (its
    steps run back to back). Without the measurement nothing changes."""
    from meshllm.planner import cost
    from meshllm.planner.cost import ModelProfile
    from meshllm.planner.types import Device, LengthDist, Network, Plan, Replica, Role, Stage, Workload
    from meshllm.sim.adapter import to_sim_model

    p = ModelProfile.from_preset("tiny")
    n = p.n_blocks
    base = dict(prefill_s_per_token=tuple([1e-4] * n), decode_s_per_step=tuple([1e-3] * n), measured=True)
    wl = Workload(arrival_rate=1.0, input_len=LengthDist.fixed(8), output_len=LengthDist.fixed(9), max_batch=4)
    net = Network(1000, 1.0)
    req = [Request(0, 0.0, 8, 9)]

    def run(idle_s: float, stages: tuple[Stage, ...], long_s: float = 0.0) -> tuple[float, float, float]:
        devs = {d: Device(d, 1 << 30, 1.0, 1.0, idle_step_s=idle_s, idle_step_frac=idle_s and 0.5,  # type: ignore[arg-type]
                          idle_long_s=long_s, **base)
                for d in ("a", "b")}
        plan = Plan(0, (Replica(0, Role.BOTH, stages),))
        rec = simulate(to_sim_model(plan, p, devs, net, wl), req).records[0]
        idle = sum(cost.stage_idle_time(p, devs[s.node], s.first, s.end) for s in stages)
        return rec.ttft_s, rec.tpot_s or 0.0, idle

    two = (Stage("a", (0, 3)), Stage("b", (3, n)))
    ttft0, tpot0, _ = run(0.0, two)
    ttft_two, tpot_two = ttft0, tpot0
    ttft1, tpot1, extra = run(2e-3, two)
    assert extra == pytest.approx(2 * 2e-3 + 0.5 * n * 1e-3)
    assert tpot1 == pytest.approx(tpot0 + extra)
    assert ttft1 == pytest.approx(ttft0 + extra)
    one = (Stage("a", (0, n)),)
    ttft0, tpot0, _ = run(0.0, one)
    ttft1, tpot1, extra = run(2e-3, one)
    assert tpot1 == pytest.approx(tpot0)
    assert ttft1 == pytest.approx(ttft0 + extra)
    # the prompt comes to nodes idle for long (never used): the long pause's figure, where measured;
    # the ring's stages wait a step of the other (well under IDLE_GAP_S): the short one
    ttft2, tpot2, _ = run(2e-3, two, long_s=9e-3)
    long = sum(cost.idle_time(Device("x", 1, 1.0, 1.0, idle_step_s=2e-3, idle_step_frac=0.5, idle_long_s=9e-3),
                              (s.end - s.first) * 1e-3, cost.LONG_IDLE_GAP_S) for s in two)
    assert long > 2 * 2e-3 + 0.5 * n * 1e-3  # more than the short pause's
    assert ttft2 == pytest.approx(ttft_two + long) and tpot2 == pytest.approx(tpot_two + 2 * 2e-3 + 0.5 * n * 1e-3)


def test_a_request_comes_in_and_goes_back_at_its_own_entry():
    """A request names the node whose API took it: its prompt travels from there to the replica
    and its tokens back, one link latency each way (a benchmark sends requests to every node in
    turn); without one, the replica's first stage is the entry as before."""
    from meshllm.planner.cost import ModelProfile
    from meshllm.planner.types import Device, LengthDist, Link, Network, Plan, Replica, Role, Stage, Workload
    from meshllm.sim.adapter import to_sim_model

    p = ModelProfile.from_preset("tiny")
    n = p.n_blocks
    base = dict(prefill_s_per_token=tuple([1e-4] * n), decode_s_per_step=tuple([1e-3] * n), measured=True)
    devs = {d: Device(d, 1 << 30, 1.0, 1.0, **base) for d in ("a", "b")}  # type: ignore[arg-type]
    wl = Workload(arrival_rate=1.0, input_len=LengthDist.fixed(8), output_len=LengthDist.fixed(5), max_batch=4)
    net = Network(1000, 1.0, (Link("a", "b", 1000, 6.0),))
    model = to_sim_model(Plan(0, (Replica(0, Role.BOTH, (Stage("a", (0, n)),)),)), p, devs, net, wl)
    home = simulate(model, [Request(0, 0.0, 8, 5)]).records[0]
    away = simulate(model, [Request(0, 0.0, 8, 5, entry="b")]).records[0]
    assert away.ttft_s == pytest.approx(home.ttft_s + 2 * 3e-3, rel=1e-3)  # 6 ms round trip: 3 ms each way
    assert away.finish - away.first_token == pytest.approx(home.finish - home.first_token)
