"""Many nodes in one event loop over the in-memory network and discovery: the whole node (control
plane, planning glue, plan loading with real StageRunners) without sockets.

- five nodes converge on one leader and one active plan that every node has loaded;
- killing the leader gives a new leader (higher term) and a new epoch without it;
- a node that joins triggers a re-plan;
- bad input (garbage, unknown types, oversized frames, stale terms, a plan that fails
  validation) is dropped and logged, and the node keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from waiting import async_wait_until

from meshllm.control.config import ControlConfig
from meshllm.model.manifest import Manifest
from meshllm.net.memory import MemoryDiscoveryHub, MemoryNetwork
from meshllm.node import Node, NodeOptions
from meshllm.runtime.profile import NodeProfile
from meshllm.wire.messages import PlanPropose

# Fast, but with slack for a loaded two-core machine: a member is dead after 1.6 s of silence.
FAST = ControlConfig(heartbeat_interval=0.2, suspect_after=3, dead_after=8, election_timeout=0.6,
                     election_backoff=0.1, discovery_grace=0.3, replan_debounce=0.2, profile_timeout=2.0,
                     island_deadline=2.0, island_generations=4, plan_ack_timeout=5.0, replan_backoff=0.3)


def fake_profile(speed: float) -> Callable[[Manifest, NodeOptions], NodeProfile]:
    """A profile without measuring: every node's speed is known, so plans are reproducible."""
    def make(m: Manifest, o: NodeOptions) -> NodeProfile:
        n = m.config.num_blocks
        return NodeProfile(m.model_id, 1, 1.0, o.memory_budget or (1 << 30), (1e-4 / speed,) * n,
                           (1e-3 / speed,) * n, 0.5 * speed, 20.0 * speed, "sim", 0.0)
    return make


class Mesh:
    def __init__(self, model_dir: Path, root: Path) -> None:
        self.model_dir, self.root = model_dir, root
        self.net = MemoryNetwork(seed=0)
        self.hub = MemoryDiscoveryHub()
        self.registry: dict = {}
        self.nodes: list[Node] = []

    async def add(self, i: int, **kw) -> Node:
        opts = NodeOptions(model_dir=self.model_dir, state_dir=self.root / f"n{i}", name=f"n{i}",
                           advertise_host=f"10.0.0.{i + 1}", port=7070, memory_budget=1 << 30, threads=1,
                           control=FAST, verify_model=False, seed=i, **kw)
        node = Node.in_memory(opts, self.net, self.hub, self.registry, profile_fn=fake_profile(1.0 + i / 4))
        await node.start()
        self.nodes.append(node)
        return node

    @property
    def live(self) -> list[Node]:
        return [n for n in self.nodes if not n.closed]

    async def until(self, cond: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
        def describe() -> str:
            views = [(n.name, n.control.term, n.control.leader, n.control.active_epoch)
                     for n in self.live if n.control]
            leaders = [(n.name, n.control.phase, n.control.replan_reason, n.control.round,
                        n.control.round_members, n.planned_over) for n in self.live if n.control.is_leader]
            return (f"nodes (name, term, leader, epoch): {views}; "
                    f"leader (phase, replan, round, members, planned): {leaders}")

        await async_wait_until(cond, what, deadline_s, describe=describe)

    def agreed(self) -> tuple[int, str, int] | None:
        """(term, leader, epoch) when every live node holds the same, with the plan loaded everywhere."""
        views = {(n.control.term, n.control.leader, n.control.active_epoch) for n in self.live if n.control}
        if len(views) != 1:
            return None
        term, leader, epoch = next(iter(views))
        if leader is None or epoch == 0:
            return None
        for n in self.live:
            v = n.mesh_view()
            if not v["ready"] or epoch not in n.runners:
                return None
        return term, leader, epoch

    async def close(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                await n.stop()


@pytest.fixture
async def mesh(tiny_model_dir: Path, tmp_path: Path):
    m = Mesh(tiny_model_dir, tmp_path)
    yield m
    await m.close()


def plan_nodes(n: Node) -> set[str]:
    plan = n.control.active_plan
    return {s["node"] for r in plan["replicas"] for s in r["stages"]}


async def test_five_nodes_agree_then_survive_the_leader_and_replan_on_a_join(mesh: Mesh) -> None:
    for i in range(5):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan on five nodes")
    term, leader, epoch = mesh.agreed()
    ids = {n.node_id for n in mesh.nodes}
    assert all({m["id"] for m in n.mesh_view()["members"]} == ids for n in mesh.nodes)
    # Every node runs exactly the ranges the plan gives it (the runners are really loaded).
    for n in mesh.nodes:
        mine = [tuple(s["layers"]) for r in n.control.active_plan["replicas"] for s in r["stages"]
                if s["node"] == n.node_id]
        assert n.ranges[epoch] == mine
        assert [(r.first, r.end) for r in n.runners[epoch]] == mine
    # The GA ran as islands on several members, not only on the leader.
    assert sum(n.islands_evolved > 0 for n in mesh.nodes) >= 2
    # Every replica covers the whole model.
    nb = mesh.nodes[0].manifest.config.num_blocks
    for r in mesh.nodes[0].control.active_plan["replicas"]:
        assert r["stages"][0]["layers"][0] == 0 and r["stages"][-1]["layers"][1] == nb

    # Kill the leader without a goodbye: a new leader, a higher term, a new epoch without it.
    old = next(n for n in mesh.nodes if n.node_id == leader)
    await old.kill()
    await mesh.until(lambda: (a := mesh.agreed()) is not None and a[1] != leader and a[2] > epoch
                     and leader not in plan_nodes(mesh.live[0]), "a new leader and epoch after the leader died")
    term2, leader2, epoch2 = mesh.agreed()
    assert term2 > term and leader2 != leader

    # A new node joins: the leader re-plans with it among the members, and a new epoch made by
    # that round is active everywhere, the newcomer included. (The newcomer may itself become the
    # leader, when its (priority, id) is the best: then it is the one that re-plans.)
    new = await mesh.add(7)

    def replanned_with_newcomer() -> bool:
        a = mesh.agreed()
        if a is None or a[2] <= epoch2 or new.control.active_epoch != a[2]:
            return False
        ldr = next(n for n in mesh.live if n.node_id == a[1])
        return new.node_id in ldr.planned_over.get(a[2], ())

    await mesh.until(replanned_with_newcomer, "a re-plan after a node joined")
    best = max((n.opts.priority, n.node_id) for n in mesh.live)[1]
    assert mesh.agreed()[1] == best
    assert any(m["id"] == new.node_id for m in mesh.live[0].mesh_view()["members"])


async def test_operator_replan_makes_a_new_epoch(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "agreement on three nodes")
    _, leader, epoch = mesh.agreed()
    follower = next(n for n in mesh.nodes if n.node_id != leader)
    out = follower.request_replan("operator request")
    assert out["accepted"] and out["leader"] == leader
    await mesh.until(lambda: (a := mesh.agreed()) is not None and a[2] > epoch, "a new epoch after replan")


async def test_bad_input_is_dropped_and_the_node_keeps_running(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "agreement on three nodes")
    term, leader, epoch = mesh.agreed()
    ldr = next(n for n in mesh.nodes if n.node_id == leader)
    victim, other = [n for n in mesh.nodes if n.node_id != leader]
    before = victim.bad_frames

    # Garbage, a well-formed envelope of an unknown type, a wrong protocol version.
    other.transport.send(victim.node_id, b"\xc1\x00garbage")
    other.transport.send(victim.node_id, msgpack.packb({"v": 1, "t": "no_such_type", "b": {}}))
    other.transport.send(victim.node_id, msgpack.packb({"v": 99, "t": "heartbeat", "b": {}}))
    await mesh.until(lambda: victim.bad_frames >= before + 3, "three bad frames counted")

    # A plan from a non-leader, and one with a stale term from the leader's own link: dropped.
    good = ldr.control.active_plan
    other.transport.send(victim.node_id, victim.codec.encode(PlanPropose(term, other.node_id, epoch + 50, good)))
    ldr.transport.send(victim.node_id, victim.codec.encode(PlanPropose(term - 1, leader, epoch + 51, good)))
    # A plan from the leader that fails validation (a gap in replica 0): rejected and logged.
    bad = {**good, "replicas": [{**good["replicas"][0], "stages": [
        {**good["replicas"][0]["stages"][0], "layers": [1, 2]}]}]}
    ldr.transport.send(victim.node_id, victim.codec.encode(PlanPropose(term, leader, epoch + 52, bad)))
    await mesh.until(lambda: victim.rejected_plans >= 1, "the invalid plan rejected")
    assert not {epoch + 50, epoch + 51, epoch + 52} & set(victim.control.plans)

    # Oversized frame: the link is closed (and redialled), nothing is delivered.
    dropped = victim.links_dropped
    mesh.net.endpoints[f"{victim.opts.advertise_host}:7070"].max_message = 1 << 12
    other.transport.send(victim.node_id, b"\x00" * (1 << 13))
    await mesh.until(lambda: victim.links_dropped > dropped, "the link closed")
    await mesh.until(lambda: other.node_id in victim.transport.peers(), "the link redialled")

    # Still the same mesh, still serving its plan.
    await mesh.until(lambda: mesh.agreed() is not None, "agreement still holds")
    assert mesh.agreed()[1] == leader and victim.mesh_view()["ready"]


async def test_a_leader_can_plan_with_another_strategy(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.add(i, strategy="edgeshard-latency")
    await mesh.until(lambda: mesh.agreed() is not None, "agreement on an EdgeShard plan")
    plan = mesh.nodes[0].control.active_plan
    assert plan["strategy"] == "edgeshard-latency" and len(plan["replicas"]) == 1
    assert plan["predicted"]["latency_ms_per_token"] is not None


async def test_partition_then_heal_leaves_one_leader(mesh: Mesh) -> None:
    for i in range(5):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "agreement on five nodes")
    term, leader, epoch = mesh.agreed()
    # Cut the leader and one follower off from the other three: links across the cut drop.
    minority = [leader, next(n.node_id for n in mesh.nodes if n.node_id != leader)]
    majority = [n for n in mesh.nodes if n.node_id not in minority]
    mesh.net.partition(minority, [n.node_id for n in majority])

    def majority_moved_on() -> bool:
        views = {(n.control.term, n.control.leader) for n in majority}
        return len(views) == 1 and next(iter(views))[1] not in (None, leader) and next(iter(views))[0] > term

    await mesh.until(majority_moved_on, "the majority side to elect its own leader")
    mesh.net.heal()
    await mesh.until(lambda: (a := mesh.agreed()) is not None and a[0] > term and a[2] > epoch,
                     "one leader and one plan for all five after the partition heals", 45)


async def test_lossy_slow_network_still_converges(mesh: Mesh) -> None:
    """5% of frames dropped and 20 ms added to every frame: retries and heartbeat catch-up
    still bring four nodes to one leader and one loaded plan."""
    mesh.net.drop, mesh.net.delay = 0.05, 0.02
    for i in range(4):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "agreement over a lossy network", 45)


async def test_a_leader_that_leaves_gracefully_is_replaced_before_it_could_be_declared_dead(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "agreement on three nodes")
    _, leader, epoch = mesh.agreed()
    old = next(n for n in mesh.nodes if n.node_id == leader)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await old.stop()  # announces Leave
    await mesh.until(lambda: all(n.control.leader not in (None, leader) for n in mesh.live),
                     "a new leader after a graceful leave", FAST.dead_time)
    assert loop.time() - t0 < FAST.dead_time
    assert all(n.control.membership.state(leader).value == "left" for n in mesh.live)
    await mesh.until(lambda: (a := mesh.agreed()) is not None and a[2] > epoch, "a new epoch without it")


async def test_a_leader_whose_links_close_is_replaced_before_silence_would_declare_it_dead(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "agreement on three nodes")
    term, leader, _ = mesh.agreed()
    old = next(n for n in mesh.nodes if n.node_id == leader)
    await old.kill()  # its links close, as a killed process's sockets do
    rest = [n for n in mesh.nodes if n is not old]
    # suspected at once, from the closed link alone
    assert all(n.control.membership.state(leader).value == "suspect" for n in rest)

    def new_leader_while_old_only_suspect() -> bool:
        views = {(n.control.term, n.control.leader) for n in rest}
        if len(views) != 1:
            return False
        t, ldr = next(iter(views))
        return ldr is not None and ldr != leader and t > term

    await mesh.until(new_leader_while_old_only_suspect, "a new leader")
    # elected on the closed link, not after dead_after silent heartbeats
    assert all(n.control.membership.state(leader).value == "suspect" for n in rest)


async def test_the_first_plan_chooses_the_attention_every_node_runs_through_failover_and_joins(mesh: Mesh) -> None:
    """``runtime.attention`` is chosen once for a mesh: the first leader's kind goes into its plan,
    every node builds its runners with the plan's kind whatever its own setting, and a new leader
    set otherwise (a survivor, or a newcomer that never saw a plan proposed) keeps it."""
    from meshllm.serve.config import ServeConfig

    await mesh.add(0, priority=3, attention="plain")  # the first leader: the best priority
    await mesh.add(1, priority=1, attention="fused")
    await mesh.add(2, priority=0, serve=ServeConfig(speculate=False))  # auto, no speculation: fused

    def every_node_runs(kind: str, after: int = 0) -> bool:
        a = mesh.agreed()
        if a is None or a[2] <= after:
            return False
        return all(n.control.active_plan.get("attention") == kind and n.stages.attention(a[2]) == kind
                   and all(r.one_pass == (kind == "plain") for r in n.runners[a[2]]) for n in mesh.live)

    await mesh.until(lambda: every_node_runs("plain"), "one plan naming plain attention, loaded everywhere")
    _, leader, epoch = mesh.agreed()
    assert leader == mesh.nodes[0].node_id
    await mesh.nodes[0].kill()  # the next leader is set to fused
    await mesh.until(lambda: every_node_runs("plain", epoch) and mesh.agreed()[1] == mesh.nodes[1].node_id,
                     "a new leader whose re-plan keeps plain attention")
    _, _, epoch2 = mesh.agreed()
    new = await mesh.add(7, priority=5, attention="fused")  # leads at once, knows the kind from heartbeats
    await mesh.until(lambda: every_node_runs("plain", epoch2) and mesh.agreed()[1] == new.node_id,
                     "the newcomer leads and keeps plain attention")
