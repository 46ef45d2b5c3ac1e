"""The router's predictions for a plan: the simulator's own estimates (``sim/estimates.py``) over
the cost model, fed with the device profiles and link measurements this node knows.

``PlanEstimator.prefill_s(routes, replica, tokens)`` is a prompt's predicted time through a
replica; ``decode_s(routes, replica, batch)`` the predicted time per output token of a sequence
decoding in a batch of that size. Both are None when the node lacks a profile of some node of the
plan (the router then ranks by load alone). Models are built once per epoch and cached.
``plan_figures(routes, workload)`` is the planner's queueing estimate for the epoch's plan under
another workload (the dashboard's prediction for the traffic it measured).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from meshllm.errors import MeshError
from meshllm.planner.cost import ModelProfile
from meshllm.planner.problem import Problem
from meshllm.planner.types import Device, Network, Predicted, Workload
from meshllm.serve.routes import Routes
from meshllm.sim import estimates
from meshllm.sim.adapter import to_sim_model
from meshllm.sim.engine import SimError
from meshllm.sim.model import SimModel

log = logging.getLogger("meshllm.serve.estimator")


class PlanEstimator:
    def __init__(self, profile: ModelProfile, devices: Callable[[], dict[str, Device]],
                 network: Callable[[list[str]], Network], workload: Workload) -> None:
        self.profile = profile
        self.devices = devices
        self.network = network
        self.workload = workload
        self._models: dict[int, SimModel | None] = {}
        self._figures: dict[tuple[int, Workload], Predicted | None] = {}

    def model(self, routes: Routes) -> SimModel | None:
        if routes.epoch in self._models and self._models[routes.epoch] is not None:
            return self._models[routes.epoch]
        devs = self.devices()
        nodes = sorted(routes.all_nodes())
        if any(n not in devs for n in nodes):
            return None  # not every profile is known yet: try again next time
        try:
            m: SimModel | None = to_sim_model(routes.plan, self.profile, devs, self.network(nodes), self.workload)
        except (SimError, MeshError, KeyError, ValueError) as e:
            log.warning("no estimates for epoch %d: %s", routes.epoch, e)
            m = None
        self._models[routes.epoch] = m
        if len(self._models) > 4:
            self._models.pop(min(self._models))
        return m

    def _rep(self, m: SimModel, rid: int) -> Any:
        return next((r for r in m.replicas if r.id == rid), None)

    def prefill_s(self, routes: Routes, rid: int, tokens: int) -> float:
        m = self.model(routes)
        rep = None if m is None else self._rep(m, rid)
        if m is None or rep is None:
            return 0.0
        return estimates.prefill_estimate(m.timing, rep, max(1, tokens))[0]

    def decode_s(self, routes: Routes, rid: int, batch: int, ctx: float | None = None) -> float:
        """Seconds per token in a batch of ``batch`` at context ``ctx`` (default: the workload's
        mean prompt plus half its mean answer)."""
        m = self.model(routes)
        rep = None if m is None else self._rep(m, rid)
        if m is None or rep is None:
            return 1.0
        if ctx is None:
            ctx = self.workload.input_len.mean + self.workload.output_len.mean / 2
        return estimates.step_estimate(m.timing, rep, max(1, batch), ctx)

    def handoff_s(self, routes: Routes, prefill: int, decoder: int, tokens: int) -> float:
        """Seconds of KV hand-off a ``tokens``-token prompt waits for between the two replicas
        (0 when one replica does both, or without a model)."""
        m = self.model(routes)
        pre = None if m is None else self._rep(m, prefill)
        dec = None if m is None else self._rep(m, decoder)
        if m is None or pre is None or dec is None:
            return 0.0
        return estimates.handoff_time(m.timing, pre, dec, max(1, tokens))

    def plan_figures(self, routes: Routes, workload: Workload) -> Predicted | None:
        """The planner's queueing estimate (``Problem.estimate_stages``, what the plan's own
        ``predicted`` came from) for the epoch's plan under ``workload``; None while a profile of
        some node of the plan is unknown. Cached per (epoch, workload): callers round the
        workload's figures so that a steady stream reuses the answer."""
        key = (routes.epoch, workload)
        if key in self._figures:
            return self._figures[key]
        devs = self.devices()
        nodes = sorted(routes.all_nodes())
        if any(n not in devs for n in nodes):
            return None
        try:
            pb = Problem(self.profile, tuple(devs[n] for n in nodes), self.network(nodes), workload)
            out: Predicted | None = pb.estimate_stages(pb.from_replicas(routes.plan.replicas)).predicted
        except (MeshError, KeyError, ValueError) as e:
            log.warning("no queueing estimate for epoch %d under %s: %s", routes.epoch, workload, e)
            out = None
        self._figures[key] = out
        while len(self._figures) > 32:
            self._figures.pop(next(iter(self._figures)))
        return out
