"""Per-request records and their aggregation (mean, p50, p95, p99)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestRecord:
    id: int
    arrival: float
    input_tokens: int
    output_tokens: int
    prefill_replica: int
    decode_replica: int
    prefill_start: float  # start of its first prefill micro-batch on stage 0
    first_token: float  # first token delivered at the entry
    finish: float  # last token delivered at the entry

    @property
    def waiting_s(self) -> float:
        return self.prefill_start - self.arrival

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish - self.arrival


@dataclass(frozen=True, slots=True)
class Stat:
    mean: float
    p50: float
    p95: float
    p99: float

    @staticmethod
    def of(values: list[float]) -> Stat:
        if not values:
            return Stat(float("nan"), float("nan"), float("nan"), float("nan"))
        a = np.asarray(values, dtype=np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return Stat(float(a.mean()), float(p50), float(p95), float(p99))

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "p50": self.p50, "p95": self.p95, "p99": self.p99}


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    waiting_s: Stat
    ttft_s: Stat
    tpot_s: Stat
    e2e_s: Stat
    duration_s: float  # first arrival to last finish
    throughput_tok_s: float  # output tokens / duration
    throughput_req_s: float
    utilisation: dict[str, float] = field(default_factory=dict)  # node -> busy fraction

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "waiting_s": self.waiting_s.to_dict(),
            "ttft_s": self.ttft_s.to_dict(),
            "tpot_s": self.tpot_s.to_dict(),
            "e2e_s": self.e2e_s.to_dict(),
            "duration_s": self.duration_s,
            "throughput_tok_s": self.throughput_tok_s,
            "throughput_req_s": self.throughput_req_s,
            "utilisation": dict(self.utilisation),
        }


def summarise(records: list[RequestRecord], busy_s: dict[str, float],
              warmup: int = 0) -> Summary:
    """Aggregate; the first ``warmup`` requests (by id) are left out of the latency statistics
    (not of throughput) so a run that starts empty does not flatter a loaded system."""
    if not records:
        return Summary(0, Stat.of([]), Stat.of([]), Stat.of([]), Stat.of([]), 0.0, 0.0, 0.0,
                       {n: 0.0 for n in busy_s})
    t0 = min(r.arrival for r in records)
    t1 = max(r.finish for r in records)
    dur = t1 - t0
    kept = [r for r in records if r.id >= warmup] or records
    tpots = [t for r in kept if (t := r.tpot_s) is not None]
    toks = sum(r.output_tokens for r in records)
    return Summary(
        requests=len(records),
        waiting_s=Stat.of([r.waiting_s for r in kept]),
        ttft_s=Stat.of([r.ttft_s for r in kept]),
        tpot_s=Stat.of(tpots),
        e2e_s=Stat.of([r.e2e_s for r in kept]),
        duration_s=dur,
        throughput_tok_s=toks / dur if dur > 0 else float("inf"),
        throughput_req_s=len(records) / dur if dur > 0 else float("inf"),
        utilisation={n: (b / dur if dur > 0 else 0.0) for n, b in sorted(busy_s.items())},
    )
