"""The composition root of ``meshllm node``: the only place that builds concrete classes.

A ``Node`` owns one ``ControlNode`` (the sans-IO control plane) and feeds it time (``tick``) and
what arrives on the links; it performs every output the control plane returns by handing it to the
part that owns it:

- links, discovery, dialling and link probes: ``meshllm.net`` (``Transport``, ``Discovery``,
  ``net.dialer.Dialer``, ``net.peer_http.PeerHttp``);
- planning rounds, GA islands and self-profiling: ``meshllm.planning_service.PlanningService``, on
  its own executor;
- plan loading, draining and unloading: ``meshllm.serve.stages.StageHost``, which owns the runners
  and the one inference thread;
- ``/v1/mesh`` and ``/v1/profile``: ``meshllm.views``.

Frames are dispatched by plane: control frames go to the control plane; frames of another plane
go to the handler registered for it (``register_plane``; the serving layer registers ``"data"``).

The same ``Node`` runs over real I/O (aiohttp links, zeroconf, HTTP probes: ``Node.real``) or over
the in-memory network and discovery of ``meshllm.net.memory`` (``Node.in_memory``), which is how
many nodes are tested in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.control.config import ControlConfig
from meshllm.control.events import (
    ActivatePlan,
    Broadcast,
    DrainEpoch,
    EpochIdle,
    EvolveIsland,
    IslandsDone,
    LeaderChanged,
    LinkLost,
    LoadPlan,
    Log,
    MemberDied,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberSuspected,
    ObservedRequest,
    OperatorReplan,
    Output,
    PlanLoaded,
    ProfileReady,
    Received,
    Send,
    Shutdown,
    StartPlanning,
    UnloadEpoch,
)
from meshllm.control.node import ControlNode
from meshllm.control.planning import known_devices, my_ranges, network_from_links, plan_summary
from meshllm.errors import MeshError, PlanError, ProtocolError, UserError
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.net.base import DEFAULT_MESH_KEY, PROTOCOL_VERSION, Advert, Discovery, LinkIdentity, Transport
from meshllm.net.dialer import Dialer, PeerInfo
from meshllm.net.peer_http import AiohttpPeerHttp, MemoryPeerHttp, PeerHttp, mesh_token
from meshllm.obs.logs import bound, context_with
from meshllm.obs.metrics import NodeCollector, NodeEvents, metrics_handler
from meshllm.obs.progress import bar
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device, Network, Plan, Predicted, Workload
from meshllm.planner.validate import validate_plan
from meshllm.planning_service import PlanningService
from meshllm.runtime.profile import NodeProfile, available_memory_bytes, load_or_measure
from meshllm.runtime.runner import StageRunner, resident_costs
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig
from meshllm.serve.estimator import PlanEstimator
from meshllm.serve.service import Serving
from meshllm.serve.stages import StageHost
from meshllm.views import member_names, mesh_view, profile_view
from meshllm.wire.auth import mesh_id as make_mesh_id
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId
from meshllm.wire.messages import Message

log = logging.getLogger("meshllm.node")

DEFAULT_PORT = 7070

PlaneHandler = Callable[[str, Message], None]  # (peer node id, decoded message)


def default_state_dir(port: int) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshllm" / f"node-{port}"


def stable_node_id(state_dir: Path) -> str:
    """The node's id, created once and kept in the state directory across restarts."""
    path = state_dir / "node_id"
    try:
        nid = path.read_text().strip()
        if nid:
            return nid
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    nid = uuid.uuid4().hex[:16]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(nid + "\n")
    except OSError as e:
        raise UserError(f"cannot write the node id to {path}: {e.strerror}") from None
    return nid


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


class Node:
    """One mesh node. What the serving layer uses: ``node_id``, ``name``, ``manifest``, ``codec``,
    ``transport``, ``control`` (active epoch and plan, leader, membership), ``stages`` (the
    ``StageHost``), ``app`` (real nodes), ``register_plane``, ``accepts_epoch``,
    ``on_link_down_hooks``, ``on_epoch_active_hooks``, ``serving_view``, ``observe_request``."""

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
        self.control: ControlNode | None = None
        self.profile: NodeProfile | None = None
        self.profile_progress = "not started"
        self.active_epoch = 0
        self.bad_frames = 0  # frames from peers that failed to decode or validate
        self.handler_errors = 0  # bugs of ours: a plane handler raised
        self.links_dropped = 0
        self.rejected_plans = 0
        self.closed = False
        # Hooks for the serving layer (called on the event loop; a hook that raises is logged).
        self.serving_view: Callable[[], dict[str, Any]] | None = None  # its part of /v1/mesh
        self.on_link_down_hooks: list[Callable[[str], None]] = []  # (peer node id)
        self.on_epoch_active_hooks: list[Callable[[int, dict[str, Any]], None]] = []  # (epoch, plan)
        self._planes: dict[str, PlaneHandler] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dialer = Dialer(self.node_id, self.mesh_id, peer_http, opts.peers, spawn=self._spawn,
                             closed=lambda: self.closed)
        self.stages = StageHost(self.manifest, threads=opts.threads, slowdown=opts.slowdown,
                                budget_bytes=self._budget())
        self.planning = PlanningService(
            self.model_profile, name=self.name, workload=opts.workload, strategy=opts.strategy,
            objective=opts.objective, islands=opts.islands, step=self.step,
            gather_links=self.dialer.gather_links, proposed_epoch=self._proposed_epoch)
        # the data plane: registers its frame handler and hooks on this node
        estimator = PlanEstimator(self.model_profile, self._known_devices, self._known_network, opts.workload)
        self.serving = Serving(self, opts.serve, policy="start" if opts.objective == "waiting" else "completion",
                               estimator=estimator)
        # GET /metrics: the serving layer's registry, plus what the node holds and its control events
        self.metrics = self.serving.registry
        self.metrics.register(NodeCollector(self, lambda: member_names(self)))
        self.events = NodeEvents(self.metrics, self.node_id)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def real(cls, opts: NodeOptions) -> Node:
        from meshllm.net.discovery import ZeroconfDiscovery
        from meshllm.net.links import WsTransport
        from meshllm.net.server import HttpServer, make_app

        holder: dict[str, Node] = {}

        def make_transport(ident: LinkIdentity, port: int) -> Transport:
            return WsTransport(ident, name=holder["node"].name, port=port)

        disc = (ZeroconfDiscovery(list(opts.interfaces), hint_after=opts.mdns_hint_after,
                                  instance_name=opts.name or None,
                                  has_peers=lambda: bool(holder["node"].transport
                                                         and holder["node"].transport.peers()))
                if opts.mdns else None)
        node = cls(opts, transport_factory=make_transport, discovery=disc,
                   peer_http=AiohttpPeerHttp(mesh_token(opts.mesh_key, "probe")))
        holder["node"] = node
        node.server = HttpServer(make_app(node, node._handle_link), opts.host, opts.port)
        OpenAIApi(node.serving, node.manifest.name, node.manifest.model_id, api_key=opts.api_key).mount(node.server.app)
        node.server.app.router.add_get("/metrics", metrics_handler(node.metrics))
        from meshllm.web.dashboard import Dashboard  # the page at / and GET /v1/dashboard

        Dashboard(node).mount(node.server.app)
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
        self.transport.set_handlers(self._on_frame, self._on_link_up, self._on_link_down)
        self.dialer.transport = self.transport
        self.serving.start()
        seed = self.opts.seed if self.opts.seed is not None else int(self.node_id[:12], 16)
        self.control = ControlNode(self.node_id, rng=np.random.default_rng(seed), config=self.opts.control,
                                   priority=self.opts.priority, now=loop.time(), name=self.name,
                                   validate_plan=self._validate_plan, codec=self.codec)
        log.info("node %s (%s) model %s mesh %s on %s:%d", self.name, self.node_id, self.manifest.name,
                 self.mesh_id, self.opts.advertise_host, self.port)
        if self.opts.mesh_key == DEFAULT_MESH_KEY:
            log.warning("NO MESH KEY: this mesh is open — any machine on the network can join it, receive "
                        "activations and plans, and take part in elections. Give every node the same "
                        "--mesh-key-file (`meshllm keygen`) to close it.")
        if self.server is not None and not self.opts.api_key:
            log.warning("no API key: anyone who reaches port %d can send prompts (--api-key-file to require one)",
                        self.port)
        self._spawn(self._tick_loop())
        self._spawn(self.dialer.run())
        self._spawn(self._measure_profile())
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
            self._perform(self.control.step(Shutdown()))
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

    # --- driving the control plane --------------------------------------------------------------
    def step(self, event: Any) -> None:
        if self.control is None or self.closed:
            return
        self._perform(self.control.step(event))

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.opts.control.heartbeat_interval / 4
        while True:
            assert self.control is not None
            try:
                self._perform(self.control.tick(loop.time()))
            except Exception:  # a bug must not stop the heartbeat: log it and keep ticking
                log.exception("control tick failed")
            await asyncio.sleep(period)

    def register_plane(self, plane: str, handler: PlaneHandler) -> None:
        """Frames of ``plane`` (a message class's ``PLANE``) go to ``handler(peer, message)``, on the
        event loop. The control plane's frames are the node's own and cannot be taken over."""
        if plane == "control":
            raise MeshError("the control plane's frames are handled by the node itself")
        self._planes[plane] = handler

    def _on_frame(self, peer: str, data: bytes) -> None:
        with bound(node=self.name):  # delivered in the sender's context by the in-memory network
            self._dispatch(peer, data)

    def _dispatch(self, peer: str, data: bytes) -> None:
        if self.control is None or self.closed:
            return
        try:
            msg = self.codec.decode(data)
        except ProtocolError as e:
            self.bad_frames += 1
            log.warning("dropped a frame from %s: %s", peer[:12], e)
            return
        if msg.PLANE != "control":
            handler = self._planes.get(msg.PLANE)
            if handler is None:
                log.debug("%s from %s: no handler for the %s plane on this node", msg.TYPE, peer[:12], msg.PLANE)
                return
            try:
                handler(peer, msg)
            except ProtocolError as e:  # the handler found the peer's message invalid
                self.bad_frames += 1
                log.warning("dropped %s from %s: %s", msg.TYPE, peer[:12], e)
            except Exception:  # the frame decoded fine: whatever went wrong is ours
                self.handler_errors += 1
                log.exception("bug in the data-plane handler for %s from %s", msg.TYPE, peer[:12])
            return
        try:
            self._perform(self.control.step(Received(NodeId(peer), msg)))
        except Exception:  # whatever a peer sends, the node keeps running
            self.bad_frames += 1
            log.exception("handling %s from %s failed", msg.TYPE, peer[:12])

    def _perform(self, outputs: list[Output]) -> None:
        for out in outputs:
            self.events.observe(out)
            try:
                self._perform_one(out)
            except MeshError as e:
                log.warning("could not perform %s: %s", type(out).__name__, e)

    def _perform_one(self, out: Output) -> None:
        assert self.transport is not None
        if isinstance(out, Send):
            if not self.transport.send(out.to, self.codec.encode(out.msg)):
                log.debug("no link to %s for %s", out.to[:12], out.msg.TYPE)
        elif isinstance(out, Broadcast):
            data = self.codec.encode(out.msg)
            for p in self.transport.peers():
                self.transport.send(p, data)
        elif isinstance(out, Log):
            if out.message.startswith("rejected plan"):
                self.rejected_plans += 1
            log.log(logging.WARNING if out.level == "warning" else logging.INFO, "%s", out.message)
        elif isinstance(out, LeaderChanged):
            who = "this node" if out.leader == self.node_id else (out.leader or "nobody")
            log.info("leader for term %d: %s", out.term, who)
        elif isinstance(out, MemberJoined | MemberSuspected | MemberRecovered | MemberDied | MemberLeft):
            log.info("member %s %s", out.node[:12], type(out).__name__.removeprefix("Member").lower())
            if isinstance(out, MemberSuspected | MemberDied | MemberLeft):
                # silent (no heartbeats) or gone: as unusable for requests as a closed link; the
                # serving layer resumes what ran there and routes around it
                self._run_hooks(self.on_link_down_hooks, out.node)
        elif isinstance(out, StartPlanning):
            self._spawn(self.planning.plan(out))
        elif isinstance(out, EvolveIsland):
            self._spawn(self.planning.evolve(out))
        elif isinstance(out, IslandsDone):
            self._spawn(self.planning.finish(out))
        elif isinstance(out, LoadPlan):
            self._spawn(self._load(out.epoch, out.plan))
        elif isinstance(out, ActivatePlan):
            self.active_epoch = out.epoch
            log.info("plan epoch %d active: %s", out.epoch, plan_summary(out.plan, member_names(self)))
            self._run_hooks(self.on_epoch_active_hooks, out.epoch, out.plan)
        elif isinstance(out, DrainEpoch):
            # Idle when the last request of that epoch in flight here ends (at once if none is).
            epoch = out.epoch
            self.stages.drain(epoch, lambda: self.step(EpochIdle(epoch)))
        elif isinstance(out, UnloadEpoch):
            self.stages.unload(out.epoch)  # tells the serving layer's on_unload hooks first
        else:
            log.debug("unhandled output %r", out)

    def _run_hooks(self, hooks: list[Callable[..., None]], *args: Any) -> None:
        for hook in list(hooks):
            try:
                hook(*args)
            except Exception:
                self.handler_errors += 1
                log.exception("bug in a serving hook %r", hook)

    # --- profile ----------------------------------------------------------------------------------
    def _budget(self) -> int:
        return self.opts.memory_budget if self.opts.memory_budget is not None else available_memory_bytes()

    async def _measure_profile(self) -> None:
        if self.profile_fn is not None:
            prof = self.profile_fn(self.manifest, self.opts)
        else:
            shown = bar(desc=f"profile {self.manifest.name}", unit="block")  # on a terminal only

            def progress(i: int, n: int, what: str) -> None:
                shown.total = n
                shown.update(i - shown.n)
                self.profile_progress = f"{i}/{n} blocks" if i < n else "done"
                if i < n:
                    log.info("profiling %s: block %d/%d (%s)", self.manifest.name, i + 1, n, what)

            try:
                # On the planning executor: never on the inference thread.
                prof, cached = await self.planning.run(lambda: load_or_measure(
                    self.manifest, self.opts.state_dir, threads=self.opts.threads, slowdown=self.opts.slowdown,
                    memory_bytes=self._budget(), progress=progress))
            except (MeshError, OSError, RuntimeError) as e:
                # Without a profile the node stays a member but is never planned onto.
                self.profile_progress = f"failed: {e}"
                log.error("profiling failed: %s; this node will not be given blocks", e)
                return
            finally:
                shown.close()
            log.info("profile %s: decode %.2f ms/token, prefill %.3f ms/token, budget %.2f GiB",
                     "from cache" if cached else "measured", 1000 * prof.decode_s_per_token,
                     1000 * sum(prof.prefill_s_per_token), prof.memory_bytes / (1 << 30))
        self.profile = prof
        self.profile_progress = "done"
        self.step(ProfileReady(self._profile_message()))

    def _profile_message(self) -> dict[str, Any]:
        assert self.profile is not None
        d = self.profile.to_dict()
        d["name"] = self.name
        d["links"] = dict(self.link_stats)
        return d

    # --- links ------------------------------------------------------------------------------------
    def _on_link_up(self, peer: str) -> None:
        log.info("link up: %s", peer[:12])
        self.dialer.on_link_up(peer)

    def _on_link_down(self, peer: str) -> None:
        self.links_dropped += 1
        log.info("link down: %s", peer[:12])
        if not self.closed:
            self.step(LinkLost(NodeId(peer)))  # suspected now; a leader is replaced without waiting
        self._run_hooks(self.on_link_down_hooks, peer)

    @property
    def peers(self) -> dict[str, PeerInfo]:
        return self.dialer.peers

    @property
    def link_stats(self) -> dict[str, dict[str, float]]:
        return self.dialer.link_stats

    # --- planning ---------------------------------------------------------------------------------
    def _proposed_epoch(self) -> int | None:
        c = self.control
        return c.proposal.epoch if c is not None and c.proposal is not None else None

    @property
    def islands_evolved(self) -> int:
        return self.planning.islands_evolved

    @property
    def planned_over(self) -> dict[int, tuple[str, ...]]:
        """Leader: epoch -> the members it was planned over."""
        return self.planning.planned_over

    # --- plans (every node) -----------------------------------------------------------------------
    def _validate_plan(self, doc: dict[str, Any]) -> None:
        """The planner's ``validate_plan`` over the devices this node knows: its own exact budget,
        fetched profiles of peers, and members whose budget it has not seen yet (memory unchecked).
        Nodes that are not members are unknown devices, so a plan naming them fails."""
        assert self.control is not None
        known = self._known_devices()
        devices = [known.get(self.node_id) or Device(self.node_id, self._budget(), 1.0, 1.0)]
        devices += [known.get(nid) or Device(nid, 1 << 62, 1.0, 1.0) for nid in self.control.membership.members]
        validate_plan(Plan.from_dict(doc), self.model_profile, devices)

    def _known_devices(self) -> dict[str, Device]:
        """Every node whose profile this node has (its own, fetched ones, the leader's gathered ones)."""
        docs: dict[str, dict[str, Any] | None] = {self.node_id: self.profile.to_dict() if self.profile else None}
        if self.control is not None:
            for nid in self.control.membership.members:
                prof = (self.peers[nid].profile or {}).get("profile") if nid in self.peers else None
                docs[nid] = prof or self.control.profiles.get(nid)
        return known_devices(docs)

    def _known_network(self, nodes: list[str]) -> Network:
        """The links between ``nodes`` as measured by this node and reported by its peers."""
        links: dict[str, dict[str, Any]] = {self.node_id: dict(self.link_stats)}
        for nid in nodes:
            doc = self.peers[nid].profile if nid in self.peers else None
            if doc and isinstance(doc.get("links"), dict):
                links[nid] = doc["links"]
        return network_from_links(nodes, links)

    async def _load(self, epoch: int, doc: dict[str, Any]) -> None:
        try:
            ranges = my_ranges(doc, self.node_id)
        except PlanError as e:
            self.step(PlanLoaded(epoch, False, str(e)))
            return
        try:
            await self.stages.load(epoch, ranges)
        except (MeshError, OSError, RuntimeError) as e:
            log.warning("cannot load epoch %d: %s", epoch, e)
            self.step(PlanLoaded(epoch, False, str(e)))
            return
        if not self.stages.has_epoch(epoch):
            return  # unloaded while it loaded (superseded): the control plane no longer wants it
        log.info("loaded blocks %s for epoch %d", ranges or "(none)", epoch)
        self.step(PlanLoaded(epoch, True))

    # --- for the data plane -------------------------------------------------------------------------
    @property
    def app(self) -> Any:
        """The aiohttp application of a real node (None in memory): the serving layer adds its
        routes (``POST /v1/chat/completions``) here before ``start()``."""
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

    def accepts_epoch(self, epoch: int) -> bool:
        """The data-plane gate: any epoch loaded here (the entry may activate an epoch a heartbeat
        before a stage hears ``PlanActivate``), and what the control plane serves (active or
        draining)."""
        if self.stages.has_epoch(epoch):
            return True
        return self.control is not None and self.control.accepts_epoch(epoch)

    def observe_request(self, input_len: int, output_len: int) -> None:
        """A finished request's lengths: the control plane re-plans when they drift from the plan's."""
        self.step(ObservedRequest(input_len, output_len))

    # --- operator and views -----------------------------------------------------------------------
    def operator_token(self) -> str:
        return mesh_token(self.opts.mesh_key, "operator replan")

    def probe_token(self) -> str:
        return mesh_token(self.opts.mesh_key, "probe")

    def request_replan(self, reason: str) -> dict[str, Any]:
        if self.control is None:
            return {"accepted": False, "error": "node is starting"}
        leader = self.control.leader
        self.step(OperatorReplan(reason))
        return {"accepted": leader is not None, "leader": leader, "term": self.control.term,
                "epoch": self.control.active_epoch}

    def profile_view(self) -> dict[str, Any]:
        """``GET /v1/profile`` (see ``meshllm.views.profile_view``)."""
        return profile_view(self)

    def mesh_view(self) -> dict[str, Any]:
        """``GET /v1/mesh`` (see ``meshllm.views.mesh_view``)."""
        return mesh_view(self)


def with_control(opts: NodeOptions, **kw: Any) -> NodeOptions:
    """``opts`` with some control timings replaced (tests speed the clock up this way)."""
    return replace(opts, control=replace(opts.control, **kw))


__all__ = ["DEFAULT_PORT", "Node", "NodeOptions", "PeerInfo", "Predicted", "mesh_token", "stable_node_id"]
