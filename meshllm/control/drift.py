"""Workload drift: are the requests we serve far from those the plan was made for? Pure.

The plan is made for mean input and output lengths; if the mean of the last ``window`` finished
requests is more than ``ratio`` times above or below the planned mean (either length), the plan
is stale. Means, not percentiles: the planner's queueing estimate consumes means.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DriftReport:
    input_mean: float
    output_mean: float
    planned_input_mean: float
    planned_output_mean: float
    samples: int

    def to_dict(self) -> dict[str, float | int]:
        return {"input_mean": self.input_mean, "output_mean": self.output_mean,
                "planned_input_mean": self.planned_input_mean,
                "planned_output_mean": self.planned_output_mean, "samples": self.samples}


class DriftDetector:
    def __init__(self, planned_input_mean: float, planned_output_mean: float, *, window: int = 200,
                 min_samples: int = 50, ratio: float = 2.0) -> None:
        self.planned = (max(planned_input_mean, 1.0), max(planned_output_mean, 1.0))
        self.window: deque[tuple[int, int]] = deque(maxlen=window)
        self.min_samples = min_samples
        self.ratio = ratio

    def observe(self, input_len: int, output_len: int) -> DriftReport | None:
        """Record one request; a report when the window has drifted, else None."""
        self.window.append((max(int(input_len), 0), max(int(output_len), 0)))
        return self.check()

    def check(self) -> DriftReport | None:
        n = len(self.window)
        if n < self.min_samples:
            return None
        mi = sum(i for i, _ in self.window) / n
        mo = sum(o for _, o in self.window) / n
        far = any(max(m, 1.0) / p > self.ratio or p / max(m, 1.0) > self.ratio
                  for m, p in ((mi, self.planned[0]), (mo, self.planned[1])))
        return DriftReport(mi, mo, self.planned[0], self.planned[1], n) if far else None
