"""The simulator on degenerate workloads (one output token, one prompt token, a rate near zero,
a batch of one, fixed lengths) and on every kind of replica set: each request is served once,
in causal order, and the summary has a number for every figure that exists."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device, LengthDist, Network, Plan, Replica, Role, Stage, Workload
from meshllm.sim.adapter import to_sim_model
from meshllm.sim.serving import simulate
from meshllm.sim.workload import poisson

TINY = ModelProfile.from_preset("tiny")
DEVS = {f"d{j}": Device.from_spec(f"d{j}", 1.0, 2.0 + 3 * j, 100.0 + 50 * j, source=j == 0) for j in range(3)}
NET = Network(200, 1.0, ())
N = TINY.n_blocks
SETS = {  # replica sets over three devices
    "one both": ((Role.BOTH, (("d0", 0, N),)),),
    "both pipeline": ((Role.BOTH, (("d0", 0, 3), ("d1", 3, N))),),
    "two both": ((Role.BOTH, (("d0", 0, N),)), (Role.BOTH, (("d1", 0, 4), ("d2", 4, N)))),
    "prefill decoder": ((Role.PREFILL, (("d0", 0, N),)), (Role.DECODER, (("d1", 0, 4), ("d2", 4, N)))),
    "decoder prefill": ((Role.DECODER, (("d2", 0, N),)), (Role.PREFILL, (("d0", 0, 5), ("d1", 5, N)))),
}
lengths = st.one_of(st.just(LengthDist.fixed(1)), st.integers(1, 120).map(LengthDist.fixed),
                    st.integers(1, 60).map(lambda lo: LengthDist.uniform(lo, lo + 60)),
                    st.lists(st.integers(1, 120), min_size=1, max_size=3).map(LengthDist.empirical))


def _plan(name: str) -> Plan:
    return Plan(0, tuple(Replica(i, role, tuple(Stage(n, (a, b)) for n, a, b in stages))
                         for i, (role, stages) in enumerate(SETS[name])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SETS)), rate=st.one_of(st.just(1e-9), st.floats(1e-6, 200.0)),
       inp=lengths, out=lengths, batch=st.integers(1, 8), n=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_degenerate_workloads_serve_every_request_once_in_order(name, rate, inp, out, batch, n, seed) -> None:
    w = Workload(rate, inp, out, batch)
    model = to_sim_model(_plan(name), TINY, DEVS, NET, w)
    reqs = poisson(rate, n, inp, out, np.random.default_rng(seed))
    res = simulate(model, reqs)
    assert sorted(r.id for r in res.records) == [q.id for q in reqs]
    by_id = {q.id: q for q in reqs}
    for r in res.records:
        q = by_id[r.id]
        assert (r.input_tokens, r.output_tokens) == (q.input_tokens, q.output_tokens)
        assert r.arrival <= r.prefill_start < r.first_token <= r.finish
        if r.output_tokens == 1:
            assert r.first_token == r.finish
        assert (r.tpot_s is None) == (r.output_tokens == 1)
    s = res.summary
    assert s.requests == n
    for stat in (s.waiting_s, s.ttft_s, s.e2e_s):
        assert math.isfinite(stat.mean) and stat.mean >= 0
    if all(r.output_tokens == 1 for r in res.records):
        assert math.isnan(s.tpot_s.mean)  # no request has a time per output token
    else:
        assert math.isfinite(s.tpot_s.mean) and s.tpot_s.mean > 0
    assert s.throughput_tok_s >= 0 and math.isfinite(s.throughput_tok_s)


def test_simulate_cli_with_one_output_token_prints_no_nan(capsys) -> None:
    import json
    from pathlib import Path

    from meshllm.cli import main

    home = str(Path(__file__).resolve().parents[1] / "tools/testbeds/home.toml")
    argv = ["simulate", "--testbed", home, "--model", "llama2-7b", "--output-len", "1", "--input-len", "1",
            "--max-batch", "1", "--requests", "20"]
    assert main([*argv, "--json"]) == 0

    def no_nan(c: str) -> None:
        raise AssertionError(f"{c} in JSON")

    doc = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    assert doc["summary"]["tpot_s"]["mean"] is None and doc["summary"]["requests"] == 20
    assert main(argv) == 0
    tpot = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("TPOT s"))
    assert tpot.split()[2:] == ["-", "-", "-", "-"]
