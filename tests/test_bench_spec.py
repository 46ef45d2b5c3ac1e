"""``meshllm bench mesh --speculate``'s method (pure parts): the order each prompt is answered in,
round by round, and a set's figures as the median of its rounds' ratios."""

from __future__ import annotations

import pytest

from meshllm.bench.mesh import set_figures, smoothness, spec_orders


def test_the_order_alternates_from_prompt_to_prompt_and_round_to_round() -> None:
    orders = spec_orders(4, 3)
    assert len(orders) == 4 and all(len(r) == 3 for r in orders)
    assert all(set(o) == {False, True} for r in orders for o in r)  # each prompt both ways, every round
    assert orders[0] == [(False, True), (True, False), (False, True)]
    assert orders[1] == [(True, False), (False, True), (True, False)]
    for i in range(3):  # over two rounds each prompt runs first once each way
        assert {orders[0][i][0], orders[1][i][0]} == {False, True}
        assert [r[i] for r in orders[:2]] == [r[i] for r in orders[2:]]


def test_a_sets_figures_are_the_median_of_its_rounds() -> None:
    rounds = [{False: (60, 3.0), True: (60, 2.0)},  # 20 -> 30 tok/s: 1.5
              {False: (60, 3.0), True: (60, 1.5)},  # 2.0
              {False: (60, 6.0), True: (60, 2.0)},  # the machine busy under "off": 3.0
              {False: (60, 3.0), True: (60, 2.4)}]  # 1.25
    f = set_figures(rounds)
    assert [r["speedup"] for r in f["rounds"]] == [1.5, 2.0, 3.0, 1.25]
    assert f["speedup"] == pytest.approx(1.75)  # the median: one outlier round moves it little
    assert (f["speedup_min"], f["speedup_max"]) == (1.25, 3.0)
    assert f["tok_s_off"] == 20.0 and f["tok_s_on"] == 30.0  # 30, 40, 30, 25 tok/s
    one = set_figures(rounds[:1])
    assert one["speedup"] == 1.5 and one["rounds"] == [{"tok_s_off": 20.0, "tok_s_on": 30.0, "speedup": 1.5}]


def test_a_stream_whose_tokens_came_together_is_reported_bunched() -> None:
    steady = [0.02 * i for i in range(11)]  # a token every 20 ms
    held = [0.0, 0.02, 0.04] + [0.3 + 0.0001 * i for i in range(8)]  # then eight let go at once
    assert smoothness([steady]) == (0.0, 20.0)
    share, p99 = smoothness([held])
    assert share == 0.7 and p99 > 200  # 7 of 10 gaps under 1 ms; the long wait before them
    assert smoothness([steady, held])[0] == 0.35
    assert smoothness([[1.0], []]) == (None, None)
