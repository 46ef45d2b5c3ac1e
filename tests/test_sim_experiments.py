"""The papers' experiments on the real planner: Table IV's pattern and E2LLM's claim (reduced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshllm.cli import main
from meshllm.commands.simulate import load_testbed
from meshllm.planner.strategies import make_plan
from meshllm.sim import experiments as ex

ROOT = Path(__file__).resolve().parents[1]
TESTBEDS = ROOT / "tools" / "testbeds"


@pytest.fixture(scope="module")
def table4() -> dict[tuple[str, str], dict]:
    rows = ex.edgeshard_table4(make_plan, load_testbed(TESTBEDS / "edgeshard.toml"))
    return {(r["model"], r["method"]): r for r in rows}


def test_table4_oom_cells_match_the_paper(table4) -> None:
    differ = sorted(k for k, r in table4.items() if r["oom"] != r["paper_oom"])
    assert differ == []
    # 13B Cloud-Edge-Even runs because its head stays on the source: 20 layers (23.6 GiB) on the
    # RTX 3090's 24 GiB; with the head as well (26.05 GB > 25.77 GB) it could not
    r = table4[("llama2-13b", "Cloud-Edge-Even")]
    assert r["latency_ms"] > table4[("llama2-13b", "EdgeShard")]["latency_ms"]
    assert 1 <= r["batch"] < 8  # little KV room is left next to 23.6 GiB of weights


def test_table4_edgeshard_no_worse_than_any_baseline(table4) -> None:
    for model in ex.TABLE4_MODELS:
        es = table4[(model, "EdgeShard")]
        assert not es["oom"]
        for method in ("Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt"):
            b = table4[(model, method)]
            if b["oom"]:
                continue
            assert es["latency_ms"] <= b["latency_ms"] * (1 + 1e-9), (model, method)
            assert es["throughput_tok_s"] >= b["throughput_tok_s"] * (1 - 1e-9), (model, method)


def test_table4_no_bubbles_never_below_bubbles(table4) -> None:
    for key, r in table4.items():
        if r["oom"]:
            continue
        assert r["throughput_tok_s"] >= r["throughput_bubbles_tok_s"] * (1 - 1e-9), key
    es = table4[("llama2-7b", "EdgeShard")]
    assert es["throughput_tok_s"] > 1.2 * es["throughput_bubbles_tok_s"]  # a 4-stage pipeline
    solo = table4[("llama2-7b", "Edge-Solo")]
    assert solo["throughput_tok_s"] == pytest.approx(solo["throughput_bubbles_tok_s"])


def test_table4_edge_solo_7b_is_memory_bound(table4) -> None:
    # 26.4 GB of weights / 204.8 GB/s = 129 ms per token at full bandwidth; the paper: 140.34
    r = table4[("llama2-7b", "Edge-Solo")]
    assert 129 < r["latency_ms"] < 150
    assert r["latency_ms"] == pytest.approx(r["paper_latency_ms"], rel=0.05)
    # Cloud-Edge-Opt picks local execution at 1 Mb/s, as in the paper
    assert table4[("llama2-7b", "Cloud-Edge-Opt")]["latency_ms"] == pytest.approx(r["latency_ms"])


def test_e2llm_halves_splitwise_wait_at_high_load_reduced() -> None:
    tb = load_testbed(TESTBEDS / "home.toml")
    arm = ex.e2llm_vs_splitwise_arm(make_plan, tb, "llama2-7b", "long-in/short-out",
                                    loads=(0.8, 1.0), n_requests=300,
                                    strategies=("e2llm", "splitwise"))
    assert arm.saturation_rps > 0
    keys = {"testbed", "mix", "load_fraction", "strategy", "mean_wait_s", "p99_wait_s",
            "throughput_tok_s"}
    assert all(keys <= set(r) for r in arm.rows)
    reds = ex.reductions(arm.rows)
    assert [r["load_fraction"] for r in reds] == [0.8, 1.0]
    for r in reds:
        assert r["e2llm_wait_s"] <= 0.5 * r["splitwise_wait_s"], r
    again = ex.e2llm_vs_splitwise_arm(make_plan, tb, "llama2-7b", "long-in/short-out",
                                      loads=(0.8, 1.0), n_requests=300,
                                      strategies=("e2llm", "splitwise"))
    assert again.rows == arm.rows  # same seed, same numbers


def test_saturation_rate_of_a_steady_stream() -> None:
    from meshllm.sim.metrics import RequestRecord, summarise
    from meshllm.sim.serving import SimResult

    recs = tuple(RequestRecord(i, 0.0, 1, 1, 0, 0, 0.0, 0.0, 0.5 * (i + 1)) for i in range(100))
    res = SimResult(recs, {}, 0, summarise(list(recs), {}))
    assert ex.saturation_rate(res) == pytest.approx(2.0)


def test_simulate_command_single_plan_json(capsys) -> None:
    rc = main(["simulate", "--testbed", str(TESTBEDS / "home.toml"), "--model", "llama2-7b",
               "--strategy", "splitwise", "--rate", "0.05", "--requests", "20",
               "--input-len", "uniform:32:64", "--output-len", "16", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["requests"] == 20
    assert out["summary"]["waiting_s"]["mean"] >= 0
    assert set(out["summary"]["utilisation"]) <= {d.name for d in
                                                  load_testbed(TESTBEDS / "home.toml").devices}


def test_simulate_command_trace_and_table(tmp_path, capsys) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0,40,8\n1.5,300,4\n2,20,12\n")
    rc = main(["simulate", "--testbed", str(TESTBEDS / "home.toml"), "--strategy", "ring",
               "--trace", str(trace)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 requests" in out and "waiting s" in out


@pytest.mark.parametrize("argv, msg", [
    (["simulate"], "--experiment"),
    (["simulate", "--testbed", "/nonexistent.toml"], "not found"),
    (["simulate", "--testbed", str(TESTBEDS / "home.toml"), "--input-len", "gauss:3"], "bad length"),
    (["simulate", "--testbed", str(TESTBEDS / "home.toml"), "--strategy", "nope"], "unknown strategy"),
])
def test_simulate_command_bad_input_is_one_line(argv, msg, capsys) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_strategy_that_cannot_plan_is_a_row_not_a_crash() -> None:
    from meshllm.errors import PlanError

    def plan_fn(strategy, *args):
        if strategy == "ring":
            raise PlanError("node x needs 13 GiB but has 12 GiB")
        return make_plan(strategy, *args)

    tb = load_testbed(TESTBEDS / "home.toml")
    arm = ex.e2llm_vs_splitwise_arm(plan_fn, tb, "llama2-7b", "short-in/long-out", loads=(0.8,),
                                    n_requests=30, strategies=("splitwise", "ring"))
    ring = [r for r in arm.rows if r["strategy"] == "ring"]
    assert ring and ring[0]["mean_wait_s"] is None and "13 GiB" in ring[0]["error"]
    assert next(r for r in arm.rows if r["strategy"] == "splitwise")["mean_wait_s"] is not None
    assert ex.reductions(arm.rows) == []  # no e2llm row, nothing to compare
