"""``meshllm bench serving``: its trace, histogram arithmetic and judgement (pure parts), and a
quick run on the bundled model through two real node processes beside the simulator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from meshllm.bench.serving import by_prefill_replica, error_pct, hist_delta, judge, requests_for, scaled_mix
from meshllm.cli import main
from meshllm.errors import UserError

TINY = str(Path(__file__).resolve().parents[1] / "models" / "tiny")
KEYS = ("wait_ms", "wait_p99_ms", "ttft_ms", "ttft_p99_ms", "tpot_ms", "tpot_p99_ms", "tok_s", "completed",
        "rejected", "errors")


def test_scaled_mixes_and_the_trace() -> None:
    inp, out = scaled_mix("long-in/short-out", 0.125)
    assert inp.kind == "lognormal" and inp.mean_ == pytest.approx(96) and inp.high == 256
    assert out.kind == "uniform" and (out.low, out.high) == (2, 4)  # at least 2 answer tokens
    with pytest.raises(UserError):
        scaled_mix("no-such-mix", 1.0)
    slow = requests_for(inp, out, 2.0, 30, 5, 128)
    fast = requests_for(inp, out, 4.0, 30, 5, 128)
    assert slow[0].arrival == 0.0 and [r.arrival for r in slow] == sorted(r.arrival for r in slow)
    # the same requests at every rate, arrivals stretched
    assert [(r.input_tokens, r.output_tokens) for r in slow] == [(r.input_tokens, r.output_tokens) for r in fast]
    assert [r.arrival for r in fast] == pytest.approx([r.arrival / 2 for r in slow])
    assert all(r.input_tokens + r.output_tokens <= 128 and r.output_tokens >= 2 for r in slow)


def _hist(sum_: float, count: float, buckets: dict[str, float]) -> dict[str, float]:
    name = "meshllm_request_waiting_seconds"
    return {f"{name}_sum": sum_, f"{name}_count": count,
            **{f'{name}_bucket{{le="{le}"}}': c for le, c in buckets.items()}}


def test_histogram_delta_over_nodes() -> None:
    b = [_hist(1.0, 2, {"0.01": 1, "0.1": 2, "+Inf": 2}), _hist(0.0, 0, {"0.01": 0, "0.1": 0, "+Inf": 0})]
    # node 0 got 2 more (0.005 and 0.05 s), node 1 got one of 0.05 s
    a = [_hist(1.055, 4, {"0.01": 2, "0.1": 4, "+Inf": 4}), _hist(0.05, 1, {"0.01": 0, "0.1": 1, "+Inf": 1})]
    mean, p99 = hist_delta(b, a, "meshllm_request_waiting_seconds")
    assert mean == pytest.approx(0.105 / 3)
    assert 0.01 < p99 <= 0.1  # within the bucket that holds the 99th percentile
    assert hist_delta(b, b, "meshllm_request_waiting_seconds") == (None, None)


def test_requests_by_prefill_replica_over_the_entries_dashboards() -> None:
    def node(reps: dict[str, tuple[int, float, float]]) -> dict:
        return {"measured": {"replicas": {k: {"prefill": {"n": n, "ttft_s": [t, n], "wait_s": [w, n]}}
                                          for k, (n, t, w) in reps.items()}}}

    before = [node({"1:0": (2, 0.4, 0.0)}), node({})]
    # entry 0: two more on replica 0 (0.3 and 0.5 s to the first token) and one on replica 1; entry 1: one on 0
    after = [node({"1:0": (4, 1.2, 0.2), "1:1": (1, 0.25, 0.0)}), node({"1:0": (1, 0.6, 0.3)})]
    got = by_prefill_replica(before, after)
    assert got == {"1:0": {"n": 3, "ttft_ms": pytest.approx(1400 / 3, abs=0.01), "wait_ms": pytest.approx(500 / 3, abs=0.01)},
                   "1:1": {"n": 1, "ttft_ms": 250.0, "wait_ms": 0.0}}
    assert by_prefill_replica(after, after) == {}
    # a dashboard's window full: its sums slide, so the replica is left out
    assert by_prefill_replica([node({"1:0": (63, 1.0, 0.0)})], [node({"1:0": (64, 2.0, 0.0)})]) == {}


def test_errors_and_judgement() -> None:
    def cell(strategy: str, load: float, wait: float, ttft: float, tpot: float) -> dict:
        m = {"wait_ms": wait, "ttft_ms": ttft, "tpot_ms": tpot, "entry_wait_ms": wait / 4}
        p = {"wait_ms": wait, "ttft_ms": ttft * 1.1, "tpot_ms": tpot * 0.5}
        return {"mix": "m", "load": load, "strategy": strategy, "measured": m, "predicted": p,
                "error_pct": error_pct(m, p)}

    cells = [cell("e2llm", 1.0, 20.0, 100, 10), cell("splitwise", 1.0, 50.0, 100, 10),
             cell("splitwise", 0.5, 1.0, 100, 10)]
    assert cells[0]["error_pct"] == {"ttft_ms": 10.0, "tpot_ms": -50.0, "wait_ms": 0.0}
    j = judge(cells)
    w = j["wait_ratio_at_highest_load"]["m"]
    assert w["ratio"] == 0.4 and w["splitwise_queues"] and w["load"] == 1.0
    assert (w["e2llm_entry_wait_ms"], w["splitwise_entry_wait_ms"], w["entry_ratio"]) == (5.0, 12.5, 0.4)
    assert j["max_abs_error_pct_ttft_tpot"] == 50.0 and j["cells_within_15pct"] == 0
    assert error_pct({"ttft_ms": 0}, {"ttft_ms": 3})["ttft_ms"] is None


@pytest.mark.slow
def test_bench_serving_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "serving", "--quick", "--model", TINY, "--strategies", "splitwise", "--json",
                 "--record", str(tmp_path / "run.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny" and out["nodes"] == 2 and [c["load"] for c in out["cells"]] == [0.0, 0.5]
    idle, c = out["cells"]
    assert idle["rate_rps"] == 0.0 and idle["measured"]["completed"] == idle["predicted"]["completed"] == 2
    assert c["strategy"] == "splitwise" and c["rate_rps"] == pytest.approx(c["load"] * out["saturation_rps"][c["mix"]],
                                                                          rel=0.01)
    roles = sorted(r["role"] for r in out["plans"][c["mix"]]["splitwise"])
    assert roles == ["decoder", "prefill"]
    assert c["predicted_shared_cores"]["completed"] == 4 and "busy_nodes" in c["predicted"]
    for side in ("measured", "predicted", "predicted_shared_cores"):
        for k in KEYS:
            assert k in c[side], (side, k)
        assert c[side]["completed"] == 4 and c[side]["errors"] == 0
        assert 0 < c[side]["ttft_ms"] <= c[side]["ttft_p99_ms"] < 60_000
        assert 0 < c[side]["tpot_ms"] < 60_000 and c[side]["tok_s"] > 0
        assert c[side]["wait_ms"] is not None and c[side]["wait_ms"] >= 0
    assert all(v is None or math.isfinite(v) for v in c["error_pct"].values())
    assert c["measured"]["entry_wait_ms"] is not None and out["step_token_budget"] > 0
    assert c["measured"]["entry_ttft_ms"] is not None and len(c["measured"]["cpu_s"]) == 2
    assert c["predicted"]["compute_cpu_s"] > 0
    # the entries' dashboards say which replica prefilled the cell's 4 prompts (the one PREFILL)
    by = c["measured"]["by_prefill_replica"]
    assert sum(v["n"] for v in by.values()) == 4 and all(v["ttft_ms"] > 0 for v in by.values())
    # the nodes count their runners' compute; the rest of their CPU is the serving path's, which
    # the cell one at a time measures per row of stage work and the loaded cell's shared cores count
    for cell in (idle, c):
        m = cell["measured"]
        assert len(m["runner_cpu_s"]) == 2 and sum(m["runner_cpu_s"]) > 0
        assert m["serve_cpu_s"] == [round(a - b, 3) for a, b in zip(m["cpu_s"], m["runner_cpu_s"], strict=True)]
    per_row = idle["measured"]["serve_cpu_per_row_ms"]
    assert per_row >= 0 and c["predicted_shared_cores"]["serve_cpu_per_row_ms"] == per_row
    assert "serve_cpu_per_row_ms" not in idle["predicted_shared_cores"]
    # the cores other work took during the cell: the shared-cores prediction counts them
    assert c["measured"]["other_cores"] >= 0
    assert c["predicted_shared_cores"].get("background_cores", 0.0) == c["measured"]["other_cores"]
    # the record predicts the same again without a mesh
    assert main(["bench", "serving", "--replay", str(tmp_path / "run.json"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [x["predicted"] for x in again["cells"]] == [x["predicted"] for x in out["cells"]]
    assert again["judged"]["cells_within_15pct"] == out["judged"]["cells_within_15pct"]
    # a bad record is one clear line
    assert main(["bench", "serving", "--replay", str(tmp_path / "missing.json")]) != 0
    assert "not a recorded run" in capsys.readouterr().err
