"""Where a request's frames go under one plan epoch: pure lookups over a ``Plan``.

Every node holds the plan of each epoch it loaded (the control plane hands it over with
``LoadPlan``), so the data-plane messages name replicas and stages by index and each node finds
the next hop here: the next stage of a replica, the stage of a decoder replica that owns a layer
(the KV re-sharding of a hand-off between replicas split differently), a replica's head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm.errors import PlanError
from meshllm.planner.types import Plan, Replica, Role, Stage


@dataclass(frozen=True, slots=True)
class StageRef:
    replica: int
    index: int  # position of the stage in its replica
    node: str
    first: int
    end: int


class Routes:
    """One epoch's plan as the data plane reads it."""

    def __init__(self, epoch: int, plan: Plan | dict[str, Any]) -> None:
        self.epoch = epoch
        self.plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
        self.replicas: dict[int, Replica] = {r.id: r for r in self.plan.replicas}
        if not self.replicas:
            raise PlanError("a plan without replicas")
        self._stages: dict[int, list[StageRef]] = {
            r.id: [StageRef(r.id, i, s.node, s.first, s.end) for i, s in enumerate(r.stages)]
            for r in self.plan.replicas}

    # --- replicas -----------------------------------------------------------------------------
    def replica(self, rid: int) -> Replica:
        try:
            return self.replicas[rid]
        except KeyError:
            raise PlanError(f"epoch {self.epoch} has no replica {rid}") from None

    def prefill_replicas(self) -> list[int]:
        return [r.id for r in self.plan.replicas if r.role in (Role.PREFILL, Role.BOTH)]

    def decoder_replicas(self) -> list[int]:
        return [r.id for r in self.plan.replicas if r.role in (Role.DECODER, Role.BOTH)]

    def stages(self, rid: int) -> list[StageRef]:
        self.replica(rid)
        return self._stages[rid]

    def stage(self, rid: int, index: int) -> StageRef:
        st = self.stages(rid)
        if not 0 <= index < len(st):
            raise PlanError(f"replica {rid} of epoch {self.epoch} has no stage {index}")
        return st[index]

    def stage_at(self, rid: int, first_block: int) -> StageRef:
        for s in self.stages(rid):
            if s.first == first_block:
                return s
        raise PlanError(f"no stage of replica {rid} starts at block {first_block}")

    def next_stage(self, ref: StageRef) -> StageRef | None:
        st = self._stages[ref.replica]
        return st[ref.index + 1] if ref.index + 1 < len(st) else None

    def head(self, rid: int) -> StageRef:
        return self.stages(rid)[-1]

    def owner(self, rid: int, block: int) -> StageRef:
        """The stage of replica ``rid`` that runs ``block``."""
        for s in self.stages(rid):
            if s.first <= block < s.end:
                return s
        raise PlanError(f"no stage of replica {rid} holds block {block}")

    def nodes(self, rid: int) -> set[str]:
        return {s.node for s in self.stages(rid)}

    def all_nodes(self) -> set[str]:
        return {s.node for rs in self._stages.values() for s in rs}

    def mine(self, node: str) -> list[StageRef]:
        return [s for rs in self._stages.values() for s in rs if s.node == node]


def layer_blocks(stage: StageRef | Stage, num_layers: int) -> list[int]:
    """The decoder-layer blocks (those holding KV) of a stage's range."""
    first, end = (stage.first, stage.end)
    return [b for b in range(first, end) if 1 <= b <= num_layers]
