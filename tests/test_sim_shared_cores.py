"""``SimConfig.shared_cores``: nodes that share a machine's cores (a mesh of processes on one
machine) slow each other down only while more of them compute than there are cores."""

from __future__ import annotations

import pytest
from test_sim import ConstTiming

from meshllm.sim.model import SimConfig, SimModel, SimReplica, SimStage
from meshllm.sim.serving import simulate
from meshllm.sim.workload import Request


def _two_both() -> SimModel:
    reps = tuple(SimReplica(i, "both", (SimStage(f"n{i}", 0, 2),), 10**9, 8) for i in range(2))
    return SimModel(reps, ConstTiming(p=0.1 / 32, d=0.05))


def test_two_nodes_computing_at_once_on_one_core_take_twice_as_long() -> None:
    model = _two_both()
    both = [Request(0, 0.0, 32, 1), Request(1, 0.001, 32, 1)]  # one prompt on each replica, nearly at once
    alone = simulate(model, both, SimConfig(routing="start")).records
    assert {r.prefill_replica for r in alone} == {0, 1}
    assert [r.ttft_s for r in alone] == pytest.approx([0.1, 0.1])
    # one core: the first started alone (priced when it starts), the second shares the core
    one = simulate(model, both, SimConfig(routing="start", shared_cores=1)).records
    assert [r.ttft_s for r in one] == pytest.approx([0.1, 0.2])
    # as many cores as nodes: nothing changes
    assert [r.ttft_s for r in simulate(model, both, SimConfig(routing="start", shared_cores=2)).records] == pytest.approx([0.1, 0.1])


def test_work_apart_in_time_is_not_slowed() -> None:
    model = _two_both()
    apart = [Request(0, 0.0, 32, 3), Request(1, 10.0, 32, 3)]
    base = simulate(model, apart).records
    shared = simulate(model, apart, SimConfig(routing="start", shared_cores=1)).records
    assert [r.e2e_s for r in shared] == pytest.approx([r.e2e_s for r in base])


def test_negative_cores_are_refused() -> None:
    from meshllm.sim.engine import SimError

    with pytest.raises(SimError):
        SimConfig(shared_cores=-1)
