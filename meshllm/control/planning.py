"""The planning glue between the control plane's documents and the planner's types. Pure.

What travels between nodes is plain data: a member's profile (its ``/v1/profile`` document, the
fields of ``runtime.profile.NodeProfile.to_dict``), the link measurements each member made of its
peers, the planning problem as a dict of device profiles, network and workload (every member holds
the same model, so the model profile is not sent), GA individuals as flat integer tuples
``assign (M) + roles (M)``, and plans as ``Plan.to_dict()`` plus the workload lengths they were
made for. These functions turn one into the other; the leader's planning service
(``meshllm.planning_service``) calls them off the event loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshllm.errors import DoesNotFit, PlanError
from meshllm.planner import ga
from meshllm.planner.cost import ModelProfile
from meshllm.planner.problem import Problem
from meshllm.planner.queueing import INFEASIBLE
from meshllm.planner.strategies import baseline_note, with_baselines
from meshllm.planner.types import Device, Link, Network, Plan, Workload
from meshllm.planner.validate import validate_plan

Individuals = tuple[tuple[int, ...], ...]


def device_from_profile(node_id: str, prof: dict[str, Any]) -> Device:
    """A planner ``Device`` from a member's profile document. Raises ``KeyError``, ``TypeError`` or
    ``ValueError`` on a malformed one (the fields ``NodeProfile.from_dict`` requires)."""
    for key in ("model_id", "threads", "slowdown"):  # required by the profile format
        if key not in prof:
            raise KeyError(key)
    int(prof["threads"])
    float(prof["slowdown"])
    slope = prof.get("decode_s_per_ctx_token") or None  # profiles before version 4 have none
    rows = prof.get("decode_s_per_row") or None  # nor before version 7 what a decode row costs
    return Device(name=node_id, memory_bytes=max(1, int(prof["memory_bytes"])),
                  tflops=max(float(prof["tflops"]), 1e-9), mem_bw_gbs=max(float(prof["mem_bw_gbs"]), 1e-9),
                  prefill_s_per_token=tuple(float(x) for x in prof["prefill_s_per_token"]),
                  decode_s_per_step=tuple(float(x) for x in prof["decode_s_per_step"]), measured=True,
                  decode_s_per_ctx_token=tuple(max(0.0, float(x)) for x in slope) if slope else None,
                  decode_ctx=float(prof.get("decode_ctx", 0.0)),
                  # profiles before version 5 did not time a step after idling: nothing added
                  idle_step_s=_finite(max(0.0, float(prof.get("idle_step_s", 0.0)))),
                  idle_step_frac=_finite(float(prof.get("idle_step_frac", 0.0))),
                  decode_s_per_row=tuple(_finite(max(0.0, float(x))) for x in rows) if rows else None,
                  # nor before version 8 a step after a long pause
                  idle_long_s=_finite(max(0.0, float(prof.get("idle_long_s", 0.0)))),
                  idle_long_frac=_finite(float(prof.get("idle_long_frac", 0.0))))


def _finite(x: float) -> float:
    """``x``, or 0 where a document carried a NaN or an infinity."""
    return x if math.isfinite(x) else 0.0


def network_from_links(members: Sequence[str], links: dict[str, dict[str, Any]]) -> Network:
    """Pairwise links from each member's measurements of its peers (mean of both directions);
    pairs nobody measured get the median of the measured ones (or the planner's default)."""
    pairs: dict[frozenset[str], list[tuple[float, float]]] = {}
    for a in members:
        for b, m in (links.get(a) or {}).items():
            if b in members and b != a and isinstance(m, dict):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    pairs.setdefault(frozenset((a, b)), []).append((float(m["mbps"]), float(m["rtt_ms"])))
    if not pairs:
        return Network()
    out = []
    for pair, ms in sorted(pairs.items(), key=lambda kv: sorted(kv[0])):
        a, b = sorted(pair)
        out.append(Link(a, b, max(float(np.mean([x[0] for x in ms])), 1e-3),
                        max(float(np.mean([x[1] for x in ms])), 0.0)))
    return Network(default_mbps=max(float(np.median([ln.mbps for ln in out])), 1e-3),
                   default_rtt_ms=float(np.median([ln.rtt_ms or 0.0 for ln in out])), links=tuple(out))


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    return {"devices": [d.to_dict() for d in problem.devices], "network": problem.network.to_dict(),
            "workload": problem.workload.to_dict()}


def problem_from_dict(d: dict[str, Any], model: ModelProfile) -> Problem:
    try:
        return Problem(model, tuple(Device.from_dict(x) for x in d["devices"]),
                       Network.from_dict(d["network"]), Workload.from_dict(d["workload"]))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"malformed planning problem: {e!r}") from None


def island_to_individuals(isl: ga.Island, keep: int | None = None) -> tuple[Individuals, tuple[float, ...]]:
    n = len(isl.fitness) if keep is None else min(keep, len(isl.fitness))
    inds = tuple(tuple(int(x) for x in np.concatenate([isl.assign[i], isl.roles[i]])) for i in range(n))
    return inds, tuple(float(f) for f in isl.fitness[:n])


def island_from_individuals(problem: Problem, inds: Individuals) -> ga.Island:
    m = len(problem.devices)
    pairs = []
    for ind in inds:
        if len(ind) != 2 * m:
            raise PlanError(f"individual of length {len(ind)} for {m} devices")
        a = np.asarray(ind[:m], dtype=np.int64)
        r = np.asarray(ind[m:], dtype=np.int64)
        if a.min() < 0 or a.max() > m or r.min() < 0 or r.max() > 2:
            raise PlanError("individual out of range")
        pairs.append(ga.normalise(a, r))
    if not pairs:
        raise PlanError("empty island")
    fit = np.array([ga.fitness(problem, a, r) for a, r in pairs])
    order = np.argsort(fit, kind="stable")
    return ga.Island(problem, np.stack([pairs[i][0] for i in order]), np.stack([pairs[i][1] for i in order]),
                     fit[order])


def plan_from_individual(problem: Problem, ind: tuple[int, ...], strategy: str = "e2llm",
                         objective: str = "waiting") -> Plan:
    """Decode a GA individual (``assign + roles``) into a validated plan with predicted figures;
    a baseline strategy's plan instead where the fitness scores it lower (``with_baselines``:
    ``e2llm`` on one machine does the same)."""
    m = len(problem.devices)
    a, r = ga.normalise(np.asarray(ind[:m], dtype=np.int64), np.asarray(ind[m:], dtype=np.int64))
    est, stages = ga.decode(problem, a, r)
    feasible = est.fitness < INFEASIBLE and all(st for _, st in stages)
    reps, who = with_baselines(problem, [(role, list(st)) for role, st in stages] if feasible else None, objective)
    if reps is None:
        raise DoesNotFit("no feasible plan: no grouping of the members holds a full replica")
    plan = Plan(0, problem.to_replicas(reps), problem.estimate_stages(reps, with_saturation=True).predicted,
                strategy, baseline_note(who) if who else "")
    validate_plan(plan, problem.profile, problem.devices, problem.workload)
    return plan


def plan_document(plan: Plan, workload: Workload, reason: str = "") -> dict[str, Any]:
    """``Plan.to_dict()`` plus the workload it was made for (the mean lengths, which the drift
    detector compares, and the arrival rate) and why the leader planned again (``reason``: a join,
    a loss, drift, an operator; shown to people)."""
    d = plan.to_dict()
    d["workload"] = {"mean_input_len": workload.input_len.mean, "mean_output_len": workload.output_len.mean,
                     "arrival_rate": workload.arrival_rate}
    if reason:
        d["reason"] = reason
    return d


def my_ranges(doc: dict[str, Any], node_id: str) -> list[tuple[int, int]]:
    """The block ranges ``[first, end)`` a plan document gives ``node_id``, in replica order.
    Raises ``PlanError`` on a malformed plan."""
    plan = Plan.from_dict(doc)
    return [(s.first, s.end) for r in plan.replicas for s in r.stages if s.node == node_id]


def plan_summary(doc: dict[str, Any], names: dict[str, str]) -> str:
    """One line per plan for the log: ``prefill: a[0,5) -> b[5,9); decoder: c[0,9)``."""
    try:
        plan = Plan.from_dict(doc)
    except PlanError:
        return "(unreadable)"
    parts = []
    for r in plan.replicas:
        st = " -> ".join(f"{names.get(s.node, s.node[:8])}[{s.first},{s.end})" for s in r.stages)
        parts.append(f"{r.role.value}: {st}")
    return "; ".join(parts)


def known_devices(profiles: dict[str, dict[str, Any] | None]) -> dict[str, Device]:
    """Planner devices for the nodes whose profile documents are known (``None``: not yet);
    a malformed document counts as unknown."""
    out: dict[str, Device] = {}
    for nid, prof in profiles.items():
        if prof:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out[nid] = device_from_profile(nid, prof)
    return out
