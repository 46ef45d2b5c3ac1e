"""A data-plane test mesh: nodes reduced to what serving needs, with a plan given by the test.

Each ``DataNode`` has the seams the serving layer uses on a real node — an in-memory transport
(``meshllm.net.memory``, the real codec on every frame), a ``StageHost`` with real runners, the
plans it holds and the active epoch — but no control plane, so a test chooses the plan exactly:
prefill and decoder replicas split differently, BOTH replicas, one node holding everything. The
full node (control plane, planning, loading) is exercised by tests/test_serve_node.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from meshllm.model.manifest import Manifest
from meshllm.net.base import LinkIdentity
from meshllm.net.memory import MemoryNetwork, MemoryTransport
from meshllm.planner.types import Plan, Replica, Role, Stage
from meshllm.ports import Identity, Peers, Plans, ServingPorts
from meshllm.runtime.attention import choose, of_plan
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig
from meshllm.serve.service import Serving
from meshllm.serve.stages import StageHost
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId

# (role, [(node name, first block, end block), ...]) per replica
PlanSpec = Sequence[tuple[str, Sequence[tuple[str, int, int]]]]


# the API tests' mesh: a PREFILL replica on a, a DECODER split over b and c (c samples and serves)
API_SPEC: PlanSpec = [("prefill", [("a", 0, 8)]), ("decoder", [("b", 0, 4), ("c", 4, 8)])]


def names(spec: PlanSpec) -> list[str]:
    """The nodes a plan spec names, in order of first appearance."""
    out: list[str] = []
    for _, stages in spec:
        for n, _, _ in stages:
            if n not in out:
                out.append(n)
    return out


class _Control:
    def __init__(self) -> None:
        self.plans: dict[int, tuple[tuple[int, str], dict[str, Any]]] = {}
        self.active_epoch = 0


class DataNode:
    def __init__(self, name: str, index: int, manifest: Manifest, net: MemoryNetwork, budget: int) -> None:
        self.name = name
        self.node_id = NodeId(f"{index:02d}-{name}")
        self.manifest = manifest
        self.codec = Codec()
        self.transport = MemoryTransport(net, LinkIdentity(self.node_id, "test-mesh", b"k"), f"10.0.0.{index}:7070")
        self.transport.set_handlers(self._on_message, lambda peer: None, self._on_down)
        self.stages = StageHost(manifest, threads=1, slowdown=1.0, budget_bytes=budget)
        self.control = _Control()
        self.handlers: dict[str, Any] = {}
        self.on_link_down_hooks: list[Any] = []
        self.serving_view: Any = None
        self.observed: list[tuple[int, int]] = []
        self.serving: Serving | None = None
        self.dead = False

    def ports(self) -> ServingPorts:
        """What the serving layer takes from a node, built from this test node."""
        ident = Identity(self.node_id, self.name, self.manifest, "test-mesh", self.codec,
                         addr=lambda: self.transport.addr, mesh_keyed=False, api_key_required=False)

        async def no_fetch(host: str, port: int, path: str) -> None:
            return None

        return ServingPorts(ident,
                            Plans(control=lambda: self.control, accepts_epoch=self.stages.has_epoch,
                                  observe_request=self.observe_request),
                            Peers(transport=lambda: self.transport, known=dict, link_stats=dict,
                                  linked_addresses=dict, fetch_json=no_fetch),
                            register_plane=self.register_plane, on_link_down=self.on_link_down_hooks.append)

    def register_plane(self, plane: str, handler: Any) -> None:
        self.handlers[plane] = handler

    def observe_request(self, n_in: int, n_out: int) -> None:
        self.observed.append((n_in, n_out))

    def _on_message(self, peer: str, data: bytes) -> None:
        msg = self.codec.decode(data)
        self.handlers[msg.PLANE](peer, msg)

    def _on_down(self, peer: str) -> None:
        for h in self.on_link_down_hooks:
            h(peer)

    def hold_inference(self) -> threading.Event:
        """Occupy this node's inference thread until the returned event is set: every runner call
        waits behind it (a deterministic way to keep requests in flight)."""
        gate = threading.Event()
        self._held = asyncio.ensure_future(self.stages.call(gate.wait))
        return gate

    def kv_in_use(self) -> int:
        return sum(len(r.kv.seqs) for e in self.stages.epochs() for r in self.stages.runners(e))


class DataMesh:
    def __init__(self, manifest: Manifest, names: Sequence[str], *, config: ServeConfig | None = None,
                 budget: int = 1 << 30, attention: str = "auto") -> None:
        self.manifest = manifest
        self.net = MemoryNetwork(seed=0)
        self.config = config or ServeConfig()
        # the attention kind every plan names, chosen as `meshllm node` chooses it: plain where the
        # nodes speculate by default, else fused; every node loads the plan's kind
        self.attention = choose(attention, self.config.speculate)
        self.nodes = {n: DataNode(n, i + 1, manifest, self.net, budget) for i, n in enumerate(names)}

    def node(self, name: str) -> DataNode:
        return self.nodes[name]

    def plan(self, spec: PlanSpec, epoch: int = 1) -> dict[str, Any]:
        reps = tuple(Replica(i, Role(role), tuple(Stage(self.nodes[n].node_id, (a, b)) for n, a, b in stages))
                     for i, (role, stages) in enumerate(spec))
        return {**Plan(epoch, reps, strategy="test").to_dict(), "attention": self.attention}

    async def start(self, spec: PlanSpec, epoch: int = 1) -> None:
        for n in self.nodes.values():
            n.serving = Serving(n.ports(), n.stages, self.config)
            n.serving_view = n.serving.view
            n.serving.start()
        ids = list(self.nodes.values())
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                host, port = b.transport.addr.rsplit(":", 1)
                await a.transport.dial(host, int(port))
        await self.activate(spec, epoch)

    async def activate(self, spec: PlanSpec, epoch: int) -> None:
        doc = self.plan(spec, epoch)
        for n in self.nodes.values():
            if n.dead:
                continue
            mine = [(s["layers"][0], s["layers"][1]) for r in doc["replicas"] for s in r["stages"]
                    if s["node"] == n.node_id]
            n.control.plans[epoch] = ((1, ""), doc)
            if mine:
                await n.stages.load(epoch, mine, attention=of_plan(doc))
            n.control.active_epoch = epoch

    async def kill(self, name: str) -> None:
        """The node vanishes: its links drop (peers see them go down), it answers nothing more."""
        n = self.nodes[name]
        n.dead = True
        await n.transport.close()
        if n.serving is not None:
            await n.serving.close()

    def kv_in_use(self) -> dict[str, int]:
        return {name: n.kv_in_use() for name, n in self.nodes.items() if not n.dead}

    def held(self) -> dict[str, int]:
        return {name: n.serving.stage.held_count() for name, n in self.nodes.items()
                if not n.dead and n.serving is not None}

    async def close(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                if n.serving is not None and not n.dead:
                    await n.serving.close()
            with contextlib.suppress(Exception):
                await n.stages.close()
            with contextlib.suppress(Exception):
                await n.transport.close()
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def openai_front(manifest: Manifest, config: ServeConfig) -> AsyncIterator[tuple[DataMesh, str]]:
    """``API_SPEC``'s mesh with the OpenAI API of node c on a local HTTP server: (mesh, its root URL)."""
    mesh = DataMesh(manifest, names(API_SPEC), config=config)
    await mesh.start(API_SPEC)
    app = web.Application(client_max_size=1 << 16)
    OpenAIApi(mesh.node("c").serving, manifest.name, manifest.model_id).mount(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield mesh, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await mesh.close()
