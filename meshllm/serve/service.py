"""The serving layer of one node: the entry, the stage server and their messages, composed.

``Serving(ports, stages, config)`` plugs into a node through explicit ports (``meshllm.ports``:
who the node is, its plans, its peers, the data plane's frame handler and link losses) and the
stage host; the composition root builds it. It registers the data-plane frame handler, hears link
losses and epoch unloads, and sends each replica's load report. Frames for this node's own stages
or entry that it sends itself skip the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from meshllm.errors import PlanError
from meshllm.model.tokenizer import Tokenizer
from meshllm.obs.logs import bound
from meshllm.obs.metrics import RequestMetrics, ServingCollector, new_registry
from meshllm.ports import ServingPorts
from meshllm.serve.config import ServeConfig
from meshllm.serve.entry import Entry
from meshllm.serve.estimator import PlanEstimator
from meshllm.serve.messenger import Messenger
from meshllm.serve.router import Router
from meshllm.serve.routes import Routes
from meshllm.serve.stage import StageServer
from meshllm.serve.stages import StageHost
from meshllm.wire.messages import Error, LoadReport, Message, Progress, Reserved, Token

log = logging.getLogger("meshllm.serve")

_ENTRY_TYPES = (Token, Reserved, Error, LoadReport, Progress)
REPORT_CHECK_S = 0.05  # how often a replica's load is looked at for a change worth reporting


def eos_ids(manifest: Any, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The same EOS rule as ``meshllm generate``: the tokenizer's ids, else the model config's."""
    if tokenizer is not None and tokenizer.eos_token_ids:
        return tuple(tokenizer.eos_token_ids)
    return tuple(manifest.config.eos_token_ids)


class Serving:
    def __init__(self, ports: ServingPorts, stages: StageHost, config: ServeConfig | None = None, *,
                 policy: str = "completion", estimator: PlanEstimator | None = None) -> None:
        self.ports = ports
        self.stages = stages
        self.config = config or ServeConfig()
        self.estimator = estimator  # the plan's predictions per replica (None: none)
        ident = ports.identity
        self.node_id = ident.node_id
        cfg = ident.manifest.config
        self.tokenizer = Tokenizer.from_manifest(ident.manifest) if ident.manifest.tokenizer_path else None
        self.eos = eos_ids(ident.manifest, self.tokenizer)
        self._routes: dict[int, Routes] = {}
        self.name = str(ident.name or ident.node_id[:8])
        # this node's metrics (``GET /metrics``): its own registry, as several nodes may share a process
        self.registry = new_registry()
        self.metrics = RequestMetrics(self.registry)
        self.messenger = Messenger(ident.node_id, ident.codec, ports.peers.transport, self._deliver)
        self.stage = StageServer(ident.node_id, stages, self.messenger, self.routes_for, self.config,
                                 num_layers=cfg.num_layers, eos_ids=self.eos, hidden_size=cfg.hidden_size)
        self.router = Router(self.routes_for, policy=policy,
                             prefill_estimate=estimator.prefill_s if estimator is not None else None,
                             decode_estimate=estimator.decode_s if estimator is not None else None)
        self.entry = Entry(ident.node_id, self.messenger, self.config, vocab_size=cfg.vocab_size,
                           max_position=cfg.max_position, tokenizer=self.tokenizer, eos_ids=self.eos,
                           active=self.active, router=self.router, observe=ports.plans.observe_request,
                           links=self._usable_peers, metrics=self.metrics, name=self.name)
        self.registry.register(ServingCollector(self, stages))
        self._task: asyncio.Task[None] | None = None
        ports.register_plane("data", self._deliver)
        ports.on_link_down(self._link_down)
        stages.on_unload(self._unloaded)

    # --- plans ------------------------------------------------------------------------------------
    def routes_for(self, epoch: int) -> Routes | None:
        r = self._routes.get(epoch)
        if r is not None:
            return r
        c = self.ports.plans.control()
        entry = c.plans.get(epoch) if c is not None else None
        if entry is None:
            return None
        try:
            r = Routes(epoch, entry[1])
        except PlanError as e:
            log.warning("plan of epoch %d is unusable for serving: %s", epoch, e)
            return None
        self._routes[epoch] = r
        return r

    def active(self) -> tuple[int, Routes] | None:
        c = self.ports.plans.control()
        if c is None or not c.active_epoch:
            return None
        r = self.routes_for(c.active_epoch)
        return None if r is None else (c.active_epoch, r)

    def _usable_peers(self) -> list[str]:
        """Peers with a link up that the control plane does not suspect (a silent node's link may
        look up for seconds after its cable was pulled)."""
        t = self.ports.peers.transport()
        if t is None:
            return []
        c = self.ports.plans.control()
        membership = getattr(c, "membership", None)
        if membership is None:
            return list(t.peers())
        return [p for p in t.peers() if getattr(membership.state(p), "value", "alive") == "alive"]

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.stage.start()
        self._task = asyncio.ensure_future(self._report_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.stage.close()

    # --- frames -------------------------------------------------------------------------------------
    def _deliver(self, peer: str, msg: Message) -> None:
        # what this frame makes the node log is about this node, and about its request when it has one
        with bound(node=self.name, request_id=getattr(msg, "req", None)):
            if isinstance(msg, _ENTRY_TYPES):
                self.entry.handle(peer, msg)
            else:
                self.stage.handle(peer, msg)

    def _link_down(self, peer: str) -> None:
        self.entry.fail_peer(peer)
        self.stage.fail_peer(peer)

    def _unloaded(self, epoch: int) -> None:
        self.stage.fail_epoch(epoch)
        self._routes.pop(epoch, None)

    async def _report_loop(self) -> None:
        # Every load_report_s, and within REPORT_CHECK_S of a change in what the routers read
        # (requests reserved, of them decoding, the batch limit): the entries learn of another
        # entry's prompt queued at a replica within tens of milliseconds, not half a second.
        last: dict[tuple[int, int], tuple[Any, ...]] = {}
        since = 0.0
        period = self.config.load_report_s
        check = min(REPORT_CHECK_S, period)
        while True:
            await asyncio.sleep(check)
            since += check
            try:
                reports = self.stage.load_reports()
                due = since >= period
                if due:
                    since = 0.0
                keys = {(rep.epoch, rep.replica): tuple(rep.load.get(k) for k in ("decoding", "started", "max_batch"))
                        for rep in reports}
                send = [rep for rep in reports if due or last.get((rep.epoch, rep.replica)) != keys[rep.epoch, rep.replica]]
                last = keys
                t = self.ports.peers.transport()
                peers = t.peers() if t is not None else []
                for rep in send:
                    self.entry.handle(self.node_id, rep)
                    for p in peers:
                        self.messenger.send(p, rep)
            except Exception:  # the report is advisory; never let it stop
                log.exception("load report failed")

    def view(self) -> dict[str, Any]:
        return {"entry": self.entry.view(), "stage": self.stage.view()}
