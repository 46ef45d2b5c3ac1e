"""The dashboard's measured figures judged against the planner's predictions. Pure: numbers in,
JSON-able verdicts out (no I/O, no clock).

A prediction is compared only with a measurement of the same thing: the plan's waiting time and
time to first token are predicted again for the traffic the entries measured (its arrival rate,
mean prompt and answer lengths: ``measured_workload``), a replica's prefill at the prompt lengths
it served, a decoder's time per token at the batch and context each request decoded in. The
plan's tokens/s is a capacity (every decoder at its full batch): it is shown as the share of it
the traffic used, and judged only when the mesh served more than it.

A pair agrees when the measurement is within ``TOLERANCE`` (20%) of the prediction, or a time
within ``FLOOR_S`` of it. Otherwise the verdict's ``note`` says which estimate is off, in which
direction and by how much, and for the time to first token how much of the gap each of its parts
(waiting, prefill) holds.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from meshllm.planner.types import LengthDist, Workload

TOLERANCE = 0.20  # measured within 20% of predicted: agreed
FLOOR_S = 0.002  # two times closer than this agree whatever their ratio (an event loop's jitter)

# the estimates the dashboard's predictions come from, as the page names them
QUEUEING = "queueing estimate"  # planner/queueing.py: arrival -> prefill start
PREFILL = "prefill estimate"  # sim/estimates.py prefill_estimate: stages' compute and activations
DECODE = "decode step estimate"  # sim/estimates.py step_estimate: one token of a batch, round the ring


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt_s(s: float) -> str:
    """Seconds as the page writes them (ms below a second)."""
    a = abs(s)
    return f"{s * 1000:.2f} ms" if a < 0.01 else f"{s * 1000:.1f} ms" if a < 1 else f"{s:.2f} s"


def fmt_ratio(r: float) -> str:
    return "∞" if math.isinf(r) else f"{r:.0f}×" if r >= 10 else f"{r:.2f}×"


def _verdict(measured: float | None, predicted: float | None, off: bool, note: str | None,
             **extra: Any) -> dict[str, Any]:
    ratio = measured / predicted if measured is not None and predicted else None
    return {"measured": measured, "predicted": predicted, "ratio": ratio, "off": off, "note": note, **extra}


def agrees(measured: float, predicted: float, floor: float = 0.0) -> bool:
    """Within ``TOLERANCE`` of the prediction, or within ``floor`` of it."""
    return abs(measured - predicted) <= max(TOLERANCE * abs(predicted), floor)


def judge_time(measured: Any, predicted: Any, estimate: str) -> dict[str, Any]:
    """A mean time measured beside its prediction from ``estimate``."""
    m, p = _num(measured), _num(predicted)
    if m is None or p is None or agrees(m, p, FLOOR_S):
        return _verdict(m, p, False, None)
    ratio = m / p if p > 0 else math.inf
    return _verdict(m, p, True, f"measured {fmt_ratio(ratio)} predicted ({'+' if m > p else '−'}{fmt_s(abs(m - p))}): "
                                f"the {estimate} is {'low' if m > p else 'high'}")


def judge_ttft(measured: Any, predicted: Any, parts: list[tuple[str, Any, Any, str]]) -> dict[str, Any]:
    """Time to first token, and where its gap lies: ``parts`` are (name, measured, predicted,
    estimate) of the times it adds up (waiting, prefill); the note gives each part's gap, largest
    first, and the estimate it comes from."""
    m, p = _num(measured), _num(predicted)
    if m is None or p is None or agrees(m, p, FLOOR_S):
        return _verdict(m, p, False, None)
    gaps = []
    for name, pm, pp, est in parts:
        a, b = _num(pm), _num(pp)
        if a is not None and b is not None:
            gaps.append((a - b, name, est))
    gaps.sort(key=lambda g: -abs(g[0]))
    ratio = m / p if p > 0 else math.inf
    note = f"measured {fmt_ratio(ratio)} predicted ({'+' if m > p else '−'}{fmt_s(abs(m - p))})"
    if gaps:
        note += ": " + ", ".join(f"{name} {'+' if d >= 0 else '−'}{fmt_s(abs(d))} ({est} {'low' if d >= 0 else 'high'})"
                                 for d, name, est in gaps)
    return _verdict(m, p, True, note)


def judge_rate(measured_tps: Any, predicted_tps: Any, estimate: str = DECODE) -> dict[str, Any]:
    """Tokens per second of one request beside the prediction: a time per token underneath, so
    the note speaks of the step estimate in ms per token."""
    m, p = _num(measured_tps), _num(predicted_tps)
    if m is None or p is None or m <= 0 or p <= 0 or agrees(m, p):
        return _verdict(m, p, False, None)
    return _verdict(m, p, True, f"measured {fmt_ratio(m / p)} predicted: the {estimate} is "
                                f"{'high' if m > p else 'low'} ({fmt_s(1 / p)} per token predicted, "
                                f"{fmt_s(1 / m)} measured)")


def judge_capacity(measured_tps: Any, capacity_tps: Any) -> dict[str, Any]:
    """The mesh's tokens/s beside the plan's capacity (every decoder at its batch): a bound, not a
    forecast of the load. ``used`` is the share of it the traffic took; only a mesh that served
    more than it (beyond the tolerance) shows the capacity estimate wrong."""
    m, c = _num(measured_tps), _num(capacity_tps)
    used = m / c if m is not None and c else None
    if m is None or c is None or m <= c * (1 + TOLERANCE):
        return _verdict(m, c, False, None, used=used)
    return _verdict(m, c, True, f"measured {fmt_ratio(m / c)} the predicted capacity: the {DECODE} is high",
                    used=used)


def measured_workload(planned: Workload, rate: Any, mean_in: Any, mean_out: Any) -> Workload | None:
    """The planned workload with the traffic measured in it: its arrival rate (two significant
    digits) and mean prompt and answer lengths (whole tokens, fixed). The memory limits
    (``max_batch``, ``kv_percentile``) stay the plan's. None without a rate or lengths."""
    r, i, o = _num(rate), _num(mean_in), _num(mean_out)
    if r is None or i is None or o is None or r < 0:
        return None
    r = float(f"{r:.2g}")
    return replace(planned, arrival_rate=r, input_len=LengthDist.fixed(max(1, round(i))),
                   output_len=LengthDist.fixed(max(1, round(o))))


def plan_comparison(measured: dict[str, Any], predicted: dict[str, Any], capacity: Any) -> dict[str, dict[str, Any]]:
    """The plan's rows: ``measured`` {wait_s, ttft_s, tokens_per_s} over the last requests of every
    entry; ``predicted`` {mean_wait_s, mean_ttft_s} for the traffic measured (or {} when unknown);
    ``capacity`` the plan's tokens/s at full batch."""
    mw, mt = _num(measured.get("wait_s")), _num(measured.get("ttft_s"))
    pw, pt = _num(predicted.get("mean_wait_s")), _num(predicted.get("mean_ttft_s"))
    parts = [("waiting", mw, pw, QUEUEING),
             ("prefill", None if mt is None or mw is None else mt - mw,
              None if pt is None or pw is None else pt - pw, PREFILL)]
    return {"wait_s": judge_time(mw, pw, QUEUEING), "ttft_s": judge_ttft(mt, pt, parts),
            "tokens_per_s": judge_capacity(measured.get("tokens_per_s"), capacity)}
