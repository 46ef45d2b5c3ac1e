"""Control plane beyond the election: membership timings, plan epochs over a simulated mesh,
GA islands with fallback, drift, draining, bad plans. All pure: logical time, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.control.config import ControlConfig
from meshllm.control.drift import DriftDetector
from meshllm.control.events import (
    EvolveIsland,
    Log,
    MemberDied,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberSuspected,
    ObservedRequest,
    OperatorReplan,
    PlanLoaded,
    Send,
)
from meshllm.control.islands import IslandCoordinator, default_merge
from meshllm.control.membership import Liveness, Membership
from meshllm.control.node import ControlNode
from meshllm.control.simnet import SimCluster, toy_evolve
from meshllm.errors import ConfigError, PlanError
from meshllm.wire.messages import IslandResult, IslandWork, PlanPropose

FIVE = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 0}  # d leads (priority), then e, c, b, a


def plan_nodes(c: SimCluster, node: str) -> set[str]:
    plan = c.nodes[node].active_plan
    return {s["node"] for r in plan["replicas"] for s in r["stages"]} if plan else set()


def converged(c: SimCluster, members: set[str]) -> bool:
    """One leader (the best), one active epoch everywhere, covering exactly ``members``."""
    live = c.alive()
    epochs = {c.nodes[n].active_epoch for n in live}
    return (c.agreed_leader() == c.best_alive() and len(epochs) == 1 and 0 not in epochs
            and all(plan_nodes(c, n) == members for n in live))


# --- membership ------------------------------------------------------------------------------------


def test_membership_table() -> None:
    m = Membership("me", 0, ControlConfig(heartbeat_interval=1.0, suspect_after=3, dead_after=6))
    assert m.heard("x", 0.0, priority=2) == [MemberJoined("x")]
    assert m.heard("x", 1.0) == [] and m.tick(3.9) == []
    assert m.tick(4.0) == [MemberSuspected("x")] and m.state("x") is Liveness.SUSPECT
    assert m.alive() == ["me"]
    assert m.heard("x", 4.5) == [MemberRecovered("x")] and m.alive() == ["me", "x"]
    assert m.tick(10.5) == [MemberSuspected("x"), MemberDied("x")]  # 6 beats silent: both at once
    assert m.heard("x", 11.0) == [MemberJoined("x")]  # a rejoin
    assert m.left("x") == [MemberLeft("x")] and m.left("x") == [] and m.alive() == ["me"]
    assert m.heard("me", 12.0) == []  # our own frames never make us a member
    assert m.best_alive() == "me"
    m.heard("x", 12.0)
    assert m.best_alive() == "x" and m.rank("x") == (2, "x")


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="suspect_after < dead_after"):
        ControlConfig(suspect_after=5, dead_after=5)
    with pytest.raises(ConfigError, match="heartbeat_interval must be positive"):
        ControlConfig(heartbeat_interval=0)


def test_node_survives_odd_driving() -> None:
    n = ControlNode("a", rng=np.random.default_rng(0), now=5.0)
    assert isinstance(n.tick(4.0)[0], Log)  # clock backwards: refused, logged
    assert isinstance(n.step(object())[0], Log)  # type: ignore[arg-type]
    assert isinstance(n.receive_bytes("b", b"\x00\x01garbage")[0], Log)
    assert n.step(PlanLoaded(7)) == [Log("info", "epoch 7 loaded but no longer wanted")]
    assert n.tick(6.0)  # still heartbeating


# --- plan epochs over the simulated mesh ---------------------------------------------------------


def test_five_nodes_converge_then_survive_leader_death_and_a_join() -> None:
    c = SimCluster(FIVE, seed=3, delay=(0.0, 0.2))
    assert c.run_until(30, lambda: converged(c, set(FIVE))), "no single leader and plan in 30 s"
    assert c.agreed_leader() == "d"
    first = c.nodes["a"].active_epoch

    c.crash("d")
    t0 = c.now
    assert c.run_until(t0 + 30, lambda: converged(c, {"a", "b", "c", "e"}))
    assert c.agreed_leader() == "e" and c.nodes["a"].active_epoch > first
    # the new leader was elected within a few heartbeat intervals of the death
    elected = min(t for t, node, term, leader in c.record.leader_changes if leader == "e" and t > t0)
    assert elected - t0 <= c.config.suspect_time + 2 * c.config.heartbeat_interval
    # every survivor drained, then unloaded, the first epoch
    assert c.run_until(c.now + 5, lambda: {n for _, n, e in c.record.unloads if e == first} >= set(c.alive()))

    before = c.nodes["a"].active_epoch
    c.add("f", 0)
    assert c.run_until(c.now + 30, lambda: converged(c, {"a", "b", "c", "e", "f"}))
    assert c.nodes["a"].active_epoch > before and c.agreed_leader() == "f"  # f outranks e by id


def test_converges_over_a_lossy_network() -> None:
    c = SimCluster(FIVE, seed=11, drop=0.2, delay=(0.0, 0.4))
    assert c.run_until(90, lambda: converged(c, set(FIVE))), [
        (n, c.nodes[n].election.ballot, c.nodes[n].active_epoch) for n in c.alive()]


def test_epoch_drains_before_unload_and_requests_carry_it() -> None:
    c = SimCluster(FIVE, seed=5, drain_time=3.0)
    assert c.run_until(30, lambda: converged(c, set(FIVE)))
    old = c.nodes["a"].active_epoch
    assert c.nodes["a"].accepts_epoch(old) and not c.nodes["a"].accepts_epoch(old + 1)
    c.step("b", OperatorReplan())
    assert c.run_until(c.now + 10, lambda: c.nodes["a"].active_epoch > old)
    new = c.nodes["a"].active_epoch
    assert c.nodes["a"].accepts_epoch(old) and c.nodes["a"].accepts_epoch(new)  # old still draining
    activated = max(t for t, n, e in c.record.activations if n == "a" and e == new)
    assert c.run_until(c.now + 10, lambda: not c.nodes["a"].accepts_epoch(old))
    unloaded = min(t for t, n, e in c.record.unloads if n == "a" and e == old)
    assert unloaded - activated >= 3.0  # not before the data plane said it was idle
    assert not c.nodes["a"].accepts_epoch(0)


def test_drain_timeout_forces_the_unload() -> None:
    cfg = ControlConfig(drain_timeout=4.0)
    c = SimCluster(FIVE, seed=5, config=cfg, drain_time=1e9)  # the data plane never says idle
    assert c.run_until(30, lambda: converged(c, set(FIVE)))
    old = c.nodes["a"].active_epoch
    c.step("d", OperatorReplan())
    assert c.run_until(c.now + 30, lambda: any(n == "a" and e == old for _, n, e in c.record.unloads))
    assert any("drain_timeout" in m for _, n, _, m in c.record.logs if n == "a")


def test_a_node_that_refuses_plans_is_left_out_and_the_mesh_keeps_running() -> None:
    def refuse_if_e_is_in(node):
        def validate(plan):
            if node == "e" and any(s["node"] == "e" for r in plan["replicas"] for s in r["stages"]):
                raise PlanError("over the memory budget of e")
        return {"validate_plan": validate}

    c = SimCluster(FIVE, seed=2, node_kwargs=refuse_if_e_is_in)
    assert c.run_until(60, lambda: converged(c, {"a", "b", "c", "d"}))
    assert any("rejected plan" in m and "memory budget of e" in m for _, n, _, m in c.record.logs if n == "e")
    assert any("aborted" in m for _, n, _, m in c.record.logs if n == "d")


def test_a_participant_that_never_loads_times_out_and_is_replanned_around() -> None:
    cfg = ControlConfig(plan_ack_timeout=5.0, replan_backoff=1.0)
    c = SimCluster({"a": 0, "b": 1}, seed=1, config=cfg)
    real = c._perform

    def never_load_on_a(node, outputs):
        real(node, [o for o in outputs if not (node == "a" and type(o).__name__ == "LoadPlan")])

    c._perform = never_load_on_a
    assert c.run_until(40, lambda: any("no plan_ack from a" in m for *_, m in c.record.logs))
    assert c.nodes["a"].active_epoch == 0 and c.agreed_leader() == "b"


def test_workload_drift_triggers_a_replan() -> None:
    cfg = ControlConfig(drift_window=40, drift_min_samples=20, drift_ratio=2.0)
    c = SimCluster(FIVE, seed=4, config=cfg)
    assert c.run_until(30, lambda: converged(c, set(FIVE)))
    epoch = c.nodes["a"].active_epoch
    for _ in range(40):  # as planned (toy plan: 100 in, 50 out): no drift
        c.step("a", ObservedRequest(110, 45))
    c.run_until(c.now + 5)
    assert c.nodes["a"].active_epoch == epoch
    for _ in range(40):  # four times longer prompts
        c.step("a", ObservedRequest(400, 45))
    assert c.run_until(c.now + 10, lambda: c.nodes["a"].active_epoch > epoch)
    assert any("drift (from a)" in m for _, n, _, m in c.record.logs if n == "d")


def test_drift_detector_thresholds() -> None:
    d = DriftDetector(100, 50, window=10, min_samples=5, ratio=2.0)
    assert all(d.observe(199, 26) is None for _ in range(10))  # just inside 2x either way
    r = None
    for _ in range(10):
        r = d.observe(201, 50) or r
    assert r is not None and r.input_mean == pytest.approx(201) and r.samples == 10
    d2 = DriftDetector(100, 50, window=10, min_samples=5, ratio=2.0)
    assert [d2.observe(1000, 50) for _ in range(4)] == [None] * 4  # too few samples yet
    assert d2.observe(1000, 50) is not None
    d3 = DriftDetector(100, 50, window=10, min_samples=5, ratio=2.0)
    assert [d3.observe(100, 20) for _ in range(5)][-1] is not None  # outputs 2.5x shorter


# --- GA islands ----------------------------------------------------------------------------------------


def _islands_run(unreachable: set[str]):
    cfg = ControlConfig(island_deadline=3.0)
    c = SimCluster({"a": 0, "b": 0, "c": 1}, seed=9, config=cfg, islands=3, unreachable_islands=unreachable)
    assert c.run_until(40, lambda: converged(c, {"a", "b", "c"}) and c.record.islands_done)
    return c, c.record.islands_done[0]


def test_islands_merge_and_fall_back_to_the_same_result() -> None:
    _, done_all = _islands_run(set())
    c_fb, done_fb = _islands_run({"a"})
    assert done_all.fallbacks == () and len(done_fb.fallbacks) == 1
    # a's island was evolved by the leader with the seed a would have used: same merged population
    assert done_fb.individuals == done_all.individuals and done_fb.fitness == done_all.fitness
    assert list(done_all.fitness) == sorted(done_all.fitness)
    assert any("evolving it locally" in m for *_, m in c_fb.record.logs)


def test_island_coordinator_by_hand() -> None:
    rng = np.random.default_rng(0)
    islands = [((1, 2), (3, 4)), ((5, 6),)]
    co = IslandCoordinator(self_id="L", term=4, round=2, islands=islands, workers=["L", "m"], problem={"p": 1},
                           generations=3, rng=rng, now=10.0, deadline=5.0)
    out = co.start()
    local, remote = out
    assert isinstance(local, EvolveIsland) and local.island == 0
    assert isinstance(remote, Send) and remote.to == "m" and isinstance(remote.msg, IslandWork)
    seed1 = remote.msg.seed
    # a result from someone not asked, or for another round, is ignored
    assert isinstance(co.on_result("x", IslandResult(4, 2, 1, "x", ((0, 0),), (0.0,)))[0], Log)
    assert isinstance(co.on_result("m", IslandResult(4, 3, 1, "m", ((0, 0),), (0.0,)))[0], Log)
    # a malformed one (lengths differ) is refused
    assert isinstance(co.on_result("m", IslandResult(4, 2, 1, "m", ((0, 0),), (0.0, 1.0)))[0], Log)
    inds, fit = toy_evolve(islands[0], 3, local.seed)
    from meshllm.control.events import IslandEvolved

    assert co.on_local(IslandEvolved(2, 0, inds, fit)) == []
    assert co.tick(14.9) == []
    fb = co.tick(15.0)
    assert [type(o).__name__ for o in fb] == ["Log", "EvolveIsland"] and fb[1].seed == seed1
    inds1, fit1 = toy_evolve(islands[1], 3, seed1)
    (done,) = co.on_local(IslandEvolved(2, 1, inds1, fit1))
    assert done.fallbacks == (1,) and (done.individuals, done.fitness) == default_merge([(inds, fit), (inds1, fit1)])
    assert co.on_result("m", IslandResult(4, 2, 1, "m", inds1, fit1)) == []  # late: ignored quietly


def test_default_merge_dedupes_and_sorts() -> None:
    inds, fit = default_merge([(((1,), (2,)), (3.0, 1.0)), (((1,), (3,)), (0.5, 2.0))])
    assert inds == ((1,), (2,), (3,)) and fit == (0.5, 1.0, 2.0)


def test_stale_plan_from_an_old_leader_is_refused() -> None:
    c = SimCluster(FIVE, seed=3)
    assert c.run_until(30, lambda: converged(c, set(FIVE)))
    a = c.nodes["a"]
    epoch = a.active_epoch
    out = a.receive_bytes("b", c.net.codec.encode(
        PlanPropose(a.term - 1 if a.term > 1 else 0, "b", epoch + 5, {"replicas": []})))
    assert isinstance(out[0], Log) and "stale plan_propose" in out[0].message
    assert a.active_epoch == epoch and not a.loading


def test_planner_plan_dicts_work_end_to_end() -> None:
    """The planner's Plan.to_dict() form goes through propose/activate and back through Plan.from_dict,
    stamped with the epoch the leader chose; its Workload.to_dict() feeds the drift detector."""
    from meshllm.control.events import ActivatePlan, ProfileReady, ProposePlan, StartPlanning
    from meshllm.control.node import default_planned_lengths
    from meshllm.planner.types import LengthDist, Plan, Workload

    wl = Workload(2.0, LengthDist.fixed(300), LengthDist.uniform(10, 30))
    assert default_planned_lengths({"workload": wl.to_dict()}) == (300.0, 20.0)
    assert default_planned_lengths({"workload": {"input_len": {"kind": "nope"}, "output_len": 3}}) is None
    n = ControlNode("solo", rng=np.random.default_rng(0), config=ControlConfig(discovery_grace=0.0),
                    validate_plan=Plan.from_dict)
    n.step(ProfileReady({"m": 1}))
    outs = n.tick(0.0) + n.tick(1.0)
    (start,) = [o for o in outs if isinstance(o, StartPlanning)]
    plan = {"epoch": 0, "strategy": "e2llm", "predicted": {},
            "replicas": [{"id": 0, "role": "both", "stages": [{"node": "solo", "layers": [0, 4]}]}],
            "workload": wl.to_dict()}
    n.step(ProposePlan(start.round, plan))
    (act,) = [o for o in n.step(PlanLoaded(1)) if isinstance(o, ActivatePlan)]
    assert act.epoch == 1 and Plan.from_dict(act.plan).epoch == 1 and Plan.from_dict(act.plan).nodes == ("solo",)
    assert n.drift is not None and n.drift.planned == (300.0, 20.0)
    assert n.status()["ready"] and n.status()["active_epoch"] == 1 and n.status()["leader"] == "solo"


def test_a_leader_proposes_the_mesh_attention_kind_and_its_own_only_for_a_first_plan() -> None:
    """The attention kind is the newest known plan's (here one a peer's heartbeat names, epoch 4);
    the leader's own only where the mesh has none yet; the proposal carries it and heartbeats gossip it."""
    from meshllm.control.events import (
        ActivatePlan,
        Broadcast,
        LoadPlan,
        ProfileReady,
        ProposePlan,
        Received,
        StartPlanning,
    )
    from meshllm.wire.messages import Heartbeat, Leave

    plan = {"epoch": 0, "strategy": "e2llm", "predicted": {},
            "replicas": [{"id": 0, "role": "both", "stages": [{"node": "solo", "layers": [0, 4]}]}]}
    for heard, want in ((None, "fused"), ("plain", "plain"), ("gqa", "fused")):  # a kind it cannot run: ignored
        n = ControlNode("solo", rng=np.random.default_rng(0), config=ControlConfig(discovery_grace=0.0),
                        attention="fused", attention_kinds=("fused", "plain"))
        if heard:  # a member that has gone since, whose heartbeat named its active plan's kind
            n.step(Received("peer", Heartbeat("peer", 0, None, 0, 1, 4, "", heard)))
            n.step(Received("peer", Leave("peer")))
        n.step(ProfileReady({"m": 1}))
        outs = n.tick(0.0) + n.tick(1.0)
        (start,) = [o for o in outs if isinstance(o, StartPlanning)]
        (load,) = [o for o in n.step(ProposePlan(start.round, plan)) if isinstance(o, LoadPlan)]
        (act,) = [o for o in n.step(PlanLoaded(load.epoch)) if isinstance(o, ActivatePlan)]
        assert act.plan["attention"] == want and n.attention_kind == want
        beats = [o.msg for o in n.tick(5.0) if isinstance(o, Broadcast) and isinstance(o.msg, Heartbeat)]
        assert beats and beats[0].attention == want


def _random_value(tp, rng: np.random.Generator, names: list[str]):
    import types
    import typing

    from meshllm.wire.tensor import Tensor

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return _random_value(args[int(rng.integers(len(args)))], rng, names)
    if tp is type(None):
        return None
    if tp is bool:
        return bool(rng.integers(2))
    if tp is int or getattr(tp, "__supertype__", None) is int:
        return int(rng.integers(-2, 6))
    if tp is float:
        return float(rng.normal())
    if tp is str or getattr(tp, "__supertype__", None) is str:
        return str(rng.choice(names))
    if tp is bytes:
        return bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    if tp is Tensor:
        return Tensor.from_array(np.zeros(2, np.float32))
    if origin is tuple:
        return tuple(_random_value(typing.get_args(tp)[0], rng, names) for _ in range(int(rng.integers(0, 3))))
    if origin is dict:
        return [{}, {"replicas": []}, {"replicas": [{"stages": [{"node": str(rng.choice(names))}]}]},
                {"replicas": 3}, {"workload": {"input_len": "x"}}][int(rng.integers(5))]
    raise AssertionError(tp)


@pytest.mark.parametrize("seed", range(12))
def test_random_control_traffic_never_breaks_a_node(seed: int) -> None:
    """Well-typed but arbitrary control messages from peers, interleaved with ticks and local events:
    no exception escapes, and the node keeps heartbeating and can still lead."""
    import dataclasses
    import typing

    from meshllm.control.events import EpochIdle, IslandEvolved, Received
    from meshllm.wire.messages import MESSAGE_TYPES

    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "z"]
    node = ControlNode("a", rng=np.random.default_rng(seed), priority=int(rng.integers(0, 3)),
                       validate_plan=lambda p: None)
    kinds = [cls for cls in MESSAGE_TYPES.values()]
    t = 0.0
    for _ in range(400):
        r = rng.random()
        if r < 0.1:
            t += float(rng.uniform(0, 2))
            node.tick(t)
        elif r < 0.15:
            ev = [PlanLoaded(int(rng.integers(0, 4)), bool(rng.integers(2))), EpochIdle(int(rng.integers(0, 4))),
                  ObservedRequest(int(rng.integers(0, 999)), int(rng.integers(0, 99))), OperatorReplan(),
                  IslandEvolved(int(rng.integers(0, 3)), int(rng.integers(0, 3)), ((1,),), (1.0,))]
            node.step(ev[int(rng.integers(len(ev)))])
        else:
            cls = kinds[int(rng.integers(len(kinds)))]
            hints = typing.get_type_hints(cls)
            msg = cls(**{f.name: _random_value(hints[f.name], rng, names) for f in dataclasses.fields(cls)})
            node.step(Received(str(rng.choice(names[1:])), msg))
    outs = node.tick(t + 100.0) + node.tick(t + 101.0)
    assert any(type(o).__name__ == "Broadcast" for o in outs)
    assert node.is_leader  # everyone else went silent: it leads itself
