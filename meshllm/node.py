"""The composition root of ``meshllm node``: the only place that builds concrete classes.

A ``Node`` owns one ``ControlNode`` (the sans-IO control plane) and feeds it time (``tick``) and
what arrives on the links; it performs every output the control plane returns: frames to send,
profiles to measure, GA islands to evolve, plans to make, blocks to load and unload. Everything
that touches a socket, a clock, a thread or a file is here or in ``meshllm.net``.

The same ``Node`` runs over real I/O (aiohttp links, zeroconf, HTTP probes: ``Node.real``) or over
the in-memory network and discovery of ``meshllm.net.memory`` (``Node.in_memory``), which is how
many nodes are tested in one event loop.

Planning glue (leader side): profiles -> ``planner.Problem``; the GA's initial population is split
into islands that the control plane hands to members (``EvolveIsland`` on each, with a local
fallback); the merged elite is decoded into a ``Plan`` and proposed. Individuals travel as flat
integer tuples ``assign (M) + roles (M)``; the problem travels as a dict of device profiles,
network and workload (every member holds the same model, so the model profile is not sent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
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
    IslandEvolved,
    Islands,
    IslandsDone,
    LeaderChanged,
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
    PlanningFailed,
    ProfileReady,
    ProposePlan,
    Received,
    Send,
    Shutdown,
    StartPlanning,
    UnloadEpoch,
)
from meshllm.control.node import ControlNode
from meshllm.errors import DoesNotFit, MeshError, PlanError, ProtocolError, UserError
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.net.base import PROTOCOL_VERSION, Advert, Discovery, LinkIdentity, Transport
from meshllm.planner import ga
from meshllm.planner.cost import ModelProfile
from meshllm.planner.problem import Problem
from meshllm.planner.queueing import INFEASIBLE
from meshllm.planner.strategies import plan_problem
from meshllm.planner.types import Device, Link, Network, Plan, Predicted, Workload
from meshllm.planner.validate import validate_plan
from meshllm.runtime.profile import NodeProfile, available_memory_bytes, load_or_measure
from meshllm.runtime.runner import StageRunner
from meshllm.wire.auth import mesh_id as make_mesh_id
from meshllm.wire.codec import Codec
from meshllm.wire.ids import NodeId

log = logging.getLogger("meshllm.node")

DEFAULT_PORT = 7070
PROBE_SMALL = 32 * 1024  # bytes of the small and the large probe fetch
PROBE_BYTES = 544 * 1024


def mesh_token(key: bytes, purpose: str) -> str:
    """A bearer token for HTTP calls that need the mesh key (operator replan, link probes)."""
    return hmac.new(key, f"meshllm {purpose}".encode(), hashlib.sha256).hexdigest()


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
    mesh_key: bytes = b"meshllm-default-mesh-key"
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


@dataclass(slots=True)
class PeerInfo:
    addr: tuple[str, int] | None = None
    profile: dict[str, Any] | None = None  # the peer's /v1/profile document
    fetched_at: float = 0.0


# --- HTTP between peers (profile fetch and link probes), real and in-memory ---------------------

class PeerHttp:
    """Profile fetches and link probes; the real one speaks HTTP, the in-memory one looks nodes up."""

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        raise NotImplementedError

    async def probe(self, host: str, port: int) -> tuple[float, float] | None:
        """(Mb/s into this node, round-trip ms) measured with a short transfer, or None."""
        return None

    async def close(self) -> None:
        return None


class AiohttpPeerHttp(PeerHttp):
    def __init__(self, token: str) -> None:
        self.token = token
        self._session: Any = None

    def _s(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self._session

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        import aiohttp

        try:
            async with self._s().get(f"http://{host}:{port}/v1/profile") as r:
                if r.status != 200:
                    return None
                return await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def probe(self, host: str, port: int) -> tuple[float, float] | None:
        """Round trip: the fastest of three empty fetches. Bandwidth: the slope between the fastest
        small and the fastest large fetch, so the fixed per-request cost cancels out."""
        import aiohttp

        from meshllm.net.server import PROBE_TOKEN_HEADER

        hdr = {PROBE_TOKEN_HEADER: self.token}
        url = f"http://{host}:{port}/v1/probe"

        async def fetch(n: int) -> float:
            t0 = time.perf_counter()
            async with self._s().get(url, params={"bytes": str(n)}, headers=hdr) as r:
                body = await r.read()
                if r.status != 200 or len(body) != n:
                    raise aiohttp.ClientError(f"probe answered {r.status}")
            return time.perf_counter() - t0

        try:
            rtt = min([await fetch(0) for _ in range(3)])
            small = min([await fetch(PROBE_SMALL) for _ in range(3)])
            large = min([await fetch(PROBE_BYTES) for _ in range(3)])
        except (aiohttp.ClientError, TimeoutError):
            return None
        dt = max(large - small, 1e-5)
        return (PROBE_BYTES - PROBE_SMALL) * 8 / dt / 1e6, rtt * 1000

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MemoryPeerHttp(PeerHttp):
    """Looks up nodes of one in-memory mesh by address; probes are not measured (default network)."""

    def __init__(self, registry: dict[tuple[str, int], Node]) -> None:
        self.registry = registry

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        node = self.registry.get((host, port))
        return None if node is None or node.closed else node.profile_view()


# --- planning glue ------------------------------------------------------------------------------

def device_from_profile(node_id: str, prof: dict[str, Any]) -> Device:
    p = NodeProfile.from_dict(prof)
    return Device(name=node_id, memory_bytes=max(1, p.memory_bytes), tflops=max(p.tflops, 1e-9),
                  mem_bw_gbs=max(p.mem_bw_gbs, 1e-9), prefill_s_per_token=p.prefill_s_per_token,
                  decode_s_per_step=p.decode_s_per_step, measured=True)


def network_from_links(members: Sequence[str], links: dict[str, dict[str, Any]]) -> Network:
    """Pairwise links from each member's measurements of its peers (mean of both directions);
    pairs nobody measured get the median of the measured ones (or the planner's default)."""
    pairs: dict[frozenset[str], list[tuple[float, float]]] = {}
    for a in members:
        for b, m in (links.get(a) or {}).items():
            if b in members and b != a and isinstance(m, dict):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    pairs.setdefault(frozenset((a, b)), []).append((float(m["mbps"]), float(m["rtt_ms"])))
    if not pairs:
        return Network()
    out = []
    for pair, ms in sorted(pairs.items(), key=lambda kv: sorted(kv[0])):
        a, b = sorted(pair)
        out.append(Link(a, b, max(float(np.mean([x[0] for x in ms])), 1e-3),
                        max(float(np.mean([x[1] for x in ms])), 0.0)))
    return Network(default_mbps=max(float(np.median([ln.mbps for ln in out])), 1e-3),
                   default_rtt_ms=float(np.median([ln.rtt_ms or 0.0 for ln in out])), links=tuple(out))


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    return {"devices": [d.to_dict() for d in problem.devices], "network": problem.network.to_dict(),
            "workload": problem.workload.to_dict()}


def problem_from_dict(d: dict[str, Any], model: ModelProfile) -> Problem:
    try:
        return Problem(model, tuple(Device.from_dict(x) for x in d["devices"]),
                       Network.from_dict(d["network"]), Workload.from_dict(d["workload"]))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"malformed planning problem: {e!r}") from None


def island_to_individuals(isl: ga.Island, keep: int | None = None) -> tuple[tuple[tuple[int, ...], ...],
                                                                              tuple[float, ...]]:
    n = len(isl.fitness) if keep is None else min(keep, len(isl.fitness))
    inds = tuple(tuple(int(x) for x in np.concatenate([isl.assign[i], isl.roles[i]])) for i in range(n))
    return inds, tuple(float(f) for f in isl.fitness[:n])


def island_from_individuals(problem: Problem, inds: tuple[tuple[int, ...], ...]) -> ga.Island:
    m = len(problem.devices)
    pairs = []
    for ind in inds:
        if len(ind) != 2 * m:
            raise PlanError(f"individual of length {len(ind)} for {m} devices")
        a = np.asarray(ind[:m], dtype=np.int64)
        r = np.asarray(ind[m:], dtype=np.int64)
        if a.min() < 0 or a.max() > m or r.min() < 0 or r.max() > 2:
            raise PlanError("individual out of range")
        pairs.append(ga.normalise(a, r))
    if not pairs:
        raise PlanError("empty island")
    fit = np.array([ga.fitness(problem, a, r) for a, r in pairs])
    order = np.argsort(fit, kind="stable")
    return ga.Island(problem, np.stack([pairs[i][0] for i in order]), np.stack([pairs[i][1] for i in order]),
                     fit[order])


def plan_from_individual(problem: Problem, ind: tuple[int, ...], strategy: str = "e2llm") -> Plan:
    """Decode a GA individual (``assign + roles``) into a validated plan with predicted figures."""
    m = len(problem.devices)
    a, r = ga.normalise(np.asarray(ind[:m], dtype=np.int64), np.asarray(ind[m:], dtype=np.int64))
    est, stages = ga.decode(problem, a, r)
    if est.fitness >= INFEASIBLE or any(not st for _, st in stages):
        raise DoesNotFit("no feasible plan: no grouping of the members holds a full replica")
    reps = [(role, list(st)) for role, st in stages]
    plan = Plan(0, problem.to_replicas(reps), problem.estimate_stages(reps, with_saturation=True).predicted,
                strategy)
    validate_plan(plan, problem.profile, problem.devices, problem.workload)
    return plan


def plan_document(plan: Plan, workload: Workload) -> dict[str, Any]:
    """``Plan.to_dict()`` plus the lengths it was made for (the drift detector compares them)."""
    d = plan.to_dict()
    d["workload"] = {"mean_input_len": workload.input_len.mean, "mean_output_len": workload.output_len.mean}
    return d


# --- the node -----------------------------------------------------------------------------------

class Node:
    def __init__(self, opts: NodeOptions, *, transport_factory: Callable[[LinkIdentity, int], Transport],
                 discovery: Discovery | None, peer_http: PeerHttp, server: Any = None,
                 profile_fn: Callable[[Manifest, NodeOptions], NodeProfile] | None = None) -> None:
        self.opts = opts
        self.manifest = load_manifest(opts.model_dir, verify=opts.verify_model)
        self.node_id = NodeId(stable_node_id(opts.state_dir))
        self.name = opts.name or self.node_id[:8]
        self.mesh_id = make_mesh_id(self.manifest.model_id, opts.mesh_key)
        self.model_profile = ModelProfile.from_costs(self.manifest.costs, self.manifest.name)
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
        self.peers: dict[str, PeerInfo] = {}
        self.link_stats: dict[str, dict[str, float]] = {}
        self.seed_peers: dict[tuple[str, int], str | None] = {a: None for a in opts.peers}
        self.runners: dict[int, list[StageRunner]] = {}  # epoch -> this node's stage runners
        self.ranges: dict[int, list[tuple[int, int]]] = {}  # epoch -> this node's block ranges
        self.active_epoch = 0
        self.bad_frames = 0
        self.links_dropped = 0
        self.islands_evolved = 0
        self.planned_over: dict[int, tuple[str, ...]] = {}  # leader: epoch -> members planned over
        self.rejected_plans = 0
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialing: set[tuple[str, int]] = set()
        self._warned: set[tuple[str, int]] = set()  # seeds already reported as refusing us
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshllm-work")
        self._problems: dict[str, Problem] = {}
        self._islands_problem: dict[int, Problem] = {}  # round -> problem (leader)
        self._wake = asyncio.Event()

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
        seed = self.opts.seed if self.opts.seed is not None else int(self.node_id[:12], 16)
        self.control = ControlNode(self.node_id, rng=np.random.default_rng(seed), config=self.opts.control,
                                   priority=self.opts.priority, now=loop.time(), name=self.name,
                                   validate_plan=self._validate_plan, codec=self.codec)
        log.info("node %s (%s) model %s mesh %s on %s:%d", self.name, self.node_id, self.manifest.name,
                 self.mesh_id, self.opts.advertise_host, self.port)
        self._spawn(self._tick_loop())
        self._spawn(self._maintenance_loop())
        self._spawn(self._measure_profile())
        if self.discovery is not None:
            ad = Advert(self.node_id, self.opts.advertise_host, self.port, self.mesh_id, PROTOCOL_VERSION)
            try:
                await self.discovery.start(ad, self._on_found, self._on_lost)
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
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.runners.clear()

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
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
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

    def _on_frame(self, peer: str, data: bytes) -> None:
        if self.control is None or self.closed:
            return
        try:
            msg = self.codec.decode(data)
        except ProtocolError as e:
            self.bad_frames += 1
            log.warning("dropped a frame from %s: %s", peer[:12], e)
            return
        if msg.PLANE != "control":
            # The data plane (serving requests through the plan) plugs in here.
            log.debug("%s from %s: no data plane on this node yet", msg.TYPE, peer[:12])
            return
        try:
            self._perform(self.control.step(Received(NodeId(peer), msg)))
        except Exception:  # whatever a peer sends, the node keeps running
            self.bad_frames += 1
            log.exception("handling %s from %s failed", msg.TYPE, peer[:12])

    def _perform(self, outputs: list[Output]) -> None:
        for out in outputs:
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
        elif isinstance(out, StartPlanning):
            self._spawn(self._plan(out))
        elif isinstance(out, EvolveIsland):
            self._spawn(self._evolve(out))
        elif isinstance(out, IslandsDone):
            self._finish_planning(out)
        elif isinstance(out, LoadPlan):
            self._spawn(self._load(out.epoch, out.plan))
        elif isinstance(out, ActivatePlan):
            self.active_epoch = out.epoch
            log.info("plan epoch %d active: %s", out.epoch, _plan_summary(out.plan, self._names()))
        elif isinstance(out, DrainEpoch):
            # No request is ever in flight before the data plane exists: idle at once.
            loop = asyncio.get_running_loop()
            loop.call_soon(self.step, EpochIdle(out.epoch))
        elif isinstance(out, UnloadEpoch):
            if self.runners.pop(out.epoch, None) is not None:
                log.info("unloaded the blocks of epoch %d", out.epoch)
            self.ranges.pop(out.epoch, None)
        else:
            log.debug("unhandled output %r", out)

    # --- profile ----------------------------------------------------------------------------------
    def _budget(self) -> int:
        return self.opts.memory_budget if self.opts.memory_budget is not None else available_memory_bytes()

    async def _measure_profile(self) -> None:
        loop = asyncio.get_running_loop()
        if self.profile_fn is not None:
            prof = self.profile_fn(self.manifest, self.opts)
        else:
            def progress(i: int, n: int, what: str) -> None:
                self.profile_progress = f"{i}/{n} blocks" if i < n else "done"
                if i < n:
                    log.info("profiling %s: block %d/%d (%s)", self.manifest.name, i + 1, n, what)

            try:
                prof, cached = await loop.run_in_executor(self._pool, lambda: load_or_measure(
                    self.manifest, self.opts.state_dir, threads=self.opts.threads, slowdown=self.opts.slowdown,
                    memory_bytes=self._budget(), progress=progress))
            except (MeshError, OSError, RuntimeError) as e:
                # Without a profile the node stays a member but is never planned onto.
                self.profile_progress = f"failed: {e}"
                log.error("profiling failed: %s; this node will not be given blocks", e)
                return
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

    # --- discovery and links ----------------------------------------------------------------------
    def _on_found(self, ad: Advert) -> None:
        if ad.node_id == self.node_id or self.closed:
            return
        info = self.peers.setdefault(ad.node_id, PeerInfo())
        info.addr = (ad.host, ad.port)
        self._wake.set()
        # One link per pair: the smaller id dials at once; the other waits a little, so both
        # rarely dial together (and when they do, the transport keeps one link).
        delay = 0.0 if self.node_id < ad.node_id else 1.0
        self._spawn(self._dial_later(ad.node_id, ad.host, ad.port, delay))

    def _on_lost(self, node_id: str) -> None:
        info = self.peers.get(node_id)
        if info is not None:
            info.addr = None

    async def _dial_later(self, node_id: str | None, host: str, port: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self._dial(node_id, host, port)

    async def _dial(self, node_id: str | None, host: str, port: int) -> None:
        assert self.transport is not None
        if self.closed or (node_id is not None and node_id in self.transport.peers()):
            return
        if (host, port) in self._dialing:
            return
        self._dialing.add((host, port))
        try:
            peer = await self.transport.dial(host, port)
            if (host, port) in self.seed_peers:
                self.seed_peers[(host, port)] = peer
            self.peers.setdefault(peer, PeerInfo()).addr = (host, port)
        except ProtocolError as e:
            # Refused by the handshake: worth saying for a seed the operator named.
            warn = (host, port) in self.seed_peers and (host, port) not in self._warned
            self._warned.add((host, port))
            log.log(logging.WARNING if warn else logging.DEBUG, "link to %s:%d refused: %s", host, port, e)
        except (OSError, TimeoutError) as e:
            log.debug("dial %s:%d failed: %s", host, port, e)
        except Exception as e:  # aiohttp raises its own ClientError family here
            log.debug("dial %s:%d failed: %r", host, port, e)
        finally:
            self._dialing.discard((host, port))

    def _on_link_up(self, peer: str) -> None:
        log.info("link up: %s", peer[:12])
        info = self.peers.setdefault(peer, PeerInfo())
        if info.addr is None and self.transport is not None:
            # A peer that dialled us (a --peer seed elsewhere) told us its HTTP port on the link.
            info.addr = self.transport.peer_addr(peer)
        self._wake.set()

    def _on_link_down(self, peer: str) -> None:
        self.links_dropped += 1
        log.info("link down: %s", peer[:12])

    async def _maintenance_loop(self) -> None:
        """Redial seeds and known peers, fetch peers' profiles and measure links (every second)."""
        while True:
            self._wake.clear()
            assert self.transport is not None
            linked = set(self.transport.peers())
            for (host, port), nid in list(self.seed_peers.items()):
                if nid is None or nid not in linked:
                    self._spawn(self._dial(nid, host, port))
            for nid, info in list(self.peers.items()):
                if info.addr is None:
                    continue
                if nid not in linked and self.node_id < nid:
                    self._spawn(self._dial(nid, *info.addr))
                if nid in linked and (info.profile is None or info.profile.get("profile") is None):
                    self._spawn(self._refresh_peer(nid, info))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _refresh_peer(self, nid: str, info: PeerInfo) -> None:
        loop = asyncio.get_running_loop()
        if info.addr is None or loop.time() - info.fetched_at < 1.0:
            return
        info.fetched_at = loop.time()
        doc = await self.peer_http.fetch_profile(*info.addr)
        if not doc or doc.get("node_id") != nid or doc.get("mesh_id") != self.mesh_id:
            return
        info.profile = doc
        if nid not in self.link_stats:
            m = await self.peer_http.probe(*info.addr)
            if m is not None:
                self.link_stats[nid] = {"mbps": round(m[0], 3), "rtt_ms": round(m[1], 3)}
                log.info("link to %s: %.1f Mb/s, rtt %.2f ms", nid[:12], m[0], m[1])

    # --- planning (leader) ------------------------------------------------------------------------
    async def _gather_links(self, members: tuple[NodeId, ...]) -> dict[str, dict[str, Any]]:
        """Every member's own link measurements (from its /v1/profile), ours included."""
        links: dict[str, dict[str, Any]] = {self.node_id: dict(self.link_stats)}
        asked = [(n, info.addr) for n in members if n != self.node_id
                 and (info := self.peers.get(n)) is not None and info.addr is not None]

        async def one(addr: tuple[str, int]) -> dict[str, Any] | None:
            return await asyncio.wait_for(self.peer_http.fetch_profile(*addr), 3.0)

        docs = await asyncio.gather(*(one(a) for _, a in asked), return_exceptions=True)
        for (n, _), doc in zip(asked, docs, strict=True):
            if isinstance(doc, dict) and isinstance(doc.get("links"), dict):
                links[n] = doc["links"]
        return links

    async def _plan(self, sp: StartPlanning) -> None:
        loop = asyncio.get_running_loop()
        try:
            links = await self._gather_links(sp.members)
            members = [m for m in sp.members if m in sp.profiles]
            devices = tuple(device_from_profile(m, sp.profiles[m]) for m in members)
            problem = Problem(self.model_profile, devices, network_from_links(members, links), self.opts.workload)
            if self.opts.strategy != "e2llm":
                rng = np.random.default_rng(sp.round)
                plan = await loop.run_in_executor(self._pool, lambda: plan_problem(
                    self.opts.strategy, problem, self.opts.objective, rng))
                log.info("planning round %d (%s): %s over %d members", sp.round, sp.reason,
                         self.opts.strategy, len(members))
                self.step(ProposePlan(sp.round, plan_document(plan, problem.workload)))
                self._note_planned(problem)
                return
            k = self.opts.islands or min(max(len(members), 1), 4)
            rng = np.random.default_rng(sp.round)
            islands = await loop.run_in_executor(
                self._pool, lambda: [island_to_individuals(ga.initial_island(problem, rng))[0] for _ in range(k)])
        except (MeshError, KeyError, TypeError, ValueError) as e:
            self.step(PlanningFailed(sp.round, f"{type(e).__name__}: {e}"))
            return
        self._islands_problem = {sp.round: problem}
        log.info("planning round %d (%s): %d members, %d GA islands", sp.round, sp.reason, len(members), k)
        self.step(Islands(sp.round, tuple(islands), problem_to_dict(problem)))

    async def _evolve(self, ev: EvolveIsland) -> None:
        loop = asyncio.get_running_loop()

        def work() -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
            key = hashlib.sha256(json.dumps(ev.problem, sort_keys=True).encode()).hexdigest()
            problem = self._problems.get(key)
            if problem is None:
                problem = self._problems[key] = problem_from_dict(ev.problem, self.model_profile)
                while len(self._problems) > 4:
                    self._problems.pop(next(iter(self._problems)))
            isl = island_from_individuals(problem, ev.individuals)
            isl = ga.evolve(isl, ev.generations, np.random.default_rng(ev.seed))
            return island_to_individuals(isl)

        t0 = loop.time()
        try:
            inds, fit = await loop.run_in_executor(self._pool, work)
        except (MeshError, KeyError, TypeError, ValueError) as e:
            log.warning("island %d of round %d: %s", ev.island, ev.round, e)
            return
        self.islands_evolved += 1
        log.info("%s evolved GA island %d of round %d: %d generations in %.2f s, best fitness %.4g",
                 self.name, ev.island, ev.round, ev.generations, loop.time() - t0, fit[0] if fit else float("nan"))
        self.step(IslandEvolved(ev.round, ev.island, inds, fit))

    def _finish_planning(self, done: IslandsDone) -> None:
        problem = self._islands_problem.get(done.round)
        if problem is None or not done.individuals:
            self.step(PlanningFailed(done.round, "no population to decode"))
            return
        if done.fallbacks:
            log.info("planning round %d: islands %s evolved locally (members did not answer in time)",
                     done.round, list(done.fallbacks))
        try:
            plan = plan_from_individual(problem, done.individuals[0])
        except PlanError as e:
            self.step(PlanningFailed(done.round, str(e)))
            return
        self.step(ProposePlan(done.round, plan_document(plan, problem.workload)))
        self._note_planned(problem)

    def _note_planned(self, problem: Problem) -> None:
        c = self.control
        if c is not None and c.proposal is not None:
            # Which members a proposed epoch was planned over (for /v1/mesh and tests).
            self.planned_over[c.proposal.epoch] = tuple(problem.names)

    # --- plans (every node) -----------------------------------------------------------------------
    def _validate_plan(self, doc: dict[str, Any]) -> None:
        """The planner's ``validate_plan`` over the devices this node knows: its own exact budget,
        fetched profiles of peers, and members whose budget it has not seen yet (memory unchecked).
        Nodes that are not members are unknown devices, so a plan naming them fails."""
        assert self.control is not None
        devices = []
        if self.profile is not None:
            devices.append(device_from_profile(self.node_id, self.profile.to_dict()))
        else:
            devices.append(Device(self.node_id, self._budget(), 1.0, 1.0))
        for nid in self.control.membership.members:
            prof = (self.peers[nid].profile or {}).get("profile") if nid in self.peers else None
            prof = prof or self.control.profiles.get(nid)
            devices.append(device_from_profile(nid, prof) if prof else Device(nid, 1 << 62, 1.0, 1.0))
        validate_plan(Plan.from_dict(doc), self.model_profile, devices)

    def _my_ranges(self, doc: dict[str, Any]) -> list[tuple[int, int]]:
        plan = Plan.from_dict(doc)
        return [(s.first, s.end) for r in plan.replicas for s in r.stages if s.node == self.node_id]

    async def _load(self, epoch: int, doc: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            ranges = self._my_ranges(doc)
        except PlanError as e:
            self.step(PlanLoaded(epoch, False, str(e)))
            return
        # Reuse the runners of an epoch that holds the same ranges (re-plans often keep them).
        reuse = next((e for e, rg in self.ranges.items() if rg == ranges and e in self.runners), None)

        # --memory-budget bounds what this node holds: the weights of its ranges, and the KV cache
        # gets what is left (split between its ranges).
        costs = self.manifest.costs
        weights = sum(c.param_bytes for a, b in ranges for c in costs[a:b])
        kv_budget = max(0, self._budget() - weights) // max(len(ranges), 1)

        def work() -> list[StageRunner]:
            return [StageRunner(self.manifest, a, b, threads=self.opts.threads, slowdown=self.opts.slowdown,
                                kv_budget_bytes=kv_budget) for a, b in ranges]

        try:
            runners = self.runners[reuse] if reuse is not None else await loop.run_in_executor(self._pool, work)
        except (MeshError, OSError, RuntimeError) as e:
            log.warning("cannot load epoch %d: %s", epoch, e)
            self.step(PlanLoaded(epoch, False, str(e)))
            return
        self.runners[epoch] = runners
        self.ranges[epoch] = ranges
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
        return self.runners.get(epoch, [])

    def accepts_epoch(self, epoch: int) -> bool:
        return self.control is not None and self.control.accepts_epoch(epoch)

    def observe_request(self, input_len: int, output_len: int) -> None:
        """A finished request's lengths: the control plane re-plans when they drift from the plan's."""
        self.step(ObservedRequest(input_len, output_len))

    # --- views ------------------------------------------------------------------------------------
    def _names(self) -> dict[str, str]:
        names: dict[str, str] = {self.node_id: self.name}
        if self.control is not None:
            for nid, m in self.control.membership.members.items():
                if m.name:
                    names[nid] = m.name
        return names

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
        return {"node_id": self.node_id, "name": self.name, "model_id": self.manifest.model_id,
                "model": self.manifest.name, "mesh_id": self.mesh_id, "proto": PROTOCOL_VERSION,
                "addr": f"{self.opts.advertise_host}:{self.port}",
                "profile": self.profile.to_dict() if self.profile else None,
                "profile_progress": self.profile_progress, "links": dict(self.link_stats)}

    def mesh_view(self) -> dict[str, Any]:
        """``GET /v1/mesh``::

            {"node": {id, name, addr, model, model_id, mesh_id, proto, role},
             "term", "leader", "leader_name", "epoch",            # epoch: the active plan's (0: none)
             "plan": Plan.to_dict() + {"workload"} | null,        # replicas, roles, [first, end), predicted
             "members": [{id, name, addr, state (alive|suspect|dead|left), priority, epoch, self, leader,
                          linked, loaded: [first, end] | null, link: {mbps, rtt_ms} | null,
                          profile: {threads, slowdown, memory_bytes, tflops, mem_bw_gbs,
                                    prefill_s_per_token[], decode_s_per_step[], decode_s_per_token} | null}],
             "pending_epoch", "planning", "loaded_epochs", "draining",
             "ready", "why_not_ready",                            # ready: a leader, an active plan, its nodes alive
             "stats": {bad_frames, rejected_plans, links, refused_links}}
        """
        c = self.control
        if c is None:
            return {"node": {"id": self.node_id, "name": self.name}, "ready": False,
                    "why_not_ready": "starting"}
        st = c.status()
        names = self._names()
        members = []
        plan = c.active_plan
        if plan is not None:
            plan = {**plan, "epoch": st["active_epoch"]}  # the planner leaves numbering to the leader
        plan_ranges: dict[str, list[int]] = {}
        if plan:
            with contextlib.suppress(PlanError):
                for r in Plan.from_dict(plan).replicas:
                    for s in r.stages:
                        plan_ranges[s.node] = [s.first, s.end]
        for m in st["members"]:
            nid = m["node"]
            info = self.peers.get(nid)
            addr: str | None
            if nid == self.node_id:
                prof = self.profile.to_dict() if self.profile else None
                addr = f"{self.opts.advertise_host}:{self.port}"
            else:
                prof = (info.profile or {}).get("profile") if info else None
                prof = prof or c.profiles.get(nid)
                addr = f"{info.addr[0]}:{info.addr[1]}" if info and info.addr else None
            summary = None
            if prof:
                summary = {k: prof.get(k) for k in ("threads", "slowdown", "memory_bytes", "tflops",
                                                    "mem_bw_gbs", "prefill_s_per_token", "decode_s_per_step")}
                summary["decode_s_per_token"] = float(sum(prof.get("decode_s_per_step") or []))
            members.append({"id": nid, "name": names.get(nid, m.get("name") or ""), "addr": addr,
                            "state": m["state"], "priority": m["priority"], "epoch": m["epoch"],
                            "self": m["self"], "leader": nid == c.leader,
                            "linked": nid == self.node_id or (self.transport is not None
                                                              and nid in self.transport.peers()),
                            "loaded": plan_ranges.get(nid), "profile": summary,
                            "link": self.link_stats.get(nid)})
        alive = {m["id"] for m in members if m["state"] == "alive"}
        why = ""
        if c.leader is None:
            why = "no leader yet"
        elif not plan:
            why = "no active plan yet" + ("" if self.profile else f" (profiling: {self.profile_progress})")
        elif not set(plan_ranges) <= alive:
            why = "a node of the active plan is not alive"
        return {
            "node": {"id": self.node_id, "name": self.name, "addr": f"{self.opts.advertise_host}:{self.port}",
                     "model": self.manifest.name, "model_id": self.manifest.model_id, "mesh_id": self.mesh_id,
                     "proto": PROTOCOL_VERSION, "role": st["role"]},
            "term": st["term"], "leader": st["leader"], "leader_name": names.get(st["leader"] or ""),
            "epoch": st["active_epoch"], "plan": plan, "members": members,
            "pending_epoch": st["planning"]["pending_epoch"], "planning": st["planning"],
            "loaded_epochs": sorted(self.runners), "draining": st["draining"],
            "ready": not why, "why_not_ready": why or None,
            "stats": {"bad_frames": self.bad_frames, "rejected_plans": self.rejected_plans,
                      "links": len(self.transport.peers()) if self.transport else 0,
                      "refused_links": getattr(self.transport, "rejected", 0)},
        }


def _plan_summary(doc: dict[str, Any], names: dict[str, str]) -> str:
    try:
        plan = Plan.from_dict(doc)
    except PlanError:
        return "(unreadable)"
    parts = []
    for r in plan.replicas:
        st = " -> ".join(f"{names.get(s.node, s.node[:8])}[{s.first},{s.end})" for s in r.stages)
        parts.append(f"{r.role.value}: {st}")
    return "; ".join(parts)


def with_control(opts: NodeOptions, **kw: Any) -> NodeOptions:
    """``opts`` with some control timings replaced (tests speed the clock up this way)."""
    return replace(opts, control=replace(opts.control, **kw))


__all__ = ["Node", "NodeOptions", "Predicted", "mesh_token", "stable_node_id"]
