"""The entry's router: decoders with room first, then the predicted completion from the shared
estimates; a BOTH replica prefills its own decodes; load reports and this entry's own admissions
count against a replica's room."""

from __future__ import annotations

import pytest

from meshllm.planner.types import Plan, Replica, Role, Stage
from meshllm.serve.router import Router
from meshllm.serve.routes import Routes
from meshllm.wire.messages import LoadReport


def routes() -> Routes:
    reps = (Replica(0, Role.PREFILL, (Stage("a", (0, 5)),)),
            Replica(1, Role.DECODER, (Stage("b", (0, 5)),)),
            Replica(2, Role.DECODER, (Stage("c", (0, 2)), Stage("d", (2, 5)))),
            Replica(3, Role.BOTH, (Stage("e", (0, 5)),)))
    return Routes(7, Plan(7, reps))


def test_the_faster_decoder_first_and_a_both_replica_prefills_its_own() -> None:
    speed = {1: 0.010, 2: 0.004, 3: 0.020}
    r = Router(lambda e: None, prefill_estimate=lambda rt, rid, n: {0: 0.1, 3: 0.3}[rid] * n / 10,
               decode_estimate=lambda rt, rid, b: speed[rid])
    pairs = r.rank(routes(), 10, 20)
    assert [d for _, d in pairs] == [2, 1, 3]
    assert dict((d, p) for p, d in pairs) == {2: 0, 1: 0, 3: 3}


def test_a_full_decoder_goes_last_and_admissions_count_until_the_next_report() -> None:
    r = Router(lambda e: None, decode_estimate=lambda rt, rid, b: {1: 0.01, 2: 0.004, 3: 0.02}[rid])
    rt = routes()
    r.report(LoadReport("c", 7, 2, {"decoding": 4, "max_batch": 4, "free_tokens": 1000}))
    assert [d for _, d in r.rank(rt, 10, 20)][:2] == [1, 3]  # 2 is full
    r.report(LoadReport("c", 7, 2, {"decoding": 0, "max_batch": 1, "free_tokens": 1000}))
    assert r.rank(rt, 10, 20)[0][1] == 2
    r.admitted(7, 2)  # this entry just sent one there: full until the next report says otherwise
    assert r.rank(rt, 10, 20)[0][1] != 2
    r.report(LoadReport("c", 7, 2, {"decoding": 0, "max_batch": 1, "free_tokens": 10}))
    assert r.rank(rt, 10, 20)[0][1] != 2  # not enough KV tokens for 10 + 20


def test_no_prefill_or_no_decoder_means_no_route() -> None:
    only_prefill = Routes(1, Plan(1, (Replica(0, Role.PREFILL, (Stage("a", (0, 5)),)),)))
    assert Router(lambda e: None).rank(only_prefill, 3, 3) == []


# --- BOTH replicas: the prompts queued at each, as the simulator's "start" policy sees them ---------

PREFILL_S = {0: 0.28, 1: 0.37, 2: 0.58, 3: 0.87}  # a desktop, a mini-PC, a laptop, an old laptop
STEP_S = {0: 0.019, 1: 0.026, 2: 0.046, 3: 0.074}


def four_both() -> Routes:
    reps = tuple(Replica(i, Role.BOTH, (Stage(n, (0, 5)),)) for i, n in enumerate("wxyz"))
    return Routes(3, Plan(3, reps))


def start_router() -> Router:
    return Router(lambda e: None, policy="start", prefill_estimate=lambda rt, rid, n: PREFILL_S[rid],
                  decode_estimate=lambda rt, rid, b: STEP_S[rid])


def test_an_entrys_own_prompts_in_prefill_spread_the_next_over_the_both_replicas() -> None:
    r, rt = start_router(), four_both()
    picks = []
    for i in range(4):
        p, d = r.rank(rt, 96, 3, now=0.0)[0]
        assert p == d  # a BOTH replica prefills what it decodes
        picks.append(p)
        r.sent(f"q{i}", 3, p, PREFILL_S[p], now=0.0)
        r.admitted(3, p)
    # each prompt starts where nothing waits, the fastest such replica first; the old way (the
    # fastest decoder for all) sent all four to replica 0
    assert picks == [0, 1, 2, 3]
    r.prefilled("q0")  # the first prompt's first token came: replica 0 can start the next at once
    assert r.rank(rt, 96, 3, now=0.3)[0][0] == 0


def test_other_entries_prompts_come_from_the_load_report_and_drain_from_it() -> None:
    r, rt = start_router(), four_both()
    # replica 0 holds two requests, neither decoding yet: two prompts of other entries queued there
    r.report(LoadReport("w", 3, 0, {"decoding": 2, "started": 0, "max_batch": 64, "free_tokens": -1}), now=10.0)
    assert r.queued_s(rt, 0, PREFILL_S[0], now=10.0) == pytest.approx(0.56)
    assert r.rank(rt, 96, 3, now=10.0)[0][0] == 1
    # 0.6 s later they are done by the estimate: replica 0 again, before the next report says so
    assert r.queued_s(rt, 0, PREFILL_S[0], now=10.6) == 0.0
    assert r.rank(rt, 96, 3, now=10.6)[0][0] == 0
    # the same two reserved requests decoding (prefilled): no queue, only the running step
    r.report(LoadReport("w", 3, 0, {"decoding": 2, "started": 2, "max_batch": 64, "free_tokens": -1}), now=11.0)
    assert r.queued_s(rt, 0, PREFILL_S[0], now=11.0) == 0.0
    assert r.rank(rt, 96, 3, now=11.0)[0][0] == 1  # 0 must finish a 19 ms step first; 1 starts now


def test_a_report_does_not_count_this_entrys_own_prompts_twice() -> None:
    r, rt = start_router(), four_both()
    r.sent("mine", 3, 0, PREFILL_S[0], now=5.0)
    r.admitted(3, 0)
    r.report(LoadReport("w", 3, 0, {"decoding": 1, "started": 0, "max_batch": 64, "free_tokens": -1}), now=5.01)
    assert r.queued_s(rt, 0, PREFILL_S[0], now=5.01) == pytest.approx(PREFILL_S[0] - 0.01)
    r.prefilled("mine")
    assert r.queued_s(rt, 0, PREFILL_S[0], now=5.3) == 0.0


def test_the_completion_policy_still_queues_for_a_much_faster_both_replica() -> None:
    r = Router(lambda e: None, policy="completion", prefill_estimate=lambda rt, rid, n: PREFILL_S[rid],
               decode_estimate=lambda rt, rid, b: STEP_S[rid])
    rt = four_both()
    r.sent("q", 3, 0, 0.05, now=0.0)  # 50 ms left on replica 0: still its completion is soonest
    assert r.rank(rt, 96, 3, now=0.0)[0][0] == 0


def test_the_first_token_policy_waits_for_a_fast_replica_only_while_its_first_token_comes_sooner() -> None:
    r = Router(lambda e: None, policy="first_token", prefill_estimate=lambda rt, rid, n: PREFILL_S[rid],
               decode_estimate=lambda rt, rid, b: STEP_S[rid])
    rt = four_both()
    # replica 0 is busy for 0.05 s more: its first token at 0.33 s beats replica 1's at 0.37 s,
    # where "start" would send it to replica 1, idle
    r.sent("q", 3, 0, 0.05, now=0.0)
    assert r.rank(rt, 96, 3, now=0.0)[0][0] == 0
    assert start_router().rank(rt, 96, 3, now=0.0)[0][0] == 0  # (nothing sent on that router)
    s = start_router()
    s.sent("q", 3, 0, 0.05, now=0.0)
    assert s.rank(rt, 96, 3, now=0.0)[0][0] == 1
    # 0.2 s left at replica 0: 0.48 s there against 0.37 s at replica 1
    r.sent("q2", 3, 0, 0.15, now=0.0)
    assert r.rank(rt, 96, 3, now=0.0)[0][0] == 1
    # the allowance: what may queue at replica 1 before replica 0 (first token at 0.48 s) is sooner
    per_token = PREFILL_S[1] / 96
    assert r.queue_allowance(rt, 1, 96, 3, now=0.0) == int((0.48 - 0.37) / per_token + 1e-6)


# --- a prompt handed back ("busy"): the allowance an entry sends and what it learns from the answer


def test_the_allowance_is_the_queue_counted_plus_the_margin_to_the_runner_up() -> None:
    r, rt = start_router(), four_both()
    per_token = PREFILL_S[0] / 96
    # "start": every replica could start at once, so replica 0 is chosen by completion and any
    # prompt ahead of this one there lets another start sooner
    assert r.queue_allowance(rt, 0, 96, 3, now=0.0) == 0
    r.sent("q0", 3, 0, PREFILL_S[0], now=0.0)  # this entry's own prompt is under way there
    for rid in (1, 2, 3):
        r.sent(f"busy{rid}", 3, rid, 1.0, now=0.0)  # and a second long one at every other
    # replica 0 starts after its 0.28 s; the next soonest (replica 1) after 1.0 s: 0.72 s more may
    # be queued at 0 before replica 1 would start first
    assert r.queue_allowance(rt, 0, 96, 3, now=0.0) == int((0.28 + 0.72) / per_token + 1e-6)
    # a replica already excluded (it handed the prompt back) is no runner-up; with none left, no limit
    assert r.queue_allowance(rt, 0, 96, 3, now=0.0, exclude=frozenset({1, 2, 3})) == -1
    # "completion": the margin is the difference of the predicted completions
    c = Router(lambda e: None, prefill_estimate=lambda rt, rid, n: PREFILL_S[rid],
               decode_estimate=lambda rt, rid, b: STEP_S[rid])
    gap = (PREFILL_S[1] + 3 * STEP_S[1]) - (PREFILL_S[0] + 3 * STEP_S[0])
    assert c.queue_allowance(rt, 0, 96, 3, now=0.0) == int(gap / per_token + 1e-6)
    assert Router(lambda e: None).queue_allowance(rt, 0, 96, 3) == -1  # no estimates: no limit


def test_a_queue_a_replica_answered_with_counts_until_it_drains_or_a_report_comes() -> None:
    r, rt = start_router(), four_both()
    assert r.rank(rt, 96, 3, now=0.0)[0][0] == 0
    ahead = round(0.5 / (PREFILL_S[0] / 96))  # replica 0 handed a prompt back: 0.5 s of prompts queued there
    r.observed(rt, 0, ahead, 96, now=0.0)
    assert r.rank(rt, 96, 3, now=0.0)[0][0] == 1
    assert r.queued_s(rt, 0, PREFILL_S[0], now=0.2) == pytest.approx(0.3, abs=0.003)  # draining
    assert r.rank(rt, 96, 3, now=0.5)[0][0] == 0  # drained
    r.observed(rt, 0, ahead, 96, now=1.0)
    r.report(LoadReport("w", 3, 0, {"decoding": 0, "started": 0, "max_batch": 8}), now=1.01)
    assert r.rank(rt, 96, 3, now=1.01)[0][0] == 0  # a newer report replaces the answer
