"""The planning work a node does for the control plane, off the event loop and off the inference
thread: the leader's planning rounds (profiles -> ``planner.Problem`` -> GA islands or another
strategy -> a proposed plan), GA islands evolved for the leader, and the node's self-profiling
(``self_profile``: measured or read from the cache, then ``ProfileReady`` to the control plane).

Everything CPU-heavy runs on this service's own one-thread executor (``meshllm-plan``), so a decode
step on the stage host's inference thread never waits behind a GA generation or a profile.

Leader side: the GA's initial population is split into islands that the control plane hands to
members (``EvolveIsland`` on each, with a local fallback); the merged elite is decoded into a
``Plan`` and proposed. The conversions are the pure ``meshllm.control.planning``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from meshllm.control.events import (
    EvolveIsland,
    IslandEvolved,
    Islands,
    IslandsDone,
    PlanningFailed,
    ProfileReady,
    ProposePlan,
    StartPlanning,
)
from meshllm.control.planning import (
    Individuals,
    device_from_profile,
    island_from_individuals,
    island_to_individuals,
    network_from_links,
    plan_document,
    plan_from_individual,
    problem_from_dict,
    problem_to_dict,
)
from meshllm.errors import MeshError, PlanError
from meshllm.model.manifest import Manifest
from meshllm.obs.progress import bar
from meshllm.planner import ga
from meshllm.planner.cost import ModelProfile
from meshllm.planner.problem import Problem
from meshllm.planner.strategies import plan_problem
from meshllm.planner.types import Workload
from meshllm.runtime.profile import NodeProfile, load_or_measure
from meshllm.wire.ids import NodeId

log = logging.getLogger("meshllm.planning")

T = TypeVar("T")


class PlanningService:
    """``step`` feeds an event to the control plane; ``gather_links`` returns every member's link
    measurements; ``proposed_epoch`` is the epoch the control plane has just proposed (or None)."""

    def __init__(self, model_profile: ModelProfile, *, name: str, workload: Workload, strategy: str,
                 objective: str, islands: int, step: Callable[[Any], None],
                 gather_links: Callable[[tuple[NodeId, ...]], Awaitable[dict[str, dict[str, Any]]]],
                 proposed_epoch: Callable[[], int | None]) -> None:
        self.model_profile = model_profile
        self.name = name
        self.workload = workload
        self.strategy = strategy
        self.objective = objective
        self.islands = islands
        self._step = step
        self._gather_links = gather_links
        self._proposed_epoch = proposed_epoch
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshllm-plan")
        self.islands_evolved = 0
        self.planned_over: dict[int, tuple[str, ...]] = {}  # leader: epoch -> members planned over
        self._problems: dict[str, Problem] = {}  # evolving members: problem documents seen lately
        self._islands_problem: dict[int, Problem] = {}  # leader: round -> problem
        self._islands_reason: dict[int, str] = {}  # leader: round -> why it planned (for the plan)
        self.profile: NodeProfile | None = None  # this node's, once measured
        self.profile_progress = "not started"

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the planning executor."""
        # in the caller's context, so what fn logs names the node it works for
        return await asyncio.get_running_loop().run_in_executor(self.executor, contextvars.copy_context().run, fn)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- leader ---------------------------------------------------------------------------------
    async def plan(self, sp: StartPlanning) -> None:
        try:
            links = await self._gather_links(sp.members)
            members = [m for m in sp.members if m in sp.profiles]
            devices = tuple(device_from_profile(m, sp.profiles[m]) for m in members)
            problem = Problem(self.model_profile, devices, network_from_links(members, links), self.workload)
            if self.strategy != "e2llm":
                rng = np.random.default_rng(sp.round)
                plan = await self.run(lambda: plan_problem(self.strategy, problem, self.objective, rng))
                log.info("planning round %d (%s): %s over %d members", sp.round, sp.reason,
                         self.strategy, len(members))
                self._step(ProposePlan(sp.round, plan_document(plan, problem.workload, sp.reason)))
                self._note_planned(problem)
                return
            k = self.islands or min(max(len(members), 1), 4)
            rng = np.random.default_rng(sp.round)

            def seed_islands() -> list[Individuals]:
                # The first island starts from the seeds and the local search of `ga.run` (its
                # race of shapes): the best single-machine answer goes out as every island's
                # elite, and the members' generations explore around it.
                first = ga.run(problem, rng, generations=0)
                rest = [ga.initial_island(problem, rng) for _ in range(k - 1)]
                return [island_to_individuals(x)[0] for x in [first, *rest]]

            islands = await self.run(seed_islands)
        except (MeshError, KeyError, TypeError, ValueError) as e:
            self._step(PlanningFailed(sp.round, f"{type(e).__name__}: {e}"))
            return
        self._islands_problem = {sp.round: problem}
        self._islands_reason = {sp.round: sp.reason}
        log.info("planning round %d (%s): %d members, %d GA islands", sp.round, sp.reason, len(members), k)
        self._step(Islands(sp.round, tuple(islands), problem_to_dict(problem)))

    async def finish(self, done: IslandsDone) -> None:
        problem = self._islands_problem.get(done.round)
        if problem is None or not done.individuals:
            self._step(PlanningFailed(done.round, "no population to decode"))
            return
        if done.fallbacks:
            log.info("planning round %d: islands %s evolved locally (members did not answer in time)",
                     done.round, list(done.fallbacks))
        best = done.individuals[0]

        def polish() -> tuple[int, ...]:
            # The islands recombine groups; a last climb makes their best a local optimum of
            # every single move and of pairs of device moves (as `ga.run` ends), deterministic
            # in the round number.
            m = len(problem.devices)
            a, r = ga.normalise(np.asarray(best[:m], dtype=np.int64), np.asarray(best[m:], dtype=np.int64))
            a, r, _, _ = ga.climb(problem, a, r, np.random.default_rng(done.round), pairs=ga.PAIRS)
            return tuple(int(x) for x in (*a, *r))

        try:
            plan = plan_from_individual(problem, await self.run(polish), objective=self.objective)
        except PlanError as e:
            self._step(PlanningFailed(done.round, str(e)))
            return
        reason = self._islands_reason.get(done.round, "")
        self._step(ProposePlan(done.round, plan_document(plan, problem.workload, reason)))
        self._note_planned(problem)

    def _note_planned(self, problem: Problem) -> None:
        epoch = self._proposed_epoch()
        if epoch is not None:
            # Which members a proposed epoch was planned over (for /v1/mesh and tests).
            self.planned_over[epoch] = tuple(problem.names)

    # --- every member ---------------------------------------------------------------------------
    async def evolve(self, ev: EvolveIsland) -> None:
        loop = asyncio.get_running_loop()

        def work() -> tuple[Individuals, tuple[float, ...]]:
            key = hashlib.sha256(json.dumps(ev.problem, sort_keys=True).encode()).hexdigest()
            problem = self._problems.get(key)
            if problem is None:
                problem = self._problems[key] = problem_from_dict(ev.problem, self.model_profile)
                while len(self._problems) > 4:
                    self._problems.pop(next(iter(self._problems)))
            isl = island_from_individuals(problem, ev.individuals)
            isl = ga.evolve(isl, ev.generations, np.random.default_rng(ev.seed))
            return island_to_individuals(isl)

        t0 = loop.time()
        try:
            inds, fit = await self.run(work)
        except (MeshError, KeyError, TypeError, ValueError) as e:
            log.warning("island %d of round %d: %s", ev.island, ev.round, e)
            return
        self.islands_evolved += 1
        log.info("%s evolved GA island %d of round %d: %d generations in %.2f s, best fitness %.4g",
                 self.name, ev.island, ev.round, ev.generations, loop.time() - t0, fit[0] if fit else float("nan"))
        self._step(IslandEvolved(ev.round, ev.island, inds, fit))

    # --- self-profiling -------------------------------------------------------------------------
    async def self_profile(self, manifest: Manifest, state_dir: Path, *, threads: int, slowdown: float,
                           memory_bytes: int, links: Callable[[], Mapping[str, Mapping[str, float]]],
                           given: Callable[[], NodeProfile] | None = None, attention: str = "fused",
                           cache_dir: Path | None = None) -> None:
        """This node's profile, read from the cache in ``state_dir`` (``cache_dir`` where given) or measured on this service's
        executor (never on the inference thread), then ``ProfileReady`` to the control plane with
        the node's name and its link measurements (``links``). ``given`` makes the profile up
        instead (tests). Without a profile the node stays a member but is never planned onto.
        ``attention``: the kind the runners measured run (the node's own choice)."""
        if given is not None:
            prof = given()
        else:
            shown = bar(desc=f"profile {manifest.name}", unit="block")  # on a terminal only

            def progress(i: int, n: int, what: str) -> None:
                shown.total = n
                shown.update(i - shown.n)
                self.profile_progress = f"{i}/{n} blocks" if i < n else "done"
                if i < n:
                    log.info("profiling %s: block %d/%d (%s)", manifest.name, i + 1, n, what)

            try:
                prof, cached = await self.run(lambda: load_or_measure(
                    manifest, state_dir, threads=threads, slowdown=slowdown, memory_bytes=memory_bytes,
                    progress=progress, attention=attention, cache_dir=cache_dir))
            except (MeshError, OSError, RuntimeError) as e:
                self.profile_progress = f"failed: {e}"
                log.error("profiling failed: %s; this node will not be given blocks", e)
                return
            finally:
                shown.close()
            log.info("profile %s: decode %.2f ms/token, prefill %.3f ms/token, budget %.2f GiB",
                     "from cache" if cached else "measured", 1000 * prof.decode_s_per_token,
                     1000 * sum(prof.prefill_s_per_token), prof.memory_bytes / (1 << 30))
        self.profile = prof
        self.profile_progress = "done"
        doc = prof.to_dict()
        doc["name"] = self.name
        doc["links"] = dict(links())
        self._step(ProfileReady(doc))
