"""A slowed runner's pacing (runtime/pacing.py), on an injected clock: a step waits (F - 1) x the
typical step of its shape, so a disturbed step is longer by its disturbance once, not F times."""

from __future__ import annotations

import pytest

from meshllm.runtime.pacing import Pacer, bucket


class FakeTime:
    """A clock that only a sleep moves; the pacer's spin sees the deadline already reached."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _step(p: Pacer, t: FakeTime, dt: float, key: object = "k", work: float = 1.0) -> float:
    """A step that computes ``dt`` and is paced: its wall time."""
    t0 = t.now
    t.now += dt
    p.pace(t0, key, work)
    return t.now - t0


def _pacer(t: FakeTime, slowdown: float, **kw: float) -> Pacer:
    return Pacer(slowdown, clock=t.clock, sleep=t.sleep, spin_s=0.0, **kw)  # type: ignore[arg-type]


def test_a_shape_seen_once_waits_f_minus_one_times_its_step() -> None:
    t = FakeTime()
    p = _pacer(t, 3.0)
    assert _step(p, t, 0.010) == pytest.approx(0.030)
    assert p.last_compute_s == pytest.approx(0.010) and p.last_wait_s == pytest.approx(0.020)


def test_a_disturbed_step_is_longer_by_its_disturbance_once() -> None:
    t = FakeTime()
    p = _pacer(t, 3.0)
    for _ in range(8):
        _step(p, t, 0.010)
    # other work took 40 ms of this step: a device 3x slower takes 30 ms, plus the 40 once
    assert _step(p, t, 0.050) == pytest.approx(0.070)
    assert p.last_reference_s == pytest.approx(0.010)
    # the old rule would have made it 150 ms; the next undisturbed step is 30 ms again
    assert _step(p, t, 0.010) == pytest.approx(0.030)


def test_the_reference_is_a_low_quantile_of_the_recent_steps() -> None:
    t = FakeTime()
    p = _pacer(t, 2.0, window=4, quantile=0.25)
    for dt in (0.020, 0.010, 0.030, 0.040):
        _step(p, t, dt)
    # the window holds 10, 30, 40, 50 ms after this step: its quantile (index 0 of 4) is 10 ms
    assert _step(p, t, 0.050) == pytest.approx(0.060)
    # the window slides on: 30, 40, 50, 60 ms
    _step(p, t, 0.060)
    assert p.last_reference_s == pytest.approx(0.030)


def test_never_waits_more_than_its_own_step_times_f_minus_one() -> None:
    t = FakeTime()
    p = _pacer(t, 4.0)
    for _ in range(4):
        _step(p, t, 0.020)
    assert _step(p, t, 0.005) == pytest.approx(0.020)  # faster than usual: 4 x its own
    assert p.last_reference_s == pytest.approx(0.005)


def test_shapes_keep_their_own_references_and_work_scales_them() -> None:
    t = FakeTime()
    p = _pacer(t, 2.0)
    for _ in range(4):
        _step(p, t, 0.010, key=("decode", 1))
        _step(p, t, 0.100, key=("decode", 8))
    assert _step(p, t, 0.010, key=("decode", 1)) == pytest.approx(0.020)
    assert _step(p, t, 0.100, key=("decode", 8)) == pytest.approx(0.200)
    # a prefill's reference is per unit of work: 32 tokens at 1 ms, then 40 tokens of the same
    # shape disturbed by 20 ms: 40 ms typical, waited once
    _step(p, t, 0.032, key="prefill", work=32)
    assert _step(p, t, 0.060, key="prefill", work=40) == pytest.approx(0.060 + 0.040)


def test_no_slowdown_never_waits() -> None:
    t = FakeTime()
    p = _pacer(t, 1.0)
    assert _step(p, t, 0.010) == pytest.approx(0.010)
    assert t.slept == [] and p.last_wait_s == 0.0 and p.last_compute_s == pytest.approx(0.010)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="slowdown"):
        Pacer(0.5)
    with pytest.raises(ValueError, match="window"):
        Pacer(2.0, window=0)


def test_buckets_are_powers_of_two() -> None:
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1000)] == [0, 1, 2, 2, 3, 3, 4, 10]


def test_the_steps_cpu_time_is_added_up_from_start_to_pace() -> None:
    t = FakeTime()
    cpu = [0.0]
    p = Pacer(2.0, clock=t.clock, sleep=t.sleep, spin_s=0.0, cpu_clock=lambda: cpu[0])
    for used in (0.004, 0.006):
        t0 = p.start()
        t.now += 0.010  # 10 ms of wall time, of which the thread computed ``used``
        cpu[0] += used
        p.pace(t0, "k")
        cpu[0] += 0.5  # what the thread does between steps is not the model's compute
    assert p.compute_cpu_s == pytest.approx(0.010)
    p.pace(t.now, "k")  # a step timed without ``start`` counts no CPU
    assert p.compute_cpu_s == pytest.approx(0.010)
