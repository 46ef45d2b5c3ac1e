"""The dashboard's measured figures judged against the predictions (``meshllm/web/compare.py``,
pure), and the prediction for the traffic measured (``PlanEstimator.plan_figures``): the plan's own
figures again at the planned workload, other figures at another."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from meshllm.planner.cost import ModelProfile
from meshllm.planner.strategies import make_plan
from meshllm.planner.testbed import load_testbed
from meshllm.planner.types import LengthDist, Role, Workload
from meshllm.serve.estimator import PlanEstimator
from meshllm.serve.routes import Routes
from meshllm.web import compare

ROOT = Path(__file__).resolve().parents[1]


def test_within_twenty_percent_agrees_and_says_nothing() -> None:
    for m, p in ((0.118, 0.100), (0.082, 0.100), (0.100, 0.100)):
        v = compare.judge_time(m, p, compare.PREFILL)
        assert not v["off"] and v["note"] is None and v["ratio"] == pytest.approx(m / p)
    v = compare.judge_time(0.121, 0.100, compare.PREFILL)
    assert v["off"] and v["note"] == "measured 1.21× predicted (+21.0 ms): the prefill estimate is low"
    v = compare.judge_time(0.070, 0.100, compare.PREFILL)
    assert v["off"] and v["note"] == "measured 0.70× predicted (−30.0 ms): the prefill estimate is high"


def test_times_a_millisecond_apart_agree_whatever_their_ratio() -> None:
    assert not compare.judge_time(0.0015, 0.0002, compare.QUEUEING)["off"]  # 7.5x, but 1.3 ms
    v = compare.judge_time(0.0203, 0.00075, compare.QUEUEING)
    assert v["off"] and v["note"] == "measured 27× predicted (+19.5 ms): the queueing estimate is low"
    v = compare.judge_time(0.004, 0.0, compare.QUEUEING)
    assert v["off"] and v["ratio"] is None and v["note"].startswith("measured ∞ predicted (+4.00 ms)")


def test_unknown_figures_are_not_judged() -> None:
    for m, p in ((None, 0.1), (0.1, None), (math.inf, 0.1), (0.1, math.nan), (True, 0.1)):
        v = compare.judge_time(m, p, compare.PREFILL)
        assert not v["off"] and v["note"] is None


def test_the_time_to_first_token_says_which_part_is_off() -> None:
    parts = [("waiting", 0.0203, 0.0008, compare.QUEUEING), ("prefill", 0.1404, 0.1146, compare.PREFILL)]
    v = compare.judge_ttft(0.1607, 0.1154, parts)
    assert v["off"]
    assert v["note"] == ("measured 1.39× predicted (+45.3 ms): prefill +25.8 ms (prefill estimate low), "
                         "waiting +19.5 ms (queueing estimate low)")
    # the parts in agreement, the whole too: nothing to say
    assert compare.judge_ttft(0.12, 0.115, parts)["note"] is None


def test_tokens_per_second_speak_of_the_step_estimate_per_token() -> None:
    v = compare.judge_rate(45.9, 25.65)
    assert v["off"] and v["note"] == ("measured 1.79× predicted: the decode step estimate is high "
                                      "(39.0 ms per token predicted, 21.8 ms measured)")
    v = compare.judge_rate(10.0, 25.0)
    assert v["off"] and "the decode step estimate is low (40.0 ms per token predicted, 100.0 ms measured)" in v["note"]
    assert not compare.judge_rate(27.0, 25.0)["off"]
    assert not compare.judge_rate(0.0, 25.0)["off"]


def test_a_capacity_is_a_bound_not_a_forecast() -> None:
    v = compare.judge_capacity(47.6, 129.0)
    assert not v["off"] and v["used"] == pytest.approx(47.6 / 129.0)
    assert not compare.judge_capacity(150.0, 129.0)["off"]  # within 20% above it: noise
    v = compare.judge_capacity(200.0, 129.0)
    assert v["off"] and v["note"] == "measured 1.55× the predicted capacity: the decode step estimate is high"


def test_the_plan_rows_split_the_time_to_first_token_into_waiting_and_prefill() -> None:
    rows = compare.plan_comparison({"wait_s": 0.0203, "ttft_s": 0.1607, "tokens_per_s": 47.6},
                                   {"mean_wait_s": 0.0008, "mean_ttft_s": 0.1154}, 129.0)
    assert rows["wait_s"]["off"] and "queueing estimate is low" in rows["wait_s"]["note"]
    assert rows["ttft_s"]["note"].endswith("prefill +25.8 ms (prefill estimate low), waiting +19.5 ms (queueing estimate low)")
    assert not rows["tokens_per_s"]["off"] and rows["tokens_per_s"]["used"] == pytest.approx(0.369, abs=1e-3)
    # nothing predicted for the traffic (no profiles yet): nothing judged
    rows = compare.plan_comparison({"wait_s": 0.02, "ttft_s": 0.16, "tokens_per_s": None}, {}, None)
    assert not any(v["off"] for v in rows.values())


def test_the_measured_workload_keeps_the_plans_memory_limits() -> None:
    planned = Workload(0.4, LengthDist.fixed(32), LengthDist.fixed(96), max_batch=16, kv_percentile=90.0)
    wl = compare.measured_workload(planned, 0.2873, 32.4, 88.6)
    assert wl == Workload(0.29, LengthDist.fixed(32), LengthDist.fixed(89), max_batch=16, kv_percentile=90.0)
    assert compare.measured_workload(planned, None, 32, 96) is None
    assert compare.measured_workload(planned, 0.3, None, 96) is None
    assert compare.measured_workload(planned, 0.01, 0.2, 0.4).input_len.mean == 1  # at least one token


@pytest.fixture(scope="module")
def home() -> tuple[PlanEstimator, Routes, Workload]:
    tb = load_testbed(ROOT / "tools/testbeds/home.toml")
    prof = ModelProfile.from_preset("llama2-7b")
    plan = make_plan("e2llm", prof, tb.devices, tb.network, tb.workload, "waiting")
    devs = {d.name: d for d in tb.devices}
    return PlanEstimator(prof, lambda: devs, lambda nodes: tb.network, tb.workload), Routes(1, plan), tb.workload


def test_the_plans_own_figures_come_back_at_the_planned_workload(home) -> None:
    est, routes, planned = home
    again = est.plan_figures(routes, planned)
    pr = routes.plan.predicted
    assert again is not None
    for k in ("mean_wait_s", "mean_ttft_s", "mean_e2e_s", "throughput_tps"):
        assert getattr(again, k) == pytest.approx(getattr(pr, k), rel=1e-9), k


def test_other_traffic_gets_other_figures(home) -> None:
    est, routes, planned = home
    base = est.plan_figures(routes, planned)
    idle = est.plan_figures(routes, planned.with_rate(planned.arrival_rate / 100))
    longer = est.plan_figures(routes, Workload(planned.arrival_rate, LengthDist.fixed(4 * round(planned.input_len.mean)),
                                               planned.output_len, planned.max_batch, planned.kv_percentile))
    assert base and idle and longer
    assert idle.mean_wait_s < base.mean_wait_s  # less traffic waits less
    assert longer.mean_ttft_s - longer.mean_wait_s > base.mean_ttft_s - base.mean_wait_s  # longer prompts
    assert est.plan_figures(routes, planned) is base  # cached


def test_no_figures_while_a_profile_is_unknown(home) -> None:
    est, routes, planned = home
    blind = PlanEstimator(est.profile, dict, est.network, planned)
    assert blind.plan_figures(routes, planned) is None


def test_the_hand_off_grows_with_the_prompt_and_is_nothing_within_one_replica(home) -> None:
    est, routes, _ = home
    ids = [r.id for r in routes.plan.replicas]
    assert all(est.handoff_s(routes, i, i, 100) == 0.0 for i in ids)
    roles = {r.role: r.id for r in routes.plan.replicas}
    a, b = roles[Role.PREFILL], roles[Role.DECODER]  # the home testbed's plan splits the roles
    assert 0.0 < est.handoff_s(routes, a, b, 100) < est.handoff_s(routes, a, b, 200)
    blind = PlanEstimator(est.profile, dict, est.network, est.workload)
    assert blind.handoff_s(routes, ids[0], ids[-1], 100) == 0.0
