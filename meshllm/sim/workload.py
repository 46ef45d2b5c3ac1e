"""Requests and arrival processes: Poisson, bursty on/off, and traces.

Lengths come from a ``LengthSampler`` (anything with ``sample(rng, n) -> array``): the planner's
length distributions satisfy it, and so does ``Fixed``/``Choice`` here for tests.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from meshllm.errors import UserError


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    arrival: float  # seconds
    input_tokens: int
    output_tokens: int  # tokens generated, the first one by prefill
    # the node whose API took it (its entry: the prompt comes from there, the tokens go back there);
    # None: the model's entry, else the first stage of the replica that prefills it
    entry: str | None = None


class LengthSampler(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Fixed:
    value: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


def _lengths(sampler: LengthSampler, rng: np.random.Generator, n: int) -> np.ndarray:
    # at least one token each way: a request with no prompt or no output is not a request
    return np.maximum(np.asarray(sampler.sample(rng, n), dtype=np.int64).reshape(n), 1)


def _build(times: np.ndarray, inp: LengthSampler, out: LengthSampler,
           rng: np.random.Generator) -> list[Request]:
    n = len(times)
    ins, outs = _lengths(inp, rng, n), _lengths(out, rng, n)
    return [Request(i, float(times[i]), int(ins[i]), int(outs[i])) for i in range(n)]


def poisson(rate: float, n: int, inp: LengthSampler, out: LengthSampler,
            rng: np.random.Generator, start: float = 0.0) -> list[Request]:
    """``n`` requests with exponential inter-arrival times of mean ``1/rate``."""
    if rate <= 0 or n < 0:
        raise UserError("poisson arrivals need rate > 0 and n >= 0")
    times = start + np.cumsum(rng.exponential(1.0 / rate, n))
    return _build(times, inp, out, rng)


def bursty(rate: float, n: int, inp: LengthSampler, out: LengthSampler,
           rng: np.random.Generator, *, mean_on_s: float = 10.0, mean_off_s: float = 10.0,
           start: float = 0.0) -> list[Request]:
    """On/off arrivals with long-run mean ``rate``: Poisson at ``rate*(on+off)/on`` during
    exponentially long on periods, silence during exponentially long off periods."""
    if rate <= 0 or n < 0 or mean_on_s <= 0 or mean_off_s < 0:
        raise UserError("bursty arrivals need rate > 0, n >= 0, mean_on_s > 0, mean_off_s >= 0")
    rate_on = rate * (mean_on_s + mean_off_s) / mean_on_s
    times: list[float] = []
    t = start
    while len(times) < n:
        on_end = t + rng.exponential(mean_on_s)
        while len(times) < n:
            t += rng.exponential(1.0 / rate_on)
            if t > on_end:
                break
            times.append(t)
        t = on_end + (rng.exponential(mean_off_s) if mean_off_s > 0 else 0.0)
    return _build(np.asarray(times), inp, out, rng)


def closed_batch(n: int, input_tokens: int, output_tokens: int, at: float = 0.0) -> list[Request]:
    """``n`` identical requests all at time ``at`` (a batch measurement, as EdgeShard's)."""
    return [Request(i, at, input_tokens, output_tokens) for i in range(n)]


def parse_trace(text: str) -> list[Request]:
    """CSV rows ``arrival_s,input_tokens,output_tokens``; a header row and ``#`` comments are
    allowed. Rows are sorted by arrival time (stable), ids follow the sorted order."""
    rows: list[tuple[float, int, int]] = []
    reader = csv.reader(io.StringIO(text))
    for lineno, row in enumerate(reader, 1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) < 3:
            raise UserError(f"trace line {lineno}: need arrival,input_tokens,output_tokens")
        try:
            t, i, o = float(cells[0]), int(cells[1]), int(cells[2])
        except ValueError:
            if not rows and lineno == 1:
                continue  # a header
            raise UserError(f"trace line {lineno}: not numbers: {','.join(cells[:3])}") from None
        if t < 0 or i < 1 or o < 1 or not np.isfinite(t):
            raise UserError(f"trace line {lineno}: need arrival >= 0 and token counts >= 1")
        rows.append((t, i, o))
    if not rows:
        raise UserError("trace has no requests")
    rows.sort(key=lambda r: r[0])
    return [Request(k, t, i, o) for k, (t, i, o) in enumerate(rows)]


def scale_rate(requests: Sequence[Request], factor: float) -> list[Request]:
    """The same requests with arrival times divided by ``factor`` (factor 2 = twice the load)."""
    return [Request(r.id, r.arrival / factor, r.input_tokens, r.output_tokens) for r in requests]
