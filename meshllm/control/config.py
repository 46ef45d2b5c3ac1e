"""Timings and thresholds of the control plane, in one object passed in (never module constants).

All times are logical seconds: whatever clock the caller feeds to ``tick(now)`` (the shell passes
``loop.time()``; tests pass exact numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshllm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ControlConfig:
    heartbeat_interval: float = 1.0
    suspect_after: int = 3  # missed heartbeats before a member is suspected (and loses leadership)
    dead_after: int = 6  # missed heartbeats before a member is declared dead
    election_timeout: float = 2.0  # a candidate gives up when votes have not come by then
    election_backoff: float = 1.0  # wait after a denied or timed-out campaign
    discovery_grace: float = 2.0  # no campaign in the first seconds: see the peers first
    replan_debounce: float = 1.0  # batch membership churn into one re-plan
    profile_timeout: float = 10.0  # plan without members whose profile has not come by then
    island_deadline: float = 10.0  # GA islands not returned by then are evolved locally
    island_generations: int = 20
    plan_ack_timeout: float = 60.0  # a proposed epoch not acknowledged by all by then is aborted
    replan_backoff: float = 5.0  # after an aborted epoch
    drain_timeout: float = 120.0  # unload a draining epoch even if the shell never says it is idle
    drift_window: int = 200  # requests kept by the drift detector
    drift_min_samples: int = 50
    drift_ratio: float = 2.0  # observed mean this many times above/below the planned mean

    def __post_init__(self) -> None:
        problems = []
        for name in ("heartbeat_interval", "election_timeout", "plan_ack_timeout", "island_deadline",
                     "drift_ratio"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 1 <= self.suspect_after < self.dead_after:
            problems.append("need 1 <= suspect_after < dead_after")
        if self.drift_ratio <= 1:
            problems.append("drift_ratio must be > 1")
        if not 1 <= self.drift_min_samples <= self.drift_window:
            problems.append("need 1 <= drift_min_samples <= drift_window")
        if problems:
            raise ConfigError("invalid control config: " + "; ".join(problems))

    @property
    def suspect_time(self) -> float:
        return self.suspect_after * self.heartbeat_interval

    @property
    def dead_time(self) -> float:
        return self.dead_after * self.heartbeat_interval
