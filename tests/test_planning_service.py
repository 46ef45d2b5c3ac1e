"""The leader's planning service runs the GA as ``e2llm`` does on one machine: the first island it
sends out starts from the seeds and the race of shapes (``ga.run(..., generations=0)``), and the
merged best that comes back is climbed to a local optimum before it becomes the plan."""

from __future__ import annotations

from typing import Any

import numpy as np

from meshllm.control.events import Islands, IslandsDone, ProposePlan, StartPlanning
from meshllm.control.planning import (
    island_to_individuals,
    plan_document,
    plan_from_individual,
    problem_from_dict,
)
from meshllm.planner import ga
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Workload
from meshllm.planning_service import PlanningService
from meshllm.runtime.runner import resident_costs


def profiles(manifest: Any, n: int) -> dict[str, dict[str, Any]]:
    """n members of different speeds, each able to hold about half the model."""
    blocks = manifest.config.num_blocks
    weights = sum(c.param_bytes for c in resident_costs(manifest))
    out = {}
    for i in range(n):
        slow = 1.0 + (i % 3)
        out[f"m{i}"] = {"model_id": manifest.model_id, "threads": 1, "slowdown": slow,
                        "memory_bytes": int(weights * (0.55 + 0.2 * (i % 2))), "tflops": 0.05 / slow,
                        "mem_bw_gbs": 4.0 / slow, "prefill_s_per_token": [1e-5 * slow] * blocks,
                        "decode_s_per_step": [4e-4 * slow] * blocks}
    return out


async def test_islands_start_from_the_search_and_the_best_is_climbed(bundled_manifest) -> None:
    model = ModelProfile.from_costs(resident_costs(bundled_manifest), bundled_manifest.name)
    out: list[Any] = []

    async def no_links(members: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return {}

    svc = PlanningService(model, name="m0", workload=Workload(arrival_rate=4.0), strategy="e2llm",
                          objective="waiting", islands=3, step=out.append, gather_links=no_links,
                          proposed_epoch=lambda: None)
    try:
        members = profiles(bundled_manifest, 6)
        await svc.plan(StartPlanning(7, tuple(members), members, "test"))
        (isl,) = out
        assert isinstance(isl, Islands) and len(isl.islands) == 3
        problem = problem_from_dict(isl.problem, model)
        searched = ga.run(problem, np.random.default_rng(7), generations=0)
        assert isl.islands[0] == island_to_individuals(searched)[0]
        m = len(problem.devices)

        def fit(ind: tuple[int, ...]) -> float:
            return ga.fitness(problem, np.asarray(ind[:m]), np.asarray(ind[m:]))

        # the search's answer beats every plain initial individual of the other islands
        assert fit(isl.islands[0][0]) <= min(fit(ind) for other in isl.islands[1:] for ind in other)

        # a merged best that is not a local optimum: the plan is the climb's, strictly better
        worst = max((ind for ind in isl.islands[2] if fit(ind) < ga.INFEASIBLE), key=fit)
        out.clear()
        await svc.finish(IslandsDone(7, (worst,), (fit(worst),), ()))
        (prop,) = out
        assert isinstance(prop, ProposePlan)
        a, r = ga.normalise(np.asarray(worst[:m], dtype=np.int64), np.asarray(worst[m:], dtype=np.int64))
        a, r, f, _ = ga.climb(problem, a, r, np.random.default_rng(7))
        assert f < fit(worst)
        climbed = tuple(int(x) for x in (*a, *r))
        assert prop.plan == plan_document(plan_from_individual(problem, climbed), problem.workload, "test")
    finally:
        svc.close()
