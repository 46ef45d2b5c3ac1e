"""Structured logs: JSON lines with the node and the request id, and that id follows a request
across every node it touches.

- a request through a three-node data-plane mesh (prefill on a, decoder split over b and c) with
  the client's ``X-Request-Id``: the response echoes it, and the lines about the request from all
  three nodes carry the same request id, each line naming the node that really did the work;
- whole nodes in one process: each node's lines name that node (it is bound per task and per
  frame, not process-wide);
- what runs on the inference thread logs with the context of the call;
- the text format stays readable; progress bars stay off when stderr is not a terminal or the
  logs are JSON.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from servemesh import DataMesh
from test_node_sim import Mesh

from meshllm.model.manifest import Manifest
from meshllm.obs import logs
from meshllm.obs.logs import bound, client_request_id, make_handler, setup_logging
from meshllm.obs.progress import bar, disabled
from meshllm.serve.api import OpenAIApi
from meshllm.serve.stages import StageHost

Lines = Callable[[], list[dict[str, Any]]]
KEYS = {"ts", "level", "logger", "msg", "node"}


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    """Every record of the test as a parsed JSON line (debug level and up)."""
    buf = io.StringIO()
    handler = make_handler("json", buf)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buf.getvalue().splitlines()]

    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


SPEC = [("prefill", [("a", 0, 5)]), ("decoder", [("b", 0, 2), ("c", 2, 5)])]  # tiny model: blocks 0..4


async def test_a_request_id_follows_the_request_across_every_node(tiny_manifest: Manifest, json_lines: Lines) -> None:
    mesh = DataMesh(tiny_manifest, ["a", "b", "c"])
    await mesh.start(SPEC)
    app = web.Application()
    OpenAIApi(mesh.node("c").serving, tiny_manifest.name, tiny_manifest.model_id).mount(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s, s.post(
                server.make_url("/v1/completions"), headers={"X-Request-Id": "trace-me"},
                json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}) as r:
            body = await r.json()
            assert r.status == 200, body
            assert r.headers["X-Request-Id"] == "trace-me"
        rid = body["id"].removeprefix("cmpl-")
        assert rid.startswith("trace-me.")  # the client's id, made unique in the mesh
        from waiting import async_wait_until

        await async_wait_until(lambda: sum(mesh.held().values()) == 0, "every stage freed the request", 10.0)
    finally:
        await server.close()
        await mesh.close()
    lines = json_lines()
    assert lines and all(set(line) >= KEYS for line in lines)
    mine = [line for line in lines if line.get("request_id") == rid]
    by_node: dict[str, list[str]] = {}
    for line in mine:
        by_node.setdefault(line["node"], []).append(line["msg"])
    assert set(by_node) == {"a", "b", "c"}, by_node
    # each line names the node that did the work: the prompt on a, the decoder's stages on b and c
    assert any("prefilled tokens [0, 3) on stage 0 of replica 0" in m for m in by_node["a"])
    assert any("on stage 0 of decoder replica 1" in m for m in by_node["b"])
    assert any("on stage 1 of decoder replica 1" in m for m in by_node["c"])
    assert any(m.startswith(f"request {rid} finished (length)") for m in by_node["c"])  # c is the entry
    assert not any("reserved" in m for m in by_node["a"])
    # every line mentioning the request carries its id
    assert all(line.get("request_id") == rid for line in lines if rid in line["msg"])


async def test_whole_nodes_in_one_process_log_as_themselves(tiny_model_dir: Path, tmp_path: Path,
                                                            json_lines: Lines) -> None:
    mesh = Mesh(tiny_model_dir, tmp_path)
    try:
        for i in range(3):
            await mesh.add(i)
        await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan on three nodes")
        holders = {n.name for n in mesh.nodes if n.runners_for(n.control.active_epoch)}
        epoch = mesh.nodes[0].control.active_epoch
    finally:
        await mesh.close()
    loaded = [line for line in json_lines() if line["msg"].startswith("loaded blocks")
              and line["msg"].endswith(f"for epoch {epoch}")]
    assert {line["node"] for line in loaded} == holders and len(loaded) == len(holders)
    leaders = [line for line in json_lines() if line["msg"].startswith("leader for term")]
    assert {line["node"] for line in leaders} == {"n0", "n1", "n2"}


async def test_the_inference_thread_logs_with_the_callers_context(tiny_manifest: Manifest, json_lines: Lines) -> None:
    host = StageHost(tiny_manifest, threads=1, slowdown=1.0, budget_bytes=1 << 30)
    try:
        with bound(node="x", request_id="r-1"):
            await host.call(lambda: logging.getLogger("meshllm.test").warning("on the inference thread"))
        await host.call(lambda: logging.getLogger("meshllm.test").warning("outside any request"))
    finally:
        await host.close()
    got = {line["msg"]: line for line in json_lines() if line["logger"] == "meshllm.test"}
    assert got["on the inference thread"]["node"] == "x"
    assert got["on the inference thread"]["request_id"] == "r-1"
    assert "request_id" not in got["outside any request"]
    assert got["outside any request"]["node"] is None


def test_text_lines_name_the_node_and_request_and_json_lines_hold_the_fields() -> None:
    text, js = io.StringIO(), io.StringIO()
    log = logging.getLogger("meshllm.test.format")
    log.propagate = False
    log.setLevel(logging.INFO)
    for h in (make_handler("text", text), make_handler("json", js)):
        log.addHandler(h)
    try:
        with bound(node="a", request_id="3f2c-4"):
            log.info("request %s finished", "3f2c-4")
        log.warning("plain")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.handlers.clear()
        log.propagate = True
    first, second = text.getvalue().splitlines()[:2]
    assert first.endswith(" I meshllm.test.format [a req=3f2c-4]: request 3f2c-4 finished")
    assert second.endswith(" W meshllm.test.format: plain")
    rows = [json.loads(x) for x in js.getvalue().splitlines()]
    assert rows[0]["node"] == "a" and rows[0]["request_id"] == "3f2c-4" and rows[0]["level"] == "info"
    assert rows[0]["ts"].endswith("Z") and "T" in rows[0]["ts"]
    assert "request_id" not in rows[1] and rows[1]["node"] is None
    assert rows[2]["msg"] == "failed" and "ValueError: boom" in rows[2]["exc"]


def test_client_request_ids_are_checked() -> None:
    assert client_request_id(" abc-1.2:x_y ") == "abc-1.2:x_y"
    assert client_request_id("has space") is None and client_request_id("x" * 65) is None
    assert client_request_id("a\nforged line") is None and client_request_id(None) is None


def test_setup_logging_switches_format_and_progress_bars_stay_off_the_logs() -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        setup_logging("json", "info", stream=buf)
        assert logs.log_format() == "json" and disabled() is True
        assert bar(range(3), desc="x").disable  # JSON logs: never a bar
        logging.getLogger("meshllm.test").info("hello")
        assert json.loads(buf.getvalue().splitlines()[-1])["msg"] == "hello"
        setup_logging("text", "info", stream=buf)  # replaces the handler, does not add one
        assert len(root.handlers) == len(before) + 1
        assert logs.log_format() == "text" and disabled() is None and disabled(False) is True
        assert bar(range(3), desc="x", file=io.StringIO()).disable  # not a terminal
        with pytest.raises(Exception, match="--log-format"):
            setup_logging("xml")
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)
        logs._installed = None


def test_node_and_up_take_log_format() -> None:
    import argparse

    from meshllm.commands import node, up

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    node.register(sub)
    up.register(sub)
    assert parser.parse_args(["node", "--log-format", "json"]).log_format == "json"
    assert parser.parse_args(["node"]).log_format == "text"
    assert parser.parse_args(["up", "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["node", "--log-format", "xml"])


def test_export_draws_no_bar_off_a_terminal(tiny_config: Any, tiny_weights: Any, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    from meshllm.model.export import export_model

    export_model(tiny_weights, tiny_config, tmp_path / "m", name="tiny-random", progress=True)
    assert "export tiny-random" not in capfd.readouterr().err


@pytest.mark.slow
def test_node_processes_log_json_lines_and_serve_metrics(tmp_path: Path) -> None:
    """Real ``meshllm node`` processes (``--log-format json``): every line of their logs is a JSON
    object, one request's id shows in the logs of every node it touched, and ``GET /metrics``
    counts it."""
    import urllib.request

    from meshllm.commands.up import LocalMesh

    with LocalMesh(3, budgets="64MiB,22MiB,22MiB", log_dir=str(tmp_path),
                   extra=["--log-format", "json", "--log-level", "debug"]) as mesh:
        mesh.wait_ready(120)
        entry = mesh.urls[-1]
        req = urllib.request.Request(entry + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "def main():", "max_tokens": 6}).encode(),
                                     headers={"Content-Type": "application/json", "X-Request-Id": "proc-1"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.headers["X-Request-Id"] == "proc-1"
            rid = json.loads(r.read())["id"].removeprefix("cmpl-")
        with urllib.request.urlopen(entry + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
    assert 'meshllm_requests_total{code="length",outcome="ok"} 1.0' in metrics
    assert "meshllm_generation_tokens_total 6.0" in metrics
    rows = []
    for f in sorted(tmp_path.glob("node-*.log")):
        for line in f.read_text().splitlines():
            rows.append(json.loads(line))  # every line is one JSON object: no bar, no stray text
    assert rows and all(set(r) >= KEYS for r in rows)
    nodes = {r["node"] for r in rows if r.get("request_id") == rid}
    assert "node-2" in nodes and len(nodes) >= 2, nodes
