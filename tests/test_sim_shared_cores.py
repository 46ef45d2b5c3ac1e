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


def test_the_serving_paths_cpu_counts_on_shared_cores_only() -> None:
    """``serve_cpu``: each row of a node's stage work costs its serving path that much CPU beside
    the compute (not slowed): the node asks for that over the job's time of a core more."""
    model = _two_both()
    both = [Request(0, 0.0, 32, 1), Request(1, 0.001, 32, 1)]
    serve = (("n0", 0.01), ("n1", 0.01))
    own = simulate(model, both, SimConfig(routing="start", serve_cpu=serve)).records
    assert [r.ttft_s for r in own] == pytest.approx([0.1, 0.1])  # own hardware: not modelled
    # each prompt 0.1 s of compute and 0.01 s of serving CPU beside it: 1.1 cores asked while it runs
    two = simulate(model, both, SimConfig(routing="start", shared_cores=2, serve_cpu=serve))
    assert [r.ttft_s for r in two.records] == pytest.approx([0.1, 0.11])  # 1.1, then 2.2 cores of 2
    one = simulate(model, both, SimConfig(routing="start", shared_cores=1, serve_cpu=serve))
    assert [r.ttft_s for r in one.records] == pytest.approx([0.11, 0.22])  # 1.1, then 2.2 cores of 1
    assert one.jobs == one.rows == {"n0": 1, "n1": 1}
    assert one.serve_s == pytest.approx({"n0": 0.01, "n1": 0.01})
    # a slowed node computes half the time, its serving path is not slowed: 0.5 + 0.1 cores each;
    # the second asks for 1.2 cores of 1: its computing half stretches by 1.2
    slowed = SimConfig(routing="start", shared_cores=1, serve_cpu=serve, core_share=(("n0", 0.5), ("n1", 0.5)))
    assert [r.ttft_s for r in simulate(model, both, slowed).records] == pytest.approx([0.1, 0.11])


def test_the_serving_paths_cpu_is_per_row() -> None:
    """A decode micro-batch of several sequences costs its node's serving path per sequence."""
    model = SimModel((SimReplica(0, "both", (SimStage("n0", 0, 2),), 10**9, 8),), ConstTiming(p=0.1 / 32, d=0.05))
    reqs = [Request(0, 0.0, 32, 3), Request(1, 0.0, 32, 3)]
    res = simulate(model, reqs, SimConfig(routing="start", shared_cores=2, serve_cpu=(("n0", 0.001),)))
    assert sum(res.rows.values()) > sum(res.jobs.values())  # the two decode together
    assert res.serve_s["n0"] == pytest.approx(0.001 * res.rows["n0"])
    from meshllm.sim.engine import SimError

    with pytest.raises(SimError, match="serving CPU"):
        SimConfig(serve_cpu=(("n0", -1.0),))


def test_other_work_on_the_machine_shares_the_cores() -> None:
    """``background_cores``: what other programs take counts among the cores asked for."""
    model = _two_both()
    both = [Request(0, 0.0, 32, 1), Request(1, 0.001, 32, 1)]
    cfg = SimConfig(routing="start", shared_cores=2, background_cores=1.0)
    # the first alone with the other work: 2 cores asked of 2; the second makes it 3 of 2
    assert [r.ttft_s for r in simulate(model, both, cfg).records] == pytest.approx([0.1, 0.15])
    # on its own hardware a node shares nothing
    own = SimConfig(routing="start", background_cores=1.0)
    assert [r.ttft_s for r in simulate(model, both, own).records] == pytest.approx([0.1, 0.1])
    from meshllm.sim.engine import SimError

    with pytest.raises(SimError, match="background"):
        SimConfig(background_cores=-0.5)
