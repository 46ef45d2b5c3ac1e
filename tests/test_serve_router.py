"""The entry's router: decoders with room first, then the predicted completion from the shared
estimates; a BOTH replica prefills its own decodes; load reports and this entry's own admissions
count against a replica's room."""

from __future__ import annotations

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
