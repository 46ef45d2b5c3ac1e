"""The leader's side of the decentralised GA: hand islands to members, merge what comes back, and
evolve locally whatever does not come back by the deadline. Pure; the GA itself (``evolve``) runs
in the shell on an ``EvolveIsland`` effect, and ``merge`` is injected.

Each island gets its own seed from the leader's generator, and a local fallback reuses that seed,
so a round's result does not depend on which member evolved which island (given a deterministic
``evolve``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from meshllm.control.events import EvolveIsland, Individuals, IslandEvolved, IslandsDone, Log, Output, Send
from meshllm.wire.ids import NodeId
from meshllm.wire.messages import IslandResult, IslandWork

Population = tuple[Individuals, tuple[float, ...]]
Merge = Callable[[Sequence[Population]], Population]


def default_merge(results: Sequence[Population]) -> Population:
    """All individuals of all islands, best (lowest fitness: a predicted cost) first, duplicates once."""
    best: dict[tuple[int, ...], float] = {}
    for individuals, fitness in results:
        for ind, fit in zip(individuals, fitness, strict=True):
            key = tuple(ind)
            if key not in best or fit < best[key]:
                best[key] = fit
    ranked = sorted(best.items(), key=lambda kv: (kv[1], kv[0]))
    return tuple(k for k, _ in ranked), tuple(f for _, f in ranked)


class IslandCoordinator:
    def __init__(self, *, self_id: NodeId, term: int, round: int, islands: Sequence[Individuals],
                 workers: Sequence[NodeId], problem: dict, generations: int, rng: np.random.Generator,
                 now: float, deadline: float, merge: Merge = default_merge) -> None:
        if not workers:
            workers = [self_id]
        self.self_id = self_id
        self.term = term
        self.round = round
        self.islands = [tuple(tuple(int(g) for g in ind) for ind in island) for island in islands]
        self.problem = problem
        self.generations = generations
        self.seeds = [int(s) for s in rng.integers(0, 2**62, size=len(self.islands))]
        self.assigned: dict[int, NodeId] = {i: workers[i % len(workers)] for i in range(len(self.islands))}
        self.deadline = now + deadline
        self.merge = merge
        self.results: dict[int, Population] = {}
        self.fallbacks: set[int] = set()
        self.done = False

    def _evolve_locally(self, i: int) -> EvolveIsland:
        return EvolveIsland(self.round, i, self.islands[i], self.generations, self.seeds[i], self.problem)

    def start(self) -> list[Output]:
        out: list[Output] = []
        for i, node in sorted(self.assigned.items()):
            if node == self.self_id:
                out.append(self._evolve_locally(i))
            else:
                out.append(Send(node, IslandWork(self.term, self.self_id, self.round, i, self.islands[i],
                                                 self.generations, self.seeds[i], self.problem)))
        return out + self._maybe_done()

    def is_local(self, island: int) -> bool:
        return self.assigned.get(island) == self.self_id or island in self.fallbacks

    def on_local(self, ev: IslandEvolved) -> list[Output]:
        return self._accept(ev.island, ev.individuals, ev.fitness, "this node")

    def on_result(self, src: NodeId, msg: IslandResult) -> list[Output]:
        if msg.round != self.round or self.assigned.get(msg.island) != src:
            return [Log("info", f"island_result for round {msg.round} island {msg.island} from {src} "
                                f"was not asked for; ignored")]
        return self._accept(msg.island, msg.individuals, msg.fitness, src)

    def _accept(self, island: int, individuals: Individuals, fitness: tuple[float, ...],
                who: str) -> list[Output]:
        if self.done or island in self.results:
            return []  # the fallback and the member both answered: the first one counts
        if len(individuals) != len(fitness) or not individuals:
            return [Log("warning", f"island {island} from {who}: {len(individuals)} individuals but "
                                   f"{len(fitness)} fitness values; ignored")]
        self.results[island] = (individuals, fitness)
        return self._maybe_done()

    def tick(self, now: float) -> list[Output]:
        if self.done or now < self.deadline:
            return []
        out: list[Output] = []
        for i, node in sorted(self.assigned.items()):
            if i not in self.results and node != self.self_id and i not in self.fallbacks:
                self.fallbacks.add(i)
                out.append(Log("info", f"island {i} not back from {node} in time; evolving it locally"))
                out.append(self._evolve_locally(i))
        return out

    def _maybe_done(self) -> list[Output]:
        if self.done or len(self.results) < len(self.islands):
            return []
        self.done = True
        individuals, fitness = self.merge([self.results[i] for i in sorted(self.results)])
        return [IslandsDone(self.round, individuals, fitness, tuple(sorted(self.fallbacks)))]
