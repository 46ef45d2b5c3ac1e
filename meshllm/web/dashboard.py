"""The dashboard's data and routes.

``Dashboard(ports, serving)`` reads a node through its ports (``meshllm.ports.NodePorts``), hears
every request the node's entry finishes (``Entry.finished_hooks``) and answers, read-only and without the API key (like ``/v1/mesh``):

- ``GET /``                   the page (``static/index.html``; ``/static/*`` its script and style)
- ``GET /v1/dashboard``       the mesh for the page: nodes (device profile, memory used and budget,
                              liveness, the leader), measured links, the plan (epoch, strategy, the
                              re-plan's reason, predictions) and each replica with its stages and its
                              live figures measured beside the planner's predictions
- ``GET /v1/dashboard/node``  this node's own part (memory in use, requests held, its links, its
                              entry's figures as sums and counts): what a node's dashboard fetches
                              from the other members

Each entry measures the requests that came in through it, over its last ``window`` completed
requests; a dashboard adds up the figures of every member that answers (sums and counts, so the
means are over all their requests). The decoders' load (requests decoding, batch limit, free KV)
is what each decoder replica reports to every entry. Predictions are the planner's: the plan's
queueing estimate again for the traffic the entries measured (arrival rate, mean prompt and answer
lengths), and, per request, the simulator's estimates for the replica that served it
(``PlanEstimator``), averaged over the same requests. ``compare.py`` judges each pair and says
which estimate is off, and by how much, where they differ by more than 20%.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from meshllm.errors import PlanError
from meshllm.net.base import split_host_port
from meshllm.planner.types import Plan
from meshllm.ports import NodePorts
from meshllm.serve.entry import Finished
from meshllm.serve.request import Status
from meshllm.serve.service import Serving
from meshllm.views import mesh_view
from meshllm.web import compare

log = logging.getLogger("meshllm.web")

STATIC = Path(__file__).resolve().parent / "static"
WINDOW = 64  # finished requests kept per replica (and for the plan's figures)
RATE_WINDOW_S = 60.0  # tokens per second over the requests that ended this recently
PEER_TIMEOUT_S = 1.0  # a member that does not answer in time shows its planned memory
PEER_FRESH_S = 1.0  # a member's answer is reused for this long (several pages may poll)

# "host:port" -> that member's /v1/dashboard/node, or None when it does not answer
PeerFetch = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class Sample:
    """One completed request as the dashboard keeps it: measured times beside the predictions for
    the replicas that served it (None where a figure does not apply or is unknown)."""

    epoch: int
    t_start: float
    t_end: float
    prompt_tokens: int
    tokens: int
    wait_s: float | None  # arrival -> prompt sent to the prefill replica
    ttft_s: float | None  # arrival -> first token
    prefill_s: float | None  # prompt sent -> first token (prefill and hand-off)
    t_first: float | None
    decode_tps: float | None  # tokens after the first per second, this request alone
    predicted_prefill_s: float | None
    predicted_tps: float | None


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


PREFILL_FIELDS = ("wait_s", "ttft_s", "prefill_s", "predicted_prefill_s")
DECODE_FIELDS = ("decode_tps", "predicted_tps")
PLAN_FIELDS = ("wait_s", "ttft_s", "prompt_tokens", "tokens")
KEEP_EPOCHS = 4  # per-replica figures kept for the latest epochs only


def _sums(samples: list[Sample], fields: tuple[str, ...]) -> dict[str, list[float]]:
    """field -> [sum, count] over the samples where it is known (members' sums add up)."""
    out: dict[str, list[float]] = {}
    for f in fields:
        vals = [v for s in samples if (v := _finite(getattr(s, f))) is not None]
        out[f] = [sum(vals), len(vals)]
    return out


def _add(into: dict[str, Any], doc: dict[str, Any]) -> None:
    """Add a summary's counts, [sum, count] pairs and rates into ``into`` (in place)."""
    for k, v in doc.items():
        if isinstance(v, list) and len(v) == 2:
            cur = into.setdefault(k, [0.0, 0])
            cur[0] += float(v[0])
            cur[1] += int(v[1])
        elif isinstance(v, int | float) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v
        elif isinstance(v, dict):
            _add(into.setdefault(k, {}), v)


def _avg(pair: Any) -> float | None:
    return float(pair[0]) / pair[1] if isinstance(pair, list) and len(pair) == 2 and pair[1] else None


def _arrival_rate(samples: list[Sample]) -> float | None:
    """Requests per second arriving at this entry over these requests: (n - 1) over the time from
    the first arrival to the last (the entries' rates add up to the mesh's)."""
    if len(samples) < 2:
        return None
    t = [s.t_start for s in samples]
    span = max(t) - min(t)
    return (len(t) - 1) / span if span > 0 else None


class Dashboard:
    def __init__(self, ports: NodePorts, serving: Serving, *, fetch_peer: PeerFetch | None = None,
                 window: int = WINDOW, clock: Callable[[], float] | None = None) -> None:
        self.ports = ports
        self.serving = serving
        self.window = window
        self.fetch_peer = fetch_peer
        self._clock = clock
        self.by_prefill: dict[tuple[int, int], deque[Sample]] = {}
        self.by_decode: dict[tuple[int, int], deque[Sample]] = {}
        self.recent: deque[Sample] = deque(maxlen=window)
        self.outcomes: Counter[str] = Counter()
        self._peers: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.serving.entry.finished_hooks.append(self.record)

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # --- what the entry tells us ------------------------------------------------------------------
    def record(self, f: Finished) -> None:
        self.outcomes[f.outcome] += 1
        if f.outcome != "completed":
            return
        got = self._estimates(f.epoch)
        pred_prefill = pred_tps = None
        if got is not None:
            routes, est = got
        if got is not None and f.prefill >= 0:
            pred_prefill = _finite(est.prefill_s(routes, f.prefill, f.prompt_tokens))
        if got is not None and f.decode >= 0:
            load = self.serving.router.loads.get((f.epoch, f.decode))
            # at this request's own context: its prompt and half its answer
            step = est.decode_s(routes, f.decode, max(1, load.decoding if load is not None else 1),
                                f.prompt_tokens + f.tokens / 2)
            # the tokens after the first, and the KV hand-off the second one waits for
            after = f.tokens - 1
            hand = est.handoff_s(routes, f.prefill, f.decode, f.prompt_tokens) if f.prefill >= 0 and after > 0 else 0.0
            pred_tps = (after / (hand + after * step) if after > 0 else 1.0 / step) if step and step > 0 else None
        tps = None
        if f.t_first is not None and f.tokens >= 2 and f.t_end > f.t_first:
            tps = (f.tokens - 1) / (f.t_end - f.t_first)
        s = Sample(f.epoch, f.t_start, f.t_end, f.prompt_tokens, f.tokens,
                   f.t_sent - f.t_start if f.t_sent is not None else None,
                   f.t_first - f.t_start if f.t_first is not None else None,
                   f.t_first - f.t_sent if f.t_first is not None and f.t_sent is not None else None,
                   f.t_first, tps, pred_prefill, pred_tps)
        self.recent.append(s)
        if f.prefill >= 0:
            self.by_prefill.setdefault((f.epoch, f.prefill), deque(maxlen=self.window)).append(s)
        if f.decode >= 0:
            self.by_decode.setdefault((f.epoch, f.decode), deque(maxlen=self.window)).append(s)
        for table in (self.by_prefill, self.by_decode):
            for key in [k for k in table if k[0] <= f.epoch - KEEP_EPOCHS]:
                del table[key]

    def summary(self) -> dict[str, Any]:
        """This entry's figures as counts and [sum, count] pairs, keyed ``"epoch:replica"``: what
        a dashboard adds up over the members."""
        reps: dict[str, dict[str, Any]] = {}
        for (e, rid), dq in self.by_prefill.items():
            reps.setdefault(f"{e}:{rid}", {})["prefill"] = {"n": len(dq), **_sums(list(dq), PREFILL_FIELDS)}
        for (e, rid), dq in self.by_decode.items():
            rate = self._rate(list(dq))
            reps.setdefault(f"{e}:{rid}", {})["decode"] = {"n": len(dq), **_sums(list(dq), DECODE_FIELDS),
                                                           **({"rate": rate} if rate is not None else {})}
        for q in list(self.serving.entry.requests.values()):
            if q.status in (Status.WAITING, Status.RESERVING):
                continue  # waiting for a replica: counted as the entry's
            # before its first token a request is the prefill replica's, after it the decoder's
            rid, key = (q.prefill, "prefilling") if q.t_first is None else (q.decode, "streaming")
            box = reps.setdefault(f"{q.epoch}:{rid}", {}).setdefault("live", {})
            box[key] = box.get(key, 0) + 1
        plans: dict[str, dict[str, Any]] = {}
        for e in sorted({s.epoch for s in self.recent}):
            recent = [s for s in self.recent if s.epoch == e]
            rate, arrivals = self._rate(recent), _arrival_rate(recent)
            plans[str(e)] = {"n": len(recent), **_sums(recent, PLAN_FIELDS), **({"rate": rate} if rate is not None else {}),
                             **({"arrival_rate": arrivals} if arrivals is not None else {})}
        return {"replicas": reps, "plans": plans,
                "waiting": sum(1 for q in list(self.serving.entry.requests.values())
                               if q.status in (Status.WAITING, Status.RESERVING)),
                "outcomes": dict(self.outcomes)}

    # --- this node ------------------------------------------------------------------------------------
    def local_view(self) -> dict[str, Any]:
        """``GET /v1/dashboard/node``: what only this node knows about itself."""
        stages = self.ports.stages
        weights = kv = 0
        for e in stages.epochs():
            for r in stages.runners(e):
                weights += int(getattr(r, "weight_bytes_resident", 0) or 0)
                kv += int(getattr(getattr(r, "kv", None), "reserved", 0) or 0)
        ss = self.serving.stage.stats
        rows, kept = int(ss.get("spec_rows", 0)), int(ss.get("spec_accepted", 0))
        entry = self.serving.entry
        me = self.ports.identity
        return {"id": me.node_id, "name": me.name,
                "memory": {"budget": int(stages.budget_bytes), "weights": weights, "kv": kv, "used": weights + kv},
                "held": self.serving.stage.held_count(), "entry_requests": len(entry.requests),
                # speculative decoding on the rings this node is stage 0 of: drafts kept per drafted step
                "speculation": {"steps": rows, "drafted": int(ss.get("spec_drafted", 0)), "accepted": kept,
                                "per_step": round(kept / rows, 3) if rows else None},
                "epochs": stages.epochs(), "links": dict(self.ports.peers.link_stats()),
                "measured": self.summary()}

    # --- the other members ------------------------------------------------------------------------------
    async def _peer(self, addr: str) -> dict[str, Any] | None:
        now = self.now()
        got = self._peers.get(addr)
        if got is not None and now - got[0] < PEER_FRESH_S:
            return got[1]
        doc: dict[str, Any] | None = None
        if self.fetch_peer is not None:
            try:
                doc = await asyncio.wait_for(self.fetch_peer(addr), PEER_TIMEOUT_S)
            except (TimeoutError, OSError, ValueError):
                doc = None
            if doc is not None and not (isinstance(doc.get("memory"), dict) and isinstance(doc.get("id"), str)):
                doc = None  # not a node's /v1/dashboard/node
        self._peers[addr] = (now, doc)
        return doc

    async def http_fetch(self, addr: str) -> dict[str, Any] | None:
        """The real nodes' ``PeerFetch``: ``GET http://addr/v1/dashboard/node`` through the node's
        own peer HTTP client (the one that fetches profiles)."""
        try:
            host, port = split_host_port(addr)
        except ValueError:
            return None
        return await self.ports.peers.fetch_json(host, port, "/v1/dashboard/node")

    # --- the page's document -------------------------------------------------------------------------------
    async def view(self) -> dict[str, Any]:
        """``GET /v1/dashboard``."""
        me = self.ports.identity
        mesh = mesh_view(self.ports)
        members: list[dict[str, Any]] = mesh.get("members") or []
        local = self.local_view()
        remote = [m for m in members if not m.get("self") and m.get("addr") and m.get("state") == "alive"]
        docs = await asyncio.gather(*(self._peer(m["addr"]) for m in remote))
        reported: dict[str, dict[str, Any]] = {me.node_id: local}
        for m, d in zip(remote, docs, strict=True):
            if d is not None and d.get("id") == m["id"]:
                reported[m["id"]] = d
        plan_doc = mesh.get("plan")
        plan: Plan | None = None
        if plan_doc:
            with contextlib.suppress(PlanError):
                plan = Plan.from_dict(plan_doc)
        names = {m["id"]: m.get("name") or m["id"][:8] for m in members}
        names.setdefault(me.node_id, me.name)
        if plan_doc and isinstance(plan_doc.get("reason"), str):
            # the leader writes node ids into its reasons ("<id> joined"): people read names
            reason = plan_doc["reason"]
            for nid, name in names.items():
                reason = reason.replace(nid, name)
            plan_doc = {**plan_doc, "reason": reason}
        merged: dict[str, Any] = {}
        entries = 0
        for d in reported.values():
            one: dict[str, Any] = {}
            try:  # a member's document is data from the network: add it only if all of it adds up
                _add(one, d["measured"])
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
            _add(merged, one)
            entries += 1
        return {
            "generated_at": time.time(),
            "node": mesh.get("node"), "ready": bool(mesh.get("ready")), "why_not_ready": mesh.get("why_not_ready"),
            "term": mesh.get("term"), "leader": mesh.get("leader"), "leader_name": mesh.get("leader_name"),
            "epoch": mesh.get("epoch", 0), "pending_epoch": mesh.get("pending_epoch"),
            "security": mesh.get("security"),
            "nodes": [self._node(m, plan, reported.get(m["id"])) for m in members],
            "links": self._links(members, reported),
            "plan": self._plan(plan_doc, plan, (merged.get("plans") or {}).get(str(plan.epoch)) or {} if plan else {},
                               entries),
            "replicas": [self._replica(plan, r, names, merged.get("replicas") or {}) for r in plan.replicas]
            if plan is not None else [],
            "entry": self._entry(),
            "entries": {"measured": entries, "waiting": int(merged.get("waiting", 0)),
                        "outcomes": merged.get("outcomes") or {}},
        }

    def _node(self, m: dict[str, Any], plan: Plan | None, rep: dict[str, Any] | None) -> dict[str, Any]:
        ranges = [[s.first, s.end] for r in (plan.replicas if plan else ()) for s in r.stages if s.node == m["id"]]
        prof = m.get("profile") or {}
        costs = self.ports.profiles.model.param_bytes
        planned = int(sum(float(costs[a:b].sum()) for a, b in ranges))
        if rep is not None:
            memory = {**rep["memory"], "source": "reported"}
        else:
            memory = {"budget": prof.get("memory_bytes"), "weights": planned, "kv": None, "used": planned,
                      "source": "planned"}
        dpt = prof.get("decode_s_per_token")
        return {"id": m["id"], "name": m.get("name") or m["id"][:8], "addr": m.get("addr"), "state": m.get("state"),
                "leader": bool(m.get("leader")), "self": bool(m.get("self")), "linked": bool(m.get("linked")),
                "layers": ranges,
                "device": {"threads": prof.get("threads"), "slowdown": prof.get("slowdown"),
                           "tflops": prof.get("tflops"), "mem_bw_gbs": prof.get("mem_bw_gbs"),
                           "decode_ms_per_token": 1000 * dpt if dpt else None} if prof else None,
                "memory": memory, "held": rep.get("held") if rep else None,
                "speculation": rep.get("speculation") if rep else None}

    def _links(self, members: list[dict[str, Any]], reported: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Every measured pair once (the slower direction when both ends measured it): what each
        member reports now, else what its profile said when this node fetched it."""
        measured: dict[str, dict[str, Any]] = {}
        peers = self.ports.peers.known()
        for m in members:
            nid = m["id"]
            if nid in reported:
                measured[nid] = reported[nid].get("links") or {}
            else:
                info = peers.get(nid)
                doc = getattr(info, "profile", None) or {}
                measured[nid] = doc.get("links") or {} if isinstance(doc, dict) else {}
        ids = set(measured)
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for a, lk in measured.items():
            for b, st in lk.items():
                if b not in ids or a == b or not isinstance(st, dict):
                    continue
                mbps, rtt = _finite(st.get("mbps")), _finite(st.get("rtt_ms"))
                if mbps is None:
                    continue
                key = (min(a, b), max(a, b))
                old = pairs.get(key)
                if old is None or mbps < old["mbps"]:
                    pairs[key] = {"a": key[0], "b": key[1], "mbps": mbps, "rtt_ms": rtt}
        return sorted(pairs.values(), key=lambda p: (p["a"], p["b"]))

    def _plan(self, doc: dict[str, Any] | None, plan: Plan | None, m: dict[str, Any],
              entries: int) -> dict[str, Any] | None:
        if not doc or plan is None:
            return None
        measured = {"entries": entries, "requests": int(m.get("n", 0)), "wait_s": _avg(m.get("wait_s")),
                    "ttft_s": _avg(m.get("ttft_s")), "tokens_per_s": m.get("rate"),
                    "arrival_rate": m.get("arrival_rate"), "mean_input_len": _avg(m.get("prompt_tokens")),
                    "mean_output_len": _avg(m.get("tokens"))}
        # the plan's queueing estimate again, for the traffic measured rather than the one planned
        for_traffic: dict[str, Any] = {}
        got = self._estimates(plan.epoch)
        wl = None if got is None else compare.measured_workload(
            got[1].workload, measured["arrival_rate"], measured["mean_input_len"], measured["mean_output_len"])
        if got is not None and wl is not None:
            pr = got[1].plan_figures(got[0], wl)
            if pr is not None:
                for_traffic = {"arrival_rate": wl.arrival_rate, "mean_input_len": wl.input_len.mean,
                               "mean_output_len": wl.output_len.mean, **pr.to_dict()}
        return {"epoch": plan.epoch, "strategy": plan.strategy, "reason": doc.get("reason"), "note": plan.note,
                "workload": doc.get("workload"), "predicted": plan.predicted.to_dict(),
                "predicted_for_traffic": for_traffic or None, "measured": measured,
                "compare": compare.plan_comparison(measured, for_traffic, plan.predicted.throughput_tps)}

    def _rate(self, samples: list[Sample]) -> float | None:
        """Generated tokens per second over the requests that ended in the last minute."""
        try:
            now = self.now()
        except RuntimeError:
            return None
        live = [s for s in samples if now - s.t_end <= RATE_WINDOW_S and s.t_first is not None]
        if not live:
            return None
        span = max(s.t_end for s in live) - min(s.t_first for s in live if s.t_first is not None)
        return sum(s.tokens for s in live) / span if span > 0 else None

    def _replica(self, plan: Plan, r: Any, names: dict[str, str], merged: dict[str, Any]) -> dict[str, Any]:
        epoch = plan.epoch
        role = r.role.value
        m = merged.get(f"{epoch}:{r.id}") or {}
        pre, dec, here = m.get("prefill") or {}, m.get("decode") or {}, m.get("live") or {}
        load = self.serving.router.loads.get((epoch, r.id))
        live: dict[str, Any] = {"prefilling": int(here.get("prefilling", 0)), "streaming": int(here.get("streaming", 0))}
        if role in ("decoder", "both"):
            live.update({"decoding": load.decoding if load else None, "max_batch": load.max_batch if load else None,
                         "free_kv_tokens": load.free_tokens if load and load.free_tokens >= 0 else None})
        measured: dict[str, Any] = {}
        predicted: dict[str, Any] = {}
        if role in ("prefill", "both"):
            measured.update({"prefilled": int(pre.get("n", 0)), "wait_s": _avg(pre.get("wait_s")),
                             "ttft_s": _avg(pre.get("ttft_s")), "prefill_s": _avg(pre.get("prefill_s"))})
            predicted["prefill_s"] = (_avg(pre.get("predicted_prefill_s")) if pre.get("n")
                                      else self._predict_prefill(epoch, r.id, plan))
        if role in ("decoder", "both"):
            measured.update({"decoded": int(dec.get("n", 0)), "tokens_per_s": _avg(dec.get("decode_tps")),
                             "tokens_per_s_total": dec.get("rate")})
            predicted["tokens_per_s"] = (_avg(dec.get("predicted_tps")) if dec.get("n")
                                         else self._predict_tps(epoch, r.id))
        judged: dict[str, Any] = {}
        if "prefill_s" in predicted:
            judged["prefill_s"] = compare.judge_time(measured.get("prefill_s"), predicted["prefill_s"], compare.PREFILL)
        if "tokens_per_s" in predicted:
            judged["tokens_per_s"] = compare.judge_rate(measured.get("tokens_per_s"), predicted["tokens_per_s"])
        return {"id": r.id, "role": role,
                "stages": [{"node": s.node, "name": names.get(s.node, s.node[:8]), "layers": [s.first, s.end]}
                           for s in r.stages],
                "live": live, "measured": measured, "predicted": predicted, "compare": judged}

    def _estimates(self, epoch: int) -> tuple[Any, Any] | None:
        routes = self.serving.routes_for(epoch)
        est = getattr(self.serving, "estimator", None)
        if routes is None or est is None or est.model(routes) is None:
            return None
        return routes, est

    def _predict_prefill(self, epoch: int, rid: int, plan: Plan) -> float | None:
        """Before any request: the estimate for a prompt of the plan's mean input length."""
        got = self._estimates(epoch)
        if got is None:
            return None
        routes, est = got
        return _finite(est.prefill_s(routes, rid, max(1, round(est.workload.input_len.mean))))

    def _predict_tps(self, epoch: int, rid: int) -> float | None:
        got = self._estimates(epoch)
        if got is None:
            return None
        routes, est = got
        step = est.decode_s(routes, rid, 1)
        return 1.0 / step if step and step > 0 else None

    def _entry(self) -> dict[str, Any]:
        entry = self.serving.entry
        return {**entry.view(), "outcomes": dict(self.outcomes),
                "waiting": sum(1 for q in list(entry.requests.values()) if q.prefill < 0)}

    # --- routes -------------------------------------------------------------------------------------------------
    def mount(self, app: web.Application) -> None:
        """Add the page and its JSON to a node's aiohttp app (before it starts)."""
        if self.fetch_peer is None:
            self.fetch_peer = self.http_fetch

        async def index(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

        async def dashboard(request: web.Request) -> web.Response:
            return web.json_response(await self.view(), headers={"Cache-Control": "no-store"})

        async def node(request: web.Request) -> web.Response:
            return web.json_response(self.local_view(), headers={"Cache-Control": "no-store"})

        app.router.add_get("/", index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/v1/dashboard", dashboard)
        app.router.add_get("/v1/dashboard/node", node)
