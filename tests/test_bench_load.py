"""``meshllm bench load``: its trace and figures (pure parts), and a quick run on the bundled model
through one real node process (the JSON's keys, and numbers that make sense)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meshllm.bench.load import CHAT_MIX, arrivals, make_trace, summarize
from meshllm.cli import main
from meshllm.client import Timed

TINY = str(Path(__file__).resolve().parents[1] / "models" / "tiny")
KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "tok_s", "completed", "rejected_429", "errors")


def test_the_trace_is_seeded_and_fits_the_context() -> None:
    a = make_trace(np.random.default_rng(3), 50, CHAT_MIX, 49152, 8192)
    assert a == make_trace(np.random.default_rng(3), 50, CHAT_MIX, 49152, 8192)
    assert a != make_trace(np.random.default_rng(4), 50, CHAT_MIX, 49152, 8192)
    assert all(16 <= len(p) < 384 and 16 <= n < 128 for p, n in a)
    small = make_trace(np.random.default_rng(3), 50, CHAT_MIX, 4096, 128)
    assert all(len(p) + n <= 127 and all(0 <= t < 4096 for t in p) for p, n in small)


def test_arrivals_are_poisson_within_the_bounds() -> None:
    at = arrivals(np.random.default_rng(0), 50.0, 100.0, 10_000)
    assert at[0] == 0.0 and at == sorted(at) and at[-1] < 100.0
    assert 4500 < len(at) < 5500  # 50/s for 100 s
    assert len(arrivals(np.random.default_rng(0), 50.0, 100.0, 7)) == 7
    # a slow rate still sends at_least requests, past the duration
    assert len(arrivals(np.random.default_rng(0), 0.01, 1.0, 20)) == 1
    assert len(arrivals(np.random.default_rng(0), 0.01, 1.0, 20, at_least=5)) == 5
    # every rate the same pattern, stretched
    slow = arrivals(np.random.default_rng(1), 2.0, 1000.0, 20)
    assert arrivals(np.random.default_rng(1), 4.0, 1000.0, 20) == pytest.approx([t / 2 for t in slow])


def test_summarize_counts_outcomes_and_times() -> None:
    ok = Timed(0.0, [0.1, 0.2, 0.3])
    short = Timed(0.0, [0.1])  # asked for 3 tokens, got 1: an error
    refused = Timed(0.0, outcome="429")
    failed = Timed(0.0, outcome="error", detail="boom")
    row = summarize([ok, short, refused, failed], [3, 3, 3, 3], 1.5)
    assert (row["completed"], row["rejected_429"], row["errors"]) == (1, 1, 2)
    assert row["ttft_p50_ms"] == pytest.approx(100.0) and row["tpot_p50_ms"] == pytest.approx(100.0)
    assert row["tok_s"] == 2.0 and "boom" in row["error_examples"]


@pytest.mark.slow
def test_bench_load_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "load", "--quick", "--model", TINY, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in (*KEYS, "capacity_req_s", "idle_ttft_ms", "speedup_vs_sequential", "rates", "sequential"):
        assert k in out, k
    assert out["model"] == "tiny" and out["nodes"] == 1 and "note" not in out
    assert out["sequential"]["errors"] == 0 and out["idle_ttft_ms"] > 0
    assert 1 <= len(out["rates"]) <= 2
    for row in out["rates"]:
        assert row["errors"] == 0 and row["completed"] + row["rejected_429"] == row["requests"] >= 1
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] < 60_000
        assert 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"] < 60_000
        assert row["tok_s"] > 0
    rates = [r["rate_req_s"] for r in out["rates"]]
    assert rates == sorted(rates) and out["rate_req_s"] in rates
    assert out["capacity_req_s"] is None or out["capacity_req_s"] in rates
    assert out["speedup_vs_sequential"] == pytest.approx(
        next(r["tok_s"] for r in out["rates"] if r["rate_req_s"] == out["rate_req_s"]) / out["sequential"]["tok_s"],
        abs=0.01)
