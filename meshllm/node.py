"""The composition root of ``meshllm node``: the only place that builds concrete classes.

``Node`` builds the parts of a mesh node and wires them to each other; it decides nothing itself:

- the control plane's shell, ``meshllm.control_driver.ControlDriver``: ticks the sans-IO
  ``ControlNode``, dispatches frames by plane, and hands each output to its owner (``Owners``);
- links, discovery, dialling and link probes: ``meshllm.net`` (``Transport``, ``Discovery``,
  ``net.dialer.Dialer``, ``net.peer_http.PeerHttp``);
- planning rounds, GA islands and self-profiling: ``meshllm.planning_service.PlanningService``, on
  its own executor;
- plan validation and loading: ``meshllm.plan_loader.PlanLoader``, onto
  ``meshllm.serve.stages.StageHost``, which owns the runners and the one inference thread;
- the serving layer (``meshllm.serve.service.Serving``), ``/v1/mesh`` and ``/v1/profile``
  (``meshllm.views``), the dashboard (``meshllm.web``) and ``/metrics`` (``meshllm.obs``): they
  read the node through its ports (``Node.ports``, ``meshllm.ports.NodePorts``).

The same ``Node`` runs over real I/O (aiohttp links, zeroconf, HTTP probes: ``Node.real``) or over
the in-memory network and discovery of ``meshllm.net.memory`` (``Node.in_memory``), which is how
many nodes are tested in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshllm.control.config import ControlConfig
from meshllm.control.events import ObservedRequest, OperatorReplan
from meshllm.control.node import ControlNode
from meshllm.control_driver import ControlDriver, Owners
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.net.base import DEFAULT_MESH_KEY, PROTOCOL_VERSION, Advert, Discovery, LinkIdentity, Transport
from meshllm.net.dialer import Dialer, PeerInfo
from meshllm.net.peer_http import AiohttpPeerHttp, MemoryPeerHttp, PeerHttp, mesh_token
from meshllm.obs.logs import context_with
from meshllm.obs.metrics import NodeCollector, NodeEvents, metrics_handler
from meshllm.plan_loader import PlanLoader
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Predicted, Workload
from meshllm.planning_service import PlanningService
from meshllm.ports import Identity, NodePorts, Peers, PlaneHandler, Plans, Profiles, ServingPorts
from meshllm.runtime.attention import KINDS, choose
from meshllm.runtime.profile import NodeProfile, available_memory_bytes
from meshllm.runtime.runner import StageRunner, resident_costs
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig
from meshllm.serve.estimator import PlanEstimator
from meshllm.serve.service import Serving
from meshllm.serve.stages import StageHost
from meshllm.sim.routing import policy_for
from meshllm.state import stable_node_id
from meshllm.views import member_names, mesh_view, profile_view
from meshllm.web.dashboard import Dashboard
from meshllm.wire.auth import mesh_id as make_mesh_id
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId

log = logging.getLogger("meshllm.node")

DEFAULT_PORT = 7070


@dataclass(frozen=True, slots=True)
class NodeOptions:
    model_dir: Path
    state_dir: Path
    mesh_key: bytes = DEFAULT_MESH_KEY
    api_key: str | None = None  # clients of the OpenAI API must send it as `Authorization: Bearer KEY`
    name: str = ""
    host: str = "0.0.0.0"  # listen address
    advertise_host: str = "127.0.0.1"  # the address peers reach us at (in the mDNS advert)
    port: int = DEFAULT_PORT
    interfaces: tuple[str, ...] = ()  # IPv4 addresses mDNS runs on (empty: all)
    peers: tuple[tuple[str, int], ...] = ()  # static seeds
    memory_budget: int | None = None
    threads: int = 1
    spin: bool = False  # onnxruntime's threads wait busy between kernels (a device to itself)
    slowdown: float = 1.0
    priority: int = 0
    control: ControlConfig = field(default_factory=ControlConfig)
    workload: Workload = field(default_factory=Workload)
    strategy: str = "e2llm"  # e2llm: the GA as islands on the members; else a planner strategy, run on the leader
    objective: str = "waiting"
    islands: int = 0  # GA islands per round (0: one per member, at most 4)
    mdns: bool = True
    mdns_hint_after: float = 15.0
    verify_model: bool = True
    seed: int | None = None  # the control plane's generator (None: from the node id)
    serve: ServeConfig = field(default_factory=ServeConfig)  # the data plane's limits and timeouts
    tls_cert: str | None = None  # PEM files: the node's port speaks HTTPS (API, dashboard, wss:// links)
    tls_key: str | None = None
    # runtime.attention: the attention kind this node proposes for a mesh that has none yet (auto:
    # plain where serve.speculate is on, else fused); the plan's kind is what every node runs
    attention: str = "auto"
    profile_dir: Path | None = None  # the profile cache (None: state_dir/profiles)


class Node:
    """One mesh node: its parts, built and wired. What the serving layer uses today: ``node_id``,
    ``name``, ``manifest``, ``codec``, ``transport``, ``control``, ``stages`` (the ``StageHost``),
    ``register_plane``, ``on_link_down_hooks``, ``serving_view``, ``observe_request`` — the same
    as ``serving_ports`` (``meshllm.ports.ServingPorts``) plus the stage host."""

    def __init__(self, opts: NodeOptions, *, transport_factory: Callable[[LinkIdentity, int], Transport],
                 discovery: Discovery | None, peer_http: PeerHttp, server: Any = None,
                 profile_fn: Callable[[Manifest, NodeOptions], NodeProfile] | None = None) -> None:
        self.opts = opts
        self.manifest = load_manifest(opts.model_dir, verify=opts.verify_model)
        self.node_id = NodeId(stable_node_id(opts.state_dir))
        self.name = opts.name or self.node_id[:8]
        self.mesh_id = make_mesh_id(self.manifest.model_id, opts.mesh_key)
        # the planner charges each block's weights as they sit in memory once loaded, not as stored
        self.model_profile = ModelProfile.from_costs(resident_costs(self.manifest), self.manifest.name)
        self.codec = Codec()
        self._transport_factory = transport_factory
        self.transport: Transport | None = None
        self.discovery = discovery
        self.peer_http = peer_http
        self.server = server
        self.port = opts.port
        self.profile_fn = profile_fn
        self.closed = False
        self.serving_view: Callable[[], dict[str, Any]] | None = None  # the serving layer's part of /v1/mesh
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dialer = Dialer(self.node_id, self.mesh_id, peer_http, opts.peers, spawn=self._spawn,
                             closed=lambda: self.closed)
        # the attention kind this node would give a mesh that has none yet (and profiles itself with)
        self.attention = choose(opts.attention, opts.serve.speculate)
        self.stages = StageHost(self.manifest, threads=opts.threads, slowdown=opts.slowdown,
                                budget_bytes=self._budget(), spin=opts.spin)
        self.planning = PlanningService(
            self.model_profile, name=self.name, workload=opts.workload, strategy=opts.strategy,
            objective=opts.objective, islands=opts.islands, step=self.step,
            gather_links=self.dialer.gather_links, proposed_epoch=lambda: self.driver.proposed_epoch())
        self.plan_loader = PlanLoader(
            self.node_id, self.model_profile, self.stages, control=lambda: self.control,
            profile=lambda: self.planning.profile, peers=lambda: self.dialer.peers,
            link_stats=lambda: self.dialer.link_stats, budget=self._budget, step=self.step)
        self.driver = ControlDriver(
            self.node_id, name=self.name, codec=self.codec, config=opts.control, priority=opts.priority,
            validate_plan=self.plan_loader.validate, spawn=self._spawn, closed=lambda: self.closed,
            attention=self.attention, attention_kinds=KINDS,
            owners=Owners(plan=self.planning.plan, evolve=self.planning.evolve, finish=self.planning.finish,
                          load=self.plan_loader.load, drain=self.stages.drain, unload=self.stages.unload,
                          observe=lambda out: self.events.observe(out), names=lambda: member_names(self.ports),
                          link_up=self.dialer.on_link_up))
        self.on_link_down_hooks = self.driver.on_link_down_hooks
        self.on_epoch_active_hooks = self.driver.on_epoch_active_hooks
        self.ports = self._ports()
        # the data plane: registers its frame handler and hooks on this node
        estimator = PlanEstimator(self.model_profile, self.plan_loader.known_devices, self.plan_loader.known_network,
                                  opts.workload)
        self.serving = Serving(self.serving_ports, self.stages, opts.serve,
                               policy=policy_for(opts.objective), estimator=estimator)
        self.serving_view = self.serving.view
        # GET /metrics: the serving layer's registry, plus what the node holds and its control events
        self.metrics = self.serving.registry
        self.metrics.register(NodeCollector(self.ports, lambda: member_names(self.ports)))
        self.events = NodeEvents(self.metrics, self.node_id)

    def _ports(self) -> NodePorts:
        opts = self.opts
        identity = Identity(self.node_id, self.name, self.manifest, self.mesh_id, self.codec,
                            addr=lambda: f"{opts.advertise_host}:{self.port}",
                            mesh_keyed=opts.mesh_key != DEFAULT_MESH_KEY, api_key_required=bool(opts.api_key))
        planning = self.planning
        return NodePorts(
            identity=identity,
            plans=Plans(control=lambda: self.control, accepts_epoch=self.accepts_epoch,
                        observe_request=self.observe_request),
            peers=Peers(transport=lambda: self.transport, known=lambda: self.dialer.peers,
                        link_stats=lambda: self.dialer.link_stats, linked_addresses=self.dialer.linked_addresses,
                        fetch_json=self.peer_http.fetch_json),
            profiles=Profiles(own=lambda: planning.profile.to_dict() if planning.profile else None,
                              progress=lambda: planning.profile_progress, model=self.model_profile),
            stages=self.stages, stats=self.driver.stats,
            serving_view=lambda: self.serving_view() if self.serving_view is not None else None)

    @property
    def serving_ports(self) -> ServingPorts:
        """What the serving layer takes from this node (with ``stages``, the stage host)."""
        p = self.ports
        return ServingPorts(p.identity, p.plans, p.peers, register_plane=self.register_plane,
                            on_link_down=self.on_link_down_hooks.append)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def real(cls, opts: NodeOptions) -> Node:
        from meshllm.net.base import server_ssl
        from meshllm.net.discovery import ZeroconfDiscovery
        from meshllm.net.links import WsTransport
        from meshllm.net.peer_http import http_mac_key
        from meshllm.net.server import HttpServer, make_app

        holder: dict[str, Node] = {}
        tls = server_ssl(opts.tls_cert, opts.tls_key) if opts.tls_cert and opts.tls_key else None

        def make_transport(ident: LinkIdentity, port: int) -> Transport:
            return WsTransport(ident, name=holder["node"].name, port=port, tls=tls is not None)

        disc = (ZeroconfDiscovery(list(opts.interfaces), hint_after=opts.mdns_hint_after,
                                  instance_name=opts.name or None,
                                  has_peers=lambda: bool(holder["node"].transport
                                                         and holder["node"].transport.peers()))
                if opts.mdns else None)
        node = cls(opts, transport_factory=make_transport, discovery=disc,
                   peer_http=AiohttpPeerHttp(mesh_token(opts.mesh_key, "probe"), http_mac_key(opts.mesh_key),
                                             tls=tls is not None))
        holder["node"] = node
        node.server = HttpServer(make_app(node, node._handle_link, http_mac_key(opts.mesh_key)), opts.host,
                                 opts.port, ssl_context=tls)
        OpenAIApi(node.serving, node.manifest.name, node.manifest.model_id, api_key=opts.api_key).mount(node.server.app)
        node.server.app.router.add_get("/metrics", metrics_handler(node.metrics))
        Dashboard(node.ports, node.serving).mount(node.server.app)  # the page at / and GET /v1/dashboard
        return node

    async def _handle_link(self, request: Any) -> Any:
        from aiohttp import web

        from meshllm.net.links import WsTransport

        if not isinstance(self.transport, WsTransport) or self.closed:
            raise web.HTTPServiceUnavailable(text="node is starting or stopping")
        return await self.transport.handle(request)

    @classmethod
    def in_memory(cls, opts: NodeOptions, net: Any, hub: Any, registry: dict[tuple[str, int], Node],
                  profile_fn: Callable[[Manifest, NodeOptions], NodeProfile] | None = None) -> Node:
        from meshllm.net.memory import MemoryDiscovery, MemoryTransport

        def make_transport(ident: LinkIdentity, port: int) -> Transport:
            return MemoryTransport(net, ident, f"{opts.advertise_host}:{port}")

        node = cls(opts, transport_factory=make_transport, discovery=MemoryDiscovery(hub),
                   peer_http=MemoryPeerHttp(registry), profile_fn=profile_fn)
        registry[(opts.advertise_host, opts.port)] = node
        return node

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.server is not None:
            self.port = await self.server.start()
        ident = LinkIdentity(self.node_id, self.mesh_id, self.opts.mesh_key)
        self.transport = self._transport_factory(ident, self.port)
        self.transport.set_handlers(self.driver.on_frame, self.driver.link_up, self.driver.link_down)
        self.dialer.transport = self.transport
        self.serving.start()
        seed = self.opts.seed if self.opts.seed is not None else int(self.node_id[:12], 16)
        self.driver.start(self.transport, now=loop.time(), seed=seed)
        log.info("node %s (%s) model %s mesh %s on %s:%d", self.name, self.node_id, self.manifest.name,
                 self.mesh_id, self.opts.advertise_host, self.port)
        if self.opts.mesh_key == DEFAULT_MESH_KEY:
            log.warning("NO MESH KEY: this mesh is open — any machine on the network can join it, receive "
                        "activations and plans, and take part in elections, and link frames (prompts "
                        "included) travel unencrypted. Give every node the same --mesh-key-file "
                        "(`meshllm keygen`) to close it.")
        if self.server is not None and not self.opts.api_key:
            log.warning("no API key: anyone who reaches port %d can send prompts (--api-key-file to require one)",
                        self.port)
        self._spawn(self.driver.run())
        self._spawn(self.dialer.run())
        given = self.profile_fn
        self._spawn(self.planning.self_profile(
            self.manifest, self.opts.state_dir, threads=self.opts.threads, slowdown=self.opts.slowdown,
            memory_bytes=self._budget(), links=lambda: self.dialer.link_stats, attention=self.attention,
            cache_dir=self.opts.profile_dir,
            given=(lambda: given(self.manifest, self.opts)) if given is not None else None))
        if self.discovery is not None:
            ad = Advert(self.node_id, self.opts.advertise_host, self.port, self.mesh_id, PROTOCOL_VERSION)
            try:
                await self.discovery.start(ad, self.dialer.on_found, self.dialer.on_lost)
            except OSError as e:
                # A host without multicast still works with static peers.
                log.warning("mDNS unavailable (%s); only --peer seeds will be contacted", e)
                self.discovery = None

    async def stop(self) -> None:
        """Graceful leave: announce it, unregister from mDNS, close the links."""
        if self.closed:
            return
        self.closed = True
        if self.control is not None and self.transport is not None:
            self.driver.shutdown()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0.05)  # let the writers flush the Leave frames
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.discovery is not None:
            await self.discovery.close()
        if self.transport is not None:
            await self.transport.close()
        await self.peer_http.close()
        if self.server is not None:
            await self.server.close()
        await self.serving.close()
        self.planning.close()
        await self.stages.close()

    async def kill(self) -> None:
        """Vanish without a goodbye (tests: a crash)."""
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        if self.transport is not None:
            await self.transport.close()
        if self.discovery is not None and hasattr(self.discovery, "hub"):
            with contextlib.suppress(ValueError):
                self.discovery.hub.members.remove(self.discovery)
        await self.serving.close()
        self.planning.close()
        await self.stages.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        # the node's tasks log as this node (several nodes may share a process)
        t = asyncio.get_running_loop().create_task(coro, context=context_with(node=self.name))
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None and not self.closed:
            log.error("node task failed: %r", t.exception(), exc_info=t.exception())

    def _budget(self) -> int:
        return self.opts.memory_budget if self.opts.memory_budget is not None else available_memory_bytes()

    # --- the node's seams (each one line into the part that owns it) ----------------------------------
    def step(self, event: Any) -> None:
        """Feed an event to the control plane (and perform what it answers)."""
        self.driver.step(event)

    def register_plane(self, plane: str, handler: PlaneHandler) -> None:
        """Frames of ``plane`` go to ``handler(peer, message)`` (see ``ControlDriver.register_plane``)."""
        self.driver.register_plane(plane, handler)

    def accepts_epoch(self, epoch: int) -> bool:
        """The data-plane gate (see ``PlanLoader.accepts_epoch``)."""
        return self.plan_loader.accepts_epoch(epoch)

    def observe_request(self, input_len: int, output_len: int) -> None:
        """A finished request's lengths: the control plane re-plans when they drift from the plan's."""
        self.step(ObservedRequest(input_len, output_len))

    def request_replan(self, reason: str) -> dict[str, Any]:
        c = self.control
        if c is None:
            return {"accepted": False, "error": "node is starting"}
        leader = c.leader
        self.step(OperatorReplan(reason))
        return {"accepted": leader is not None, "leader": leader, "term": c.term, "epoch": c.active_epoch}

    def operator_token(self) -> str:
        return mesh_token(self.opts.mesh_key, "operator replan")

    def probe_token(self) -> str:
        return mesh_token(self.opts.mesh_key, "probe")

    def profile_view(self) -> dict[str, Any]:
        """``GET /v1/profile`` (see ``meshllm.views.profile_view``)."""
        return profile_view(self.ports)

    def mesh_view(self) -> dict[str, Any]:
        """``GET /v1/mesh`` (see ``meshllm.views.mesh_view``)."""
        return mesh_view(self.ports)

    # --- read-only state of the parts (for tests and tools) -----------------------------------------
    @property
    def control(self) -> ControlNode | None:
        return self.driver.control

    @property
    def active_epoch(self) -> int:
        return self.driver.active_epoch

    @property
    def bad_frames(self) -> int:
        return self.driver.bad_frames

    @property
    def handler_errors(self) -> int:
        return self.driver.handler_errors

    @property
    def rejected_plans(self) -> int:
        return self.driver.rejected_plans

    @property
    def links_dropped(self) -> int:
        return self.driver.links_dropped

    @property
    def profile(self) -> NodeProfile | None:
        return self.planning.profile

    @property
    def peers(self) -> dict[str, PeerInfo]:
        return self.dialer.peers

    @property
    def islands_evolved(self) -> int:
        return self.planning.islands_evolved

    @property
    def planned_over(self) -> dict[int, tuple[str, ...]]:
        """Leader: epoch -> the members it was planned over."""
        return self.planning.planned_over

    @property
    def app(self) -> Any:
        """The aiohttp application of a real node (None in memory): routes go here before ``start()``."""
        return getattr(self.server, "app", None)

    def runners_for(self, epoch: int) -> list[StageRunner]:
        """This node's loaded stages for ``epoch`` (empty when it holds none of that plan)."""
        return self.stages.runners(epoch)

    @property
    def runners(self) -> dict[int, list[StageRunner]]:
        """Epoch -> this node's stage runners (a snapshot of ``stages``)."""
        return {e: self.stages.runners(e) for e in self.stages.epochs()}

    @property
    def ranges(self) -> dict[int, list[tuple[int, int]]]:
        """Epoch -> this node's block ranges (a snapshot of ``stages``)."""
        return {e: self.stages.ranges(e) for e in self.stages.epochs()}


def with_control(opts: NodeOptions, **kw: Any) -> NodeOptions:
    """``opts`` with some control timings replaced (tests speed the clock up this way)."""
    return replace(opts, control=replace(opts.control, **kw))


__all__ = ["DEFAULT_PORT", "Node", "NodeOptions", "PeerInfo", "Predicted", "mesh_token"]
