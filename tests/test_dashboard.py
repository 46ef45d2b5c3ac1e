"""The dashboard's JSON (``GET /v1/dashboard``) and routes over whole nodes in one event loop: its
shape before the mesh is ready and once it serves, figures measured beside predictions, the page
readable without the API key while the chat endpoint needs it, and a client that goes away
mid-stream (the page's stop button) freeing the request on every node."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from test_node_sim import Mesh

from meshllm.model.paths import BUNDLED_MODEL
from meshllm.node import Node
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.api import OpenAIApi
from meshllm.web.dashboard import STATIC, Dashboard


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(BUNDLED_MODEL, tmp_path)  # the bundled model: a real tokenizer and chat template
    yield m
    await m.close()


def dashboards(mesh: Mesh) -> dict[str, Dashboard]:
    """One dashboard per node; each reads the others' ``/v1/dashboard/node`` through the in-memory
    registry (real nodes fetch it over HTTP)."""
    out: dict[str, Dashboard] = {}
    nodes = {f"{n.opts.advertise_host}:{n.port}": n for n in mesh.nodes}

    async def fetch(addr: str) -> dict | None:
        await asyncio.sleep(0)
        d = out.get(addr)
        return None if d is None or nodes[addr].closed else d.local_view()

    for addr, n in nodes.items():
        out[addr] = Dashboard(n.ports, n.serving, fetch_peer=fetch)
    return out


def of(ds: dict[str, Dashboard], node: Node) -> Dashboard:
    return ds[f"{node.opts.advertise_host}:{node.port}"]


def in_flight(mesh: Mesh) -> dict[str, tuple[int, int, int]]:
    """Per node: (requests at its entry, requests held by its stages, KV sequences in its runners)."""
    return {n.name: (len(n.serving.entry.requests), n.serving.stage.held_count(),
                     sum(len(r.kv.seqs) for e in n.stages.epochs() for r in n.stages.runners(e)))
            for n in mesh.live}


async def test_not_ready_says_why_and_still_lists_the_node(mesh: Mesh) -> None:
    node = await mesh.add(0)
    d = await Dashboard(node.ports, node.serving).view()
    assert d["ready"] is False and d["why_not_ready"]  # no leader yet (or no plan yet)
    assert d["plan"] is None and d["replicas"] == []
    assert [n["name"] for n in d["nodes"]] == ["n0"]
    me = d["nodes"][0]
    assert me["self"] and me["memory"]["source"] == "reported" and me["memory"]["used"] == 0
    assert me["memory"]["budget"] == 1 << 30
    assert d["entry"]["requests"] == 0 and d["entry"]["waiting"] == 0
    json.dumps(d)  # JSON as it stands: no inf, no numpy scalars


async def test_the_view_shows_every_node_replica_and_figure_beside_its_prediction(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.add(i)
    ds = dashboards(mesh)
    await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan on three nodes")
    entry = mesh.nodes[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # two requests through node 0's entry, one through node 1's: the dashboard adds up every entry
    for at, prompt in ((entry, [5, 6, 7]), (entry, [9, 10, 11, 12, 13]), (mesh.nodes[1], [20, 21])):
        tokens = [ev.token_id async for ev in at.serving.entry.generate(prompt, params)]
        assert len(tokens) == 12
    d = await of(ds, entry).view()
    plan = entry.control.active_plan
    assert d["ready"] and d["why_not_ready"] is None and d["epoch"] == entry.control.active_epoch
    # nodes: every member, the leader marked, memory as each node reports it (weights of its blocks)
    assert {n["id"] for n in d["nodes"]} == {n.node_id for n in mesh.nodes}
    assert [n["id"] for n in d["nodes"] if n["leader"]] == [entry.control.leader]
    for n in mesh.nodes:
        row = next(x for x in d["nodes"] if x["id"] == n.node_id)
        assert row["state"] == "alive" and row["memory"]["source"] == "reported"
        held_w = sum(r.weight_bytes_resident for e in n.stages.epochs() for r in n.stages.runners(e))
        assert row["memory"]["weights"] == held_w and row["memory"]["budget"] == 1 << 30
        assert row["layers"] == [s["layers"] for r in plan["replicas"] for s in r["stages"] if s["node"] == n.node_id]
        assert row["device"]["decode_ms_per_token"] > 0
    # the plan: epoch, strategy, why it was made, the planner's figures
    assert d["plan"]["epoch"] == d["epoch"] and d["plan"]["strategy"] == "e2llm"
    assert d["plan"]["reason"] == plan["reason"] and d["plan"]["reason"]
    assert d["plan"]["predicted"]["mean_ttft_s"] is not None
    measured = d["plan"]["measured"]
    assert measured["entries"] == 3 and measured["requests"] == 3 and measured["ttft_s"] > 0
    assert measured["tokens_per_s"] > 0
    # the traffic measured (three prompts of 3, 5 and 2 tokens, twelve tokens each), and the plan's
    # queueing estimate again for it, each figure judged against its prediction
    assert measured["mean_input_len"] == pytest.approx(10 / 3) and measured["mean_output_len"] == 12
    assert measured["arrival_rate"] > 0  # node 0's two requests, one after the other
    ft = d["plan"]["predicted_for_traffic"]
    assert ft["mean_input_len"] == 3 and ft["mean_output_len"] == 12
    assert ft["arrival_rate"] == float(f"{measured['arrival_rate']:.2g}") and ft["mean_ttft_s"] > 0
    assert set(d["plan"]["compare"]) == {"wait_s", "ttft_s", "tokens_per_s"}
    for v in d["plan"]["compare"].values():
        assert v["off"] == (v["note"] is not None)
    assert d["plan"]["compare"]["ttft_s"]["predicted"] == ft["mean_ttft_s"]
    # replicas: as planned, each with its figures measured beside predicted
    assert [(r["id"], r["role"], [s["layers"] for s in r["stages"]]) for r in d["replicas"]] == \
        [(r["id"], r["role"], [s["layers"] for s in r["stages"]]) for r in plan["replicas"]]
    prefill = [r for r in d["replicas"] if r["role"] in ("prefill", "both")]
    decode = [r for r in d["replicas"] if r["role"] in ("decoder", "both")]
    assert sum(r["measured"]["prefilled"] for r in prefill) == 3
    assert sum(r["measured"]["decoded"] for r in decode) == 3
    for r in prefill:
        if r["measured"]["prefilled"]:
            assert r["measured"]["prefill_s"] > 0 and r["predicted"]["prefill_s"] > 0
            assert r["compare"]["prefill_s"]["ratio"] == pytest.approx(r["measured"]["prefill_s"] / r["predicted"]["prefill_s"])
            assert r["measured"]["wait_s"] >= 0 and r["measured"]["ttft_s"] >= r["measured"]["prefill_s"]
    for r in decode:
        assert r["live"]["max_batch"] is not None or r["live"]["decoding"] is None
        if r["measured"]["decoded"]:
            assert r["measured"]["tokens_per_s"] > 0 and r["predicted"]["tokens_per_s"] > 0
            assert r["compare"]["tokens_per_s"]["measured"] == r["measured"]["tokens_per_s"]
    assert d["entry"]["outcomes"] == {"completed": 2} and d["entry"]["tokens"] == 24  # node 0's own
    assert d["entries"]["outcomes"] == {"completed": 3} and d["entries"]["measured"] == 3
    # a member that stops answering: its memory is the planned weights, its figures drop out
    node2 = next(n for n in mesh.nodes[1:] if n.stages.ranges(d["epoch"]))  # a member holding blocks
    ds.pop(f"{node2.opts.advertise_host}:{node2.port}")
    of(ds, entry)._peers.clear()
    d = await of(ds, entry).view()
    row = next(x for x in d["nodes"] if x["id"] == node2.node_id)
    planned = sum(int(entry.model_profile.param_bytes[a:b].sum()) for a, b in row["layers"])
    assert row["memory"]["source"] == "planned" and row["memory"]["used"] == planned > 0
    assert d["entries"]["measured"] == 2
    json.dumps(d)


async def test_a_failed_or_cancelled_request_is_counted_not_measured(mesh: Mesh) -> None:
    node = await mesh.add(0)
    dash = Dashboard(node.ports, node.serving)
    await mesh.until(lambda: mesh.agreed() is not None, "a one-node plan")
    gen = node.serving.entry.generate([4, 5, 6], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    first = await anext(gen)
    assert first.error is None
    await gen.aclose()  # the client went away
    d = await dash.view()
    assert d["entry"]["outcomes"] == {"cancelled": 1} and d["plan"]["measured"]["requests"] == 0
    await mesh.until(lambda: not any(sum(v) for v in in_flight(mesh).values()), "the cancelled request freed")


@pytest.fixture
async def served(mesh: Mesh) -> AsyncIterator[tuple[Mesh, str]]:
    """Three nodes; node 0's page, dashboard and OpenAI API (with an API key) on a real port."""
    for i in range(3):
        await mesh.add(i, api_key="sesame" if i == 0 else None)
    ds = dashboards(mesh)
    await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan on three nodes")
    app = web.Application()
    node = mesh.nodes[0]
    OpenAIApi(node.serving, node.manifest.name, node.manifest.model_id, api_key=node.opts.api_key).mount(app)
    of(ds, node).mount(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield mesh, str(server.make_url(""))
    await server.close()


async def test_the_page_and_its_json_are_served_without_the_key_and_chat_needs_it(served) -> None:
    mesh, base = served
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/") as r:
            page = await r.text()
            assert r.status == 200 and "/static/app.js" in page and "chat-input" in page
        for f in ("app.js", "style.css"):
            async with s.get(base + "/static/" + f) as r:
                assert r.status == 200 and await r.read() == (STATIC / f).read_bytes()
        async with s.get(base + "/static/../dashboard.py") as r:
            assert r.status in (403, 404)
        async with s.get(base + "/v1/dashboard") as r:
            d = await r.json()
            assert r.status == 200 and d["ready"] and d["security"]["api_key_required"] is True
            assert len(d["nodes"]) == 3 and d["replicas"]
        async with s.get(base + "/v1/dashboard/node") as r:
            assert (await r.json())["id"] == mesh.nodes[0].node_id
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 401
        async with s.post(base + "/v1/chat/completions", json=body,
                          headers={"Authorization": "Bearer sesame"}) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3


async def test_a_stream_the_client_abandons_is_freed_on_every_node(served) -> None:
    """What the page's stop button does (abort the fetch): the server notices at its next write,
    cancels the request, and every node frees it — no entry request, no held request, no KV."""
    mesh, base = served
    node = mesh.nodes[0]
    body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    gate = threading.Event()
    held: asyncio.Future | None = None
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(base + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"})
            assert r.status == 200
            pieces = 0
            async for line in r.content:
                if line.startswith(b"data:") and b'"content"' in line and b'"content": ""' not in line:
                    pieces += 1
                if pieces == 2:
                    break
            # the request is mid-stream; hold every node's inference so it cannot finish meanwhile
            held = asyncio.gather(*(n.stages.call(gate.wait) for n in mesh.nodes))
            assert any(v[0] or v[1] for v in in_flight(mesh).values())
            r.close()  # the client goes away, as an aborted fetch does
        gate.set()
        await mesh.until(lambda: not any(sum(v) for v in in_flight(mesh).values()),
                         "every node freed the abandoned request")
    finally:
        gate.set()
        if held is not None:
            await held
    assert node.serving.entry.stats["cancelled"] == 1 and node.serving.entry.stats["completed"] == 0
    async with aiohttp.ClientSession() as s, s.get(base + "/v1/dashboard") as r:
        d = await r.json()
    assert d["entry"]["outcomes"] == {"cancelled": 1} and d["entry"]["requests"] == 0
    assert all(n["held"] == 0 for n in d["nodes"])


async def test_the_plan_says_why_it_was_made_in_names(mesh: Mesh) -> None:
    for i in range(2):
        await mesh.add(i, priority=10 if i == 0 else 0)  # n0 leads, before and after the join
    dash = Dashboard(mesh.nodes[0].ports, mesh.nodes[0].serving)
    await mesh.until(lambda: mesh.agreed() is not None, "a plan on two nodes")
    first = (await dash.view())["plan"]
    assert first["reason"] and first["strategy"] == "e2llm"
    n2 = await mesh.add(2)
    await mesh.until(lambda: (a := mesh.agreed()) is not None and a[2] > first["epoch"]
                     and any(s["node"] == n2.node_id for r in mesh.nodes[0].control.active_plan["replicas"]
                             for s in r["stages"]), "a new plan with the node that joined")
    plan = (await dash.view())["plan"]
    assert plan["epoch"] > first["epoch"]
    assert "n2 joined" in plan["reason"] and n2.node_id not in plan["reason"]


@pytest.mark.parametrize(("garbage", "memory"), [
    ({"memory": {"budget": 1}, "measured": {"plans": ["a", "b"]}}, "reported"),  # figures that do not add up
    ({"measured": {}}, "planned"),  # not a node's document
    ({"memory": "lots", "measured": {}}, "planned"),
])
async def test_a_member_answering_garbage_is_left_out(mesh: Mesh, garbage: dict, memory: str) -> None:
    for i in range(2):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "a plan on two nodes")
    n0, n1 = mesh.nodes

    async def fetch(addr: str) -> dict:
        return {"id": n1.node_id, **garbage}

    d = await Dashboard(n0.ports, n0.serving, fetch_peer=fetch).view()
    assert d["entries"]["measured"] == 1 and d["plan"]["measured"]["entries"] == 1
    row = next(x for x in d["nodes"] if x["id"] == n1.node_id)
    assert row["memory"]["source"] == memory
