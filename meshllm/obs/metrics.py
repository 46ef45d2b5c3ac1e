"""Prometheus metrics of one node, in its own ``CollectorRegistry`` (several nodes share a process in
tests, so nothing goes to the global default registry).

Two kinds:

- **at the event**: what needs the moment it happened — requests by outcome, and the histograms of
  time to first token, time per output token, waiting time and request duration
  (``RequestMetrics``, fed by the entry); re-plans by reason, elections and plan activations
  (``NodeEvents``, fed from the control plane's outputs);
- **at scrape time**: what the node already counts or holds — tokens, migrations, queue depth,
  running requests, KV bytes in use and budget, KV hand-off bytes, bytes per link, the election
  term, the plan epoch (``ServingCollector`` reads the serving layer and the stage host,
  ``NodeCollector`` the node through its ports, ``meshllm.ports.NodePorts``).

``docs/observability.md`` lists every metric. ``metrics_handler(registry)`` is ``GET /metrics``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from meshllm.ports import NodePorts, Stages

# outcome label of meshllm_requests_total
OK, CANCELLED, REJECTED, ERROR = "ok", "cancelled", "rejected", "error"
_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")

# seconds; a mesh of small devices spans milliseconds (a token on a GPU box) to minutes (a long
# prompt on a Raspberry Pi behind a queue)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def code_label(code: str | None) -> str:
    """A failure code as a label value: codes come from peers' frames too, so anything that is not a
    short snake_case word becomes ``other`` (a label's values must stay few)."""
    return code if code and _CODE.fullmatch(code) else "other"


class RequestMetrics:
    """What the entry observes as a request goes: its outcome, and how long each phase took."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.requests = Counter(
            "meshllm_requests", "Requests this node accepted or refused as their entry, by outcome (ok, cancelled, "
            "rejected, error) and code (finish reason, refusal or failure code)", ["outcome", "code"], registry=r)
        self.ttft = Histogram("meshllm_time_to_first_token_seconds",
                              "From acceptance at the entry to the first token streamed", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("meshllm_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per finished request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.waiting = Histogram("meshllm_request_waiting_seconds",
                                 "From acceptance to the start of the prompt's prefill: the entry's queue, then the "
                                 "prefill replica's first stage's (as that stage reports it)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("meshllm_request_duration_seconds",
                                  "From acceptance to the last token, per request that finished",
                                  buckets=LATENCY_BUCKETS, registry=r)

    def rejected(self, code: str) -> None:
        """Refused before any work: queue_full (429), unavailable (503), invalid or context_length (400)."""
        self.requests.labels(REJECTED, code_label(code)).inc()

    def waited(self, seconds: float) -> None:
        self.waiting.observe(max(0.0, seconds))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(max(0.0, seconds))

    def finished(self, reason: str, *, duration_s: float, first_s: float | None, tokens: int) -> None:
        """Ended with a finish reason (stop, length) after ``tokens`` tokens."""
        self.requests.labels(OK, code_label(reason)).inc()
        self.duration.observe(max(0.0, duration_s))
        if first_s is not None and tokens > 1:
            self.tpot.observe(max(0.0, (duration_s - first_s) / (tokens - 1)))

    def failed(self, code: str) -> None:
        self.requests.labels(ERROR, code_label(code)).inc()

    def cancelled(self) -> None:
        """The client went away (or closed the stream) before the end."""
        self.requests.labels(CANCELLED, "client").inc()


# --- re-plans and elections, from the control plane's outputs -------------------------------------

# words in a re-plan reason (control/node.py writes them for people) -> a label with few values
_REASONS = (("drift", "drift"), ("operator", "operator"), ("new leader", "new_leader"), ("aborted", "aborted"),
            ("joined", "member_joined"), ("is back", "member_joined"), ("profile of", "member_joined"),
            ("died", "member_lost"), ("left", "member_lost"), ("gone", "member_lost"), ("closed", "member_lost"))


def replan_reason(reason: str) -> str:
    """The label of a re-plan round's reason: what started it (the first of several joined by "; ")."""
    first = reason.split(";")[0].lower()
    for word, label in _REASONS:
        if word in first:
            return label
    return "other" if first.strip() else "initial"


class NodeEvents:
    """Counters the node feeds with each output of its control plane (``observe(output)``)."""

    def __init__(self, registry: CollectorRegistry, node_id: str) -> None:
        self.node_id = node_id
        self.replans = Counter("meshllm_replans", "Planning rounds this node started as the leader, by what "
                               "started them", ["reason"], registry=registry)
        self.elections = Counter("meshllm_elections", "Elections this node saw settle: a leader for a new term",
                                 registry=registry)
        self.won = Counter("meshllm_elections_won", "Elections this node won", registry=registry)
        self.activations = Counter("meshllm_plan_activations", "Plan epochs that became active on this node",
                                   registry=registry)

    def observe(self, out: Any) -> None:
        kind = type(out).__name__
        if kind == "StartPlanning":
            self.replans.labels(replan_reason(str(getattr(out, "reason", "")))).inc()
        elif kind == "LeaderChanged" and getattr(out, "leader", None) is not None:
            self.elections.inc()
            if out.leader == self.node_id:
                self.won.inc()
        elif kind == "ActivatePlan":
            self.activations.inc()


# --- read at scrape time ----------------------------------------------------------------------------

def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ServingCollector(Collector):
    """The serving layer's counters and state: tokens, migrations, queue depth and running requests
    at the entry, the stage's queues and decoding requests, KV bytes in use and budget (over
    ``stages``, the node's stage host)."""

    def __init__(self, serving: Any, stages: Stages | None = None) -> None:
        self.serving = serving
        self.stages = stages

    def collect(self) -> Iterator[Metric]:
        entry, stage = self.serving.entry, self.serving.stage
        es, ss = entry.stats, stage.stats
        yield _counter("meshllm_prompt_tokens", "Prompt tokens of the requests this node accepted as their entry",
                       es.get("prompt_tokens", 0))
        yield _counter("meshllm_generation_tokens", "Tokens streamed to clients by this node as their entry",
                       es.get("tokens", 0))
        yield _counter("meshllm_migrations", "Requests resumed on another replica after a fault", es.get("migrations", 0))
        hb = CounterMetricFamily("meshllm_busy_handbacks", "Prompts a replica's first stage handed back to their "
                                 "entry, more prompts being queued there than the entry counted (serve.busy_handback): "
                                 "by this node's stages (stage), and routed again by this node as their entry (entry)",
                                 labels=["side"])
        hb.add_metric(["stage"], ss.get("busy", 0))
        hb.add_metric(["entry"], es.get("busy", 0))
        yield hb
        reqs = list(entry.requests.values())
        # the request record's status: waiting for a replica, or asking one for room
        queued = sum(1 for r in reqs if getattr(r.status, "value", "") in ("waiting", "reserving"))
        yield _gauge("meshllm_requests_queued", "Requests at this entry waiting for a replica with room", queued)
        yield _gauge("meshllm_requests_running", "Requests at this entry being prefilled or decoded",
                     len(reqs) - queued)
        sv = stage.view()
        yield _gauge("meshllm_stage_jobs_queued", "Runner calls queued for this node's inference thread",
                     sv.get("queued_jobs", 0))
        yield _gauge("meshllm_stage_prefill_tokens_queued", "Prompt tokens queued for prefill on this node",
                     sv.get("queued_prefill_tokens", 0))
        yield _gauge("meshllm_stage_decoding_requests", "Requests in the decode rings this node runs as stage 0",
                     sum(len(g.members) for g in stage.rings.values()))
        yield _gauge("meshllm_stage_requests_held", "Requests holding KV or work on this node's stages",
                     len({k[0] for k in stage.held}))
        yield _counter("meshllm_stage_prefill_tokens", "Prompt tokens this node's stages prefilled",
                       ss.get("prefill_tokens", 0))
        yield _counter("meshllm_stage_decode_steps", "Decode steps this node ran as a decoder replica's stage 0",
                       ss.get("decode_steps", 0))
        spec = CounterMetricFamily("meshllm_spec_draft_tokens", "Draft tokens of speculative decoding this node's "
                                   "decoder rings sent through a step, and those the head kept", labels=["outcome"])
        spec.add_metric(["drafted"], ss.get("spec_drafted", 0))
        spec.add_metric(["accepted"], ss.get("spec_accepted", 0))
        yield spec
        yield _counter("meshllm_spec_steps", "Rows of decode steps that carried drafts (speculative decoding)",
                       ss.get("spec_rows", 0))
        kv = CounterMetricFamily("meshllm_kv_transfer_bytes", "Prompt KV handed off between replicas, by direction "
                                 "(dropped: arrived and not kept, its request ended or moved on)",
                                 labels=["direction"])
        kv.add_metric(["in"], ss.get("kv_in_bytes", 0))
        kv.add_metric(["out"], ss.get("kv_out_bytes", 0))
        kv.add_metric(["dropped"], ss.get("kv_dropped_bytes", 0))
        yield kv
        # (a serving layer built on a whole node reads its stage host there)
        stages = self.stages if self.stages is not None else self.serving.stages
        yield _counter("meshllm_stage_compute_cpu_seconds", "CPU seconds this node's loaded runners spent computing "
                       "the model (a slowed node's waits not included); the process's CPU less this is its "
                       "serving path's", compute_cpu(stages))
        used, budget = kv_bytes(stages)
        yield _gauge("meshllm_kv_bytes_in_use", "KV cache bytes reserved by requests on this node", used)
        yield _gauge("meshllm_kv_budget_bytes", "KV cache bytes this node's loaded stages may reserve", budget)


def compute_cpu(stages: Stages) -> float:
    """CPU seconds this node's distinct runners computed (their pacers' ``compute_cpu_s``)."""
    seen: dict[int, Any] = {}
    for e in stages.epochs():
        for r in stages.runners(e):
            seen[id(r)] = r
    return float(sum(getattr(getattr(r, "pacer", None), "compute_cpu_s", 0.0) for r in seen.values()))


def kv_bytes(stages: Stages) -> tuple[int, int]:
    """(reserved, budget) bytes over this node's distinct runners (epochs with the same ranges share them)."""
    seen: dict[int, Any] = {}
    for e in stages.epochs():
        for r in stages.runners(e):
            seen[id(r)] = r
    used = budget = 0
    for r in seen.values():
        kv = getattr(r, "kv", None)
        if kv is None:
            continue
        used += int(getattr(kv, "reserved", 0) or 0)
        budget += int(getattr(kv, "budget", 0) or 0)
    return used, budget


class NodeCollector(Collector):
    """The node's state: who it is, the election term and leadership, the plan epoch, members, and
    bytes per link (by peer name)."""

    def __init__(self, ports: NodePorts, names: Callable[[], dict[str, str]]) -> None:
        self.ports = ports
        self.names = names  # node id -> name of the members this node knows

    def collect(self) -> Iterator[Metric]:
        me = self.ports.identity
        info = GaugeMetricFamily("meshllm_node_info", "This node: its id, name and model (value 1)",
                                 labels=["node_id", "name", "model"])
        info.add_metric([me.node_id, me.name, me.manifest.name], 1)
        yield info
        c = self.ports.plans.control()
        if c is not None:
            yield _gauge("meshllm_election_term", "The election term this node is in", c.term)
            yield _gauge("meshllm_is_leader", "1 while this node leads the mesh", 1 if c.is_leader else 0)
            yield _gauge("meshllm_plan_epoch", "The active plan epoch (0: none yet)", c.active_epoch)
            states: dict[str, int] = defaultdict(int)
            for nid in c.membership.members:
                states[str(getattr(c.membership.state(nid), "value", "alive"))] += 1
            members = GaugeMetricFamily("meshllm_members", "The other members this node knows, by liveness", labels=["state"])
            for state, n in sorted(states.items()):
                members.add_metric([state], n)
            yield members
        stats = self.ports.stats()
        yield _counter("meshllm_links_dropped", "Links to peers that went down", stats.links_dropped)
        yield _counter("meshllm_frames_dropped", "Frames from peers that failed to decode or validate",
                       stats.bad_frames)
        t = self.ports.peers.transport()
        if t is None:
            return
        yield _gauge("meshllm_links_up", "Authenticated links to peers that are up", len(t.peers()))
        names = self.names()
        for metric, what, counts in (("meshllm_link_sent_bytes", "sent to", t.bytes_sent),
                                     ("meshllm_link_received_bytes", "received from", t.bytes_received)):
            fam = CounterMetricFamily(metric, f"Frame bytes {what} each peer over the node links", labels=["peer"])
            by_name: dict[str, int] = defaultdict(int)
            for peer, n in list(counts.items()):
                by_name[names.get(peer) or peer[:12]] += n
            for name, n in sorted(by_name.items()):
                fam.add_metric([name], n)
            yield fam


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def metrics_handler(registry: CollectorRegistry) -> Callable[[Any], Any]:
    """``GET /metrics`` for aiohttp: the registry in Prometheus' text format."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(body=render(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return handler
