"""Three real ``meshllm node`` processes on loopback find each other by mDNS, agree on a leader and
a plan, recover when the leader is killed, and see a SIGTERM'd node leave at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from waiting import async_wait_until, wait_until

from meshllm.net.discovery import multicast_unavailable

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(multicast_unavailable() is not None, reason=str(multicast_unavailable()))]

MESHLLM = [sys.executable, "-m", "meshllm.cli"]
CONFIG = """
[control]
heartbeat_interval = 0.3
suspect_after = 3
dead_after = 6
election_timeout = 1.0
election_backoff = 0.3
discovery_grace = 1.0
replan_debounce = 0.5
profile_timeout = 10.0
island_deadline = 3.0
island_generations = 5
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mesh_view(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/mesh", timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_for(cond, what: str, deadline_s: float, procs) -> None:
    def check() -> None:
        for name, p in procs.items():
            if p.poll() is not None and name not in wait_for.expected_dead:
                raise AssertionError(f"node {name} exited with {p.returncode} while waiting for {what}")

    wait_until(cond, what, deadline_s, check=check)


wait_for.expected_dead = set()


def agreed(ports: list[int], n_members: int) -> tuple[int, str, int] | None:
    views = [mesh_view(p) for p in ports]
    if any(v is None or not v.get("ready") for v in views):
        return None
    keys = {(v["term"], v["leader"], v["epoch"]) for v in views}
    if len(keys) != 1:
        return None
    if any(sum(m["state"] == "alive" for m in v["members"]) != n_members for v in views):
        return None
    return next(iter(keys))


@pytest.fixture
def cluster(tmp_path: Path, tiny_model_dir: Path):
    key = tmp_path / "mesh.key"
    key.write_text(uuid.uuid4().hex)  # a mesh of its own: other meshes on this host are ignored
    cfg = tmp_path / "node.toml"
    cfg.write_text(CONFIG)
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(name: str, *extra: str) -> None:
        ports[name] = free_port()
        with open(tmp_path / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            procs[name] = subprocess.Popen(
                [*MESHLLM, "node", "--model", str(tiny_model_dir), "--name", name, "--host", "127.0.0.1",
                 "--port", str(ports[name]), "--state-dir", str(tmp_path / name), "--mesh-key-file", str(key),
                 "--threads", "1", "--config", str(cfg), *extra],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])

    wait_for.expected_dead = set()
    yield start, procs, ports, tmp_path
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_three_processes_find_each_other_agree_and_recover(cluster) -> None:
    start, procs, ports, tmp = cluster
    start("a")
    start("b")
    start("c", "--slowdown", "4")  # a slower machine, as the mesh will measure it
    try:
        wait_for(lambda: agreed(list(ports.values()), 3) is not None,
                 "three nodes to agree on a leader and an active plan", 90, procs)
        term, leader, epoch = agreed(list(ports.values()), 3)
        view = mesh_view(ports["a"])
        by_id = {m["id"]: m for m in view["members"]}
        assert len(by_id) == 3 and by_id[leader]["leader"]
        assert all(m["profile"] and m["profile"]["threads"] == 1 for m in view["members"])
        decode = {m["name"]: m["profile"]["decode_s_per_token"] for m in view["members"]}
        assert decode["c"] > 2 * min(decode["a"], decode["b"]), decode  # --slowdown is measured, not assumed
        assert view["plan"]["epoch"] == epoch and view["plan"]["replicas"]

        # The operator's view and a re-plan through the CLI, against a follower.
        follower = next(n for n in ports if mesh_view(ports[n])["node"]["id"] != leader)
        st = subprocess.run([*MESHLLM, "status", "--node", f"127.0.0.1:{ports[follower]}", "--wait-ready", "30"],
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and "READY" in st.stdout and "replica 0" in st.stdout, st.stdout + st.stderr
        rp = subprocess.run([*MESHLLM, "replan", "--node", f"127.0.0.1:{ports[follower]}"],
                            capture_output=True, text=True, timeout=60)
        assert rp.returncode == 0 and json.loads(rp.stdout)["leader"] == leader, rp.stdout + rp.stderr
        wait_for(lambda: (a := agreed(list(ports.values()), 3)) is not None and a[2] > epoch,
                 "a new epoch after `meshllm replan`", 60, procs)
        term, leader, epoch = agreed(list(ports.values()), 3)

        # Kill the leader outright: the other two elect a new one and run a new epoch.
        dead = next(n for n in ports if mesh_view(ports[n])["node"]["id"] == leader)
        procs[dead].kill()
        wait_for.expected_dead.add(dead)
        rest = [ports[n] for n in ports if n != dead]
        wait_for(lambda: (a := agreed(rest, 2)) is not None and a[1] != leader and a[2] > epoch,
                 "a new leader and epoch after the leader was killed", 60, procs)
        term2, leader2, _ = agreed(rest, 2)
        assert term2 > term

        # SIGTERM a node: it says goodbye, so the last one sees it leave (not merely go silent).
        left = next(n for n in ports if n != dead and mesh_view(ports[n])["node"]["id"] != leader2)
        left_id = mesh_view(ports[left])["node"]["id"]
        procs[left].send_signal(signal.SIGTERM)
        assert procs[left].wait(timeout=20) == 0
        wait_for.expected_dead.add(left)
        last = next(ports[n] for n in ports if n not in (dead, left))
        wait_for(lambda: any(m["id"] == left_id and m["state"] == "left" for m in mesh_view(last)["members"]),
                 "the SIGTERM'd node to be seen leaving", 20, procs)
    except AssertionError:
        for name in ports:
            print(f"--- {name} log ---\n" + (tmp / f"{name}.log").read_text()[-4000:])
        raise


async def test_static_peers_work_without_mdns(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Where multicast does not pass (Docker bridges, some Wi-Fi), --peer seeds are enough: two real
    nodes (aiohttp links, HTTP profile fetch and probes) in this process, mDNS off."""

    from meshllm.control.config import ControlConfig
    from meshllm.node import Node, NodeOptions

    fast = ControlConfig(heartbeat_interval=0.2, suspect_after=3, dead_after=8, election_timeout=0.6,
                         election_backoff=0.2, discovery_grace=0.4, replan_debounce=0.2, island_generations=3)
    ports = [free_port(), free_port()]
    key = uuid.uuid4().bytes
    nodes = [Node.real(NodeOptions(model_dir=tiny_model_dir, state_dir=tmp_path / f"s{i}", mesh_key=key,
                                   name=f"p{i}", host="127.0.0.1", advertise_host="127.0.0.1", port=ports[i],
                                   peers=(("127.0.0.1", ports[1 - i]),) if i == 0 else (), mdns=False,
                                   control=fast, memory_budget=1 << 30, verify_model=False))
             for i in range(2)]
    try:
        for n in nodes:
            await n.start()
        def agree() -> bool:
            vs = [n.mesh_view() for n in nodes]
            return all(v["ready"] for v in vs) and len({(v["term"], v["leader"], v["epoch"]) for v in vs}) == 1

        await async_wait_until(agree, "both nodes ready on one (term, leader, epoch)", 60)
        # The seeded side dialled; the other learned the seed's address from the link itself and
        # both fetched each other's profile and measured the link over HTTP.
        # A peer fetched while still measuring itself answers without a profile; the maintenance
        # loop fetches again, so wait for both views to be complete.
        def seen(n: Node, other: Node) -> dict:
            return next(m for m in n.mesh_view()["members"] if m["id"] == other.node_id)

        pairs = ((nodes[0], nodes[1]), (nodes[1], nodes[0]))
        await async_wait_until(
            lambda: all(seen(n, o)["profile"] is not None and seen(n, o)["link"] for n, o in pairs),
            "each node to hold the other's profile and link measurement", 20)
        for n, other in pairs:
            m = seen(n, other)
            assert m["profile"] is not None and m["link"]["mbps"] > 0 and m["link"]["rtt_ms"] >= 0
    finally:
        for n in nodes:
            await n.stop()


async def test_static_peers_are_exchanged(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Without mDNS, a node seeded with one peer learns the others from it: a and c each name only
    b, and all three link to each other and agree on one plan."""

    from meshllm.control.config import ControlConfig
    from meshllm.node import Node, NodeOptions

    fast = ControlConfig(heartbeat_interval=0.2, suspect_after=3, dead_after=8, election_timeout=0.6,
                         election_backoff=0.2, discovery_grace=0.4, replan_debounce=0.2, island_generations=3)
    ports = [free_port() for _ in range(3)]
    key = uuid.uuid4().bytes
    seeds = [(("127.0.0.1", ports[1]),), (), (("127.0.0.1", ports[1]),)]
    nodes = [Node.real(NodeOptions(model_dir=tiny_model_dir, state_dir=tmp_path / f"s{i}", mesh_key=key,
                                   name=f"x{i}", host="127.0.0.1", advertise_host="127.0.0.1", port=ports[i],
                                   peers=seeds[i], mdns=False, control=fast, memory_budget=1 << 30,
                                   verify_model=False))
             for i in range(3)]
    try:
        for n in nodes:
            await n.start()
        ids = {n.node_id for n in nodes}
        await async_wait_until(lambda: all(set(n.transport.peers()) == ids - {n.node_id} for n in nodes),
                               "every node linked to both others", 30)

        def agree() -> bool:
            vs = [n.mesh_view() for n in nodes]
            return (all(v["ready"] and len(v["members"]) == 3 for v in vs)
                    and len({(v["term"], v["leader"], v["epoch"]) for v in vs}) == 1)

        await async_wait_until(agree, "three nodes ready on one (term, leader, epoch)", 60)
        # b, the seed, tells whom it is linked to, with addresses that work
        assert set(nodes[1].profile_view()["peers"]) == {nodes[0].node_id, nodes[2].node_id}
    finally:
        for n in nodes:
            await n.stop()
