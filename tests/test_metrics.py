"""``GET /metrics``: what a node reports in Prometheus' format equals what was done to it.

- whole nodes planning themselves in memory: three requests through one node's HTTP API give
  ok = 3, tokens = the sum of completion tokens, one observation per request in each histogram; the
  election term, plan epoch, elections and re-plans match the control plane; bytes per link are
  labelled with the peers' names;
- a data-plane mesh with a plan chosen by the test: a request held on its prefill node shows as
  running at the entry with KV reserved on the decoder; a second one is refused (429); a stream the
  client closes counts as cancelled; a prompt too long counts as rejected; everything returns to
  zero after.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from servemesh import DataMesh
from test_node_sim import Mesh
from waiting import async_wait_until

from meshllm.model.manifest import Manifest
from meshllm.obs.metrics import RequestMetrics, code_label, metrics_handler, replan_reason
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    out: Samples = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((dict(s.labels), s.value))
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum of ``metric``'s samples whose labels include ``labels`` (0 when there is none)."""
    return sum(v for ls, v in samples.get(metric, []) if all(ls.get(k) == x for k, x in labels.items()))


async def serve_node(node: Any, name: str, model_id: str) -> TestServer:
    """The routes ``Node.real`` mounts: the OpenAI API and /metrics."""
    app = web.Application()
    OpenAIApi(node.serving, name, model_id).mount(app)
    app.router.add_get("/metrics", metrics_handler(node.serving.registry))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def scrape(server: TestServer) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


# --- whole nodes ----------------------------------------------------------------------------------

@pytest.fixture
async def mesh(tiny_model_dir: Path, tmp_path: Path):
    m = Mesh(tiny_model_dir, tmp_path)
    yield m
    await m.close()


async def test_a_node_reports_the_requests_tokens_and_control_state_it_saw(mesh: Mesh,
                                                                           tiny_manifest: Manifest) -> None:
    for i in range(3):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan on three nodes")
    node = mesh.nodes[1]
    server = await serve_node(node, tiny_manifest.name, tiny_manifest.model_id)
    try:
        before = await scrape(server)
        assert value(before, "meshllm_requests_total") == 0
        prompts = [[5, 6, 7], [9] * 11, [3, 4, 5, 6, 7, 8]]
        completion = 0
        async with aiohttp.ClientSession() as s:
            for p, n in zip(prompts, (4, 7, 1), strict=True):
                async with s.post(server.make_url("/v1/completions"),
                                  json={"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    assert r.headers["X-Request-Id"] and body["id"] == "cmpl-" + r.headers["X-Request-Id"]
                    completion += body["usage"]["completion_tokens"]
            async with s.post(server.make_url("/v1/completions"),
                              json={"prompt": [5] * 60, "max_tokens": 10}) as r:
                assert r.status == 400
            async with s.post(server.make_url("/v1/completions"), data=b"{not json") as r:
                assert r.status == 400  # refused by the API before the entry: counted all the same
        assert completion == 4 + 7 + 1
        await mesh.until(lambda: all(n.serving.stage.held_count() == 0 for n in mesh.nodes),
                         "every node freed every request")
        m = await scrape(server)
    finally:
        await server.close()

    assert value(m, "meshllm_requests_total", outcome="ok") == 3
    assert value(m, "meshllm_requests_total", outcome="ok", code="length") == 3
    assert value(m, "meshllm_requests_total", outcome="rejected", code="context_length") == 1
    assert value(m, "meshllm_requests_total", outcome="rejected", code="invalid_json") == 1
    assert value(m, "meshllm_requests_total", outcome="error") == 0
    assert value(m, "meshllm_generation_tokens_total") == completion
    assert value(m, "meshllm_prompt_tokens_total") == sum(len(p) for p in prompts)
    for h in ("meshllm_time_to_first_token_seconds", "meshllm_request_waiting_seconds",
              "meshllm_request_duration_seconds"):
        assert value(m, h + "_count") == 3, h
        assert value(m, h + "_sum") > 0, h
    assert value(m, "meshllm_time_per_output_token_seconds_count") == 2  # the 1-token answer has no gap
    assert value(m, "meshllm_requests_queued") == 0 and value(m, "meshllm_requests_running") == 0

    c = node.control
    assert value(m, "meshllm_election_term") == c.term >= 1
    assert value(m, "meshllm_plan_epoch") == c.active_epoch >= 1
    assert value(m, "meshllm_is_leader") == (1 if c.is_leader else 0)
    assert value(m, "meshllm_elections_total") >= 1
    assert value(m, "meshllm_plan_activations_total") >= 1
    assert value(m, "meshllm_members", state="alive") == 2  # the other two
    assert value(m, "meshllm_node_info", name="n1", node_id=node.node_id) == 1
    used, budget = value(m, "meshllm_kv_bytes_in_use"), value(m, "meshllm_kv_budget_bytes")
    assert used == 0 and (budget > 0) == bool(node.runners_for(c.active_epoch))
    # bytes per link, by the peers' names, and the same counts the transport keeps
    sent = {ls["peer"]: v for ls, v in m["meshllm_link_sent_bytes_total"]}
    got = {ls["peer"]: v for ls, v in m["meshllm_link_received_bytes_total"]}
    assert set(sent) == set(got) == {"n0", "n2"}
    assert all(v > 0 for v in [*sent.values(), *got.values()])
    # the leader planned at least once, for a reason the label names
    leader = next(n for n in mesh.nodes if n.control.is_leader)
    ls = await _registry_samples(leader)
    reasons = {lab["reason"]: v for lab, v in ls["meshllm_replans_total"]}
    assert sum(reasons.values()) >= 1 and set(reasons) <= {"initial", "new_leader", "member_joined",
                                                            "member_lost", "drift", "operator", "aborted", "other"}
    assert value(ls, "meshllm_is_leader") == 1


async def _registry_samples(node: Any) -> Samples:
    from meshllm.obs.metrics import render

    return parse(render(node.metrics).decode())


# --- a data-plane mesh ----------------------------------------------------------------------------

SPEC = [("prefill", [("a", 0, 5)]), ("decoder", [("b", 0, 2), ("c", 2, 5)])]  # tiny model: blocks 0..4


async def test_queue_running_kv_refusals_and_cancellation_are_counted(tiny_manifest: Manifest) -> None:
    mesh = DataMesh(tiny_manifest, ["a", "b", "c"], config=ServeConfig(max_queue=1, queue_timeout_s=5.0))
    await mesh.start(SPEC)
    entry_node, decoder = mesh.node("c"), mesh.node("b")
    servers = {n: await serve_node(mesh.node(n), tiny_manifest.name, tiny_manifest.model_id) for n in "abc"}
    try:
        gate = mesh.node("a").hold_inference()  # the prompt waits on its prefill node
        async with aiohttp.ClientSession() as s:
            held = s.post(servers["c"].make_url("/v1/completions"),
                          json={"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                "speculate": False},  # one token per step, counted below
                          headers={"X-Request-Id": "held-1"})
            import asyncio

            task = asyncio.ensure_future(held)
            # admitted: the prompt sent to the prefill replica, KV reserved on the decoder
            runner = decoder.stages.runners(1)[0]
            await async_wait_until(lambda: any(r.sent for r in entry_node.serving.entry.requests.values())
                                   and runner.kv.reserved > 0, "the request to be admitted", 10.0)
            c1, b1 = await scrape(servers["c"]), await scrape(servers["b"])
            assert value(c1, "meshllm_requests_running") == 1 and value(c1, "meshllm_requests_queued") == 0
            # its prefill has not begun (its node is busy): the waiting time is not known yet
            assert value(c1, "meshllm_request_waiting_seconds_count") == 0
            assert value(c1, "meshllm_time_to_first_token_seconds_count") == 0
            assert value(b1, "meshllm_kv_bytes_in_use") == runner.kv.reserved > 0
            assert value(b1, "meshllm_kv_budget_bytes") == runner.kv.budget
            assert value(b1, "meshllm_requests_running") == 0  # b is not its entry
            # the entry holds one request, its limit: the next one is refused
            async with s.post(servers["c"].make_url("/v1/completions"), json={"prompt": [5], "max_tokens": 2}) as r:
                assert r.status == 429
            gate.set()
            resp = await task
            body = await resp.json()
            assert resp.status == 200 and resp.headers["X-Request-Id"] == "held-1", body
            assert body["id"].startswith("cmpl-held-1.")
            resp.release()
        # a stream the client closes after its first token
        events = entry_node.serving.entry.generate([5, 6], SamplingParams(temperature=0.0, max_tokens=20,
                                                                           ignore_eos=True))
        first = await anext(events)
        assert first.error is None
        await events.aclose()
        await async_wait_until(lambda: sum(mesh.held().values()) == 0, "every stage freed everything", 10.0)
        a2, b2, c2 = [await scrape(servers[n]) for n in "abc"]
        runners = {id(r): r for e in decoder.stages.epochs() for r in decoder.stages.runners(e)}
        computed = sum(r.pacer.compute_cpu_s for r in runners.values())
    finally:
        for srv in servers.values():
            await srv.close()
        await mesh.close()
    assert value(c2, "meshllm_requests_total", outcome="ok") == 1
    assert value(c2, "meshllm_requests_total", outcome="rejected", code="queue_full") == 1
    assert value(c2, "meshllm_requests_total", outcome="cancelled") == 1
    assert value(c2, "meshllm_requests_total") == 3
    # the two whose prefill began waited (the held one, as long as its prefill node was busy)
    assert value(c2, "meshllm_request_waiting_seconds_count") == 2
    assert value(c2, "meshllm_generation_tokens_total") == 5 + 1
    assert value(c2, "meshllm_requests_running") == 0 and value(c2, "meshllm_requests_queued") == 0
    assert value(b2, "meshllm_kv_bytes_in_use") == 0
    # the prompts' KV went from a to the decoder's two stages; what came after the cancelled
    # stream was freed is counted as dropped, not lost
    kv_in = [value(x, "meshllm_kv_transfer_bytes_total", direction="in") for x in (b2, c2)]
    dropped = [value(x, "meshllm_kv_transfer_bytes_total", direction="dropped") for x in (b2, c2)]
    assert value(a2, "meshllm_kv_transfer_bytes_total", direction="out") == sum(kv_in) + sum(dropped)
    assert min(kv_in) > 0
    assert value(a2, "meshllm_stage_prefill_tokens_total") == 4 + 2
    assert value(b2, "meshllm_stage_decode_steps_total") >= 4  # token 0 comes from the prefill replica
    assert value(b2, "meshllm_spec_draft_tokens_total", outcome="drafted") == 0  # the request said no
    # the model's compute on b: what its runners' pacers counted on the threads that ran them
    assert computed > 0 and value(b2, "meshllm_stage_compute_cpu_seconds_total") == pytest.approx(computed)


# --- the pieces -----------------------------------------------------------------------------------

def test_each_registry_is_its_own() -> None:
    a, b = RequestMetrics(), RequestMetrics()
    a.rejected("queue_full")
    a.finished("stop", duration_s=2.0, first_s=0.5, tokens=4)
    from meshllm.obs.metrics import render

    ma, mb = parse(render(a.registry).decode()), parse(render(b.registry).decode())
    assert value(ma, "meshllm_requests_total") == 2 and value(mb, "meshllm_requests_total") == 0
    assert value(ma, "meshllm_time_per_output_token_seconds_sum") == pytest.approx(0.5)  # (2.0 - 0.5) / 3


def test_labels_stay_few() -> None:
    assert code_label("node_lost") == "node_lost"
    assert code_label("Some peer's free text!") == "other" and code_label("") == "other"
    assert replan_reason("new leader in term 3") == "new_leader"
    assert replan_reason("drift (from 0a1b); n2 joined") == "drift"
    assert replan_reason("0a1b2c died") == "member_lost" and replan_reason("operator request") == "operator"
    assert replan_reason("") == "initial" and replan_reason("something new") == "other"
