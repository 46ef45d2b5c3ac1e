"""``validate_plan``: the checks every plan passes before anyone acts on it."""

from __future__ import annotations

from collections.abc import Sequence

from meshllm.errors import PlanError
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device, Plan, Role, Workload


def validate_plan(plan: Plan, profile: ModelProfile, devices: Sequence[Device],
                  workload: Workload | None = None) -> None:
    """Raise :class:`PlanError` with a one-line reason unless ``plan`` is sound:

    - at least one replica, unique replica ids, every replica with at least one stage
    - each replica's stages cover blocks ``[0, N)`` contiguously, in order: no gap, no overlap,
      no empty or out-of-range stage
    - every node is a known device, and no node serves two replicas
    - memory: on every node, the weights of all its blocks plus the KV cache of one sequence of
      ``workload.target_len`` tokens (one prompt at the prompt percentile on a PREFILL replica;
      weights alone without a workload) fit its budget
    - roles: PREFILL replicas need a DECODER replica; DECODER replicas need something that
      prefills (PREFILL or BOTH)
    """
    n = profile.n_blocks
    known = {d.name: d for d in devices}
    if not plan.replicas:
        raise PlanError("plan has no replicas")
    ids = [r.id for r in plan.replicas]
    if len(set(ids)) != len(ids):
        raise PlanError(f"plan has duplicate replica ids {sorted({i for i in ids if ids.count(i) > 1})}")
    owner: dict[str, int] = {}
    need: dict[str, float] = {}
    for r in plan.replicas:
        # a prefill replica holds prompts only; decoding replicas whole sequences
        if workload is None:
            seq = 0
        elif r.role == Role.PREFILL:
            seq = workload.input_len.percentile(workload.kv_percentile)
        else:
            seq = workload.target_len
        if not r.stages:
            raise PlanError(f"replica {r.id} has no stages")
        expect = 0
        for s in r.stages:
            if s.node not in known:
                raise PlanError(f"replica {r.id}: unknown node {s.node!r}")
            if owner.setdefault(s.node, r.id) != r.id:
                raise PlanError(f"node {s.node!r} serves replicas {owner[s.node]} and {r.id}")
            a, b = s.layers
            if not (0 <= a < b <= n):
                raise PlanError(f"replica {r.id}: stage on {s.node} has blocks [{a}, {b}) outside "
                                f"[0, {n}) or empty")
            if a > expect:
                raise PlanError(f"replica {r.id}: gap, blocks [{expect}, {a}) are placed nowhere")
            if a < expect:
                raise PlanError(f"replica {r.id}: overlap, blocks [{a}, {expect}) are placed twice")
            expect = b
            need[s.node] = need.get(s.node, 0.0) + profile.weight_bytes(a, b) \
                + profile.kv_bytes_per_token(a, b) * seq
        if expect != n:
            raise PlanError(f"replica {r.id}: gap, blocks [{expect}, {n}) are placed nowhere")
    for node, nb in need.items():
        cap = known[node].memory_bytes
        if nb > cap:
            raise PlanError(f"node {node} needs {nb / 2**30:.2f} GiB but has {cap / 2**30:.2f} GiB")
    roles = {r.role for r in plan.replicas}
    if Role.PREFILL in roles and Role.DECODER not in roles:
        raise PlanError("plan has prefill replicas but no decoder replica")
    if Role.DECODER in roles and not roles & {Role.PREFILL, Role.BOTH}:
        raise PlanError("plan has decoder replicas but nothing that runs prefill")
