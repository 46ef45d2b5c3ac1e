"""The schema-drawn bodies of tests/test_api_schema.py (valid ones, ones with a known field
broken, deeply nested ones, huge strings) sent to a real ``meshllm node`` process serving the
bundled model, through its own HTTP server, body limit and logging: every answer is a 200 with
the dialect's well-formed body or a 4xx with its error JSON, within a deadline (never a 500 or a
hang), the node's log has no traceback and no error line, its ``/metrics`` show nothing held
afterwards, and it still answers as one process does."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from schemabodies import dumps, huge, invalid, valid
from test_api_schema import ENDPOINTS, _check_answer, _drawn, _short
from waiting import async_wait_until

from meshllm.commands.up import LocalMesh
from meshllm.model.manifest import load_manifest
from meshllm.model.paths import BUNDLED_MODEL
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.slow]

CONFIG = """
[control]
heartbeat_interval = 0.3
discovery_grace = 0.5
replan_debounce = 0.2
"""
# what a node holds for requests: all 0 once every request has ended
HELD = ("meshllm_requests_queued", "meshllm_requests_running", "meshllm_stage_jobs_queued",
        "meshllm_stage_prefill_tokens_queued", "meshllm_stage_decoding_requests", "meshllm_stage_requests_held",
        "meshllm_kv_bytes_in_use")
ANSWER_S = 20  # a request not answered within this is a hang
LOG_LEVEL = re.compile(r"^\S+ \S+ ([A-Z]) ")  # the text log format: date, time, level letter


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    d = tmp_path_factory.mktemp("fuzz-node")
    (d / "node.toml").write_text(CONFIG)
    with LocalMesh(1, log_dir=str(d / "logs"), extra=["--config", str(d / "node.toml"), "--log-format", "text"]) as m:
        m.wait_ready(90)
        yield m


def held(url: str) -> dict[str, float]:
    """The node's gauges of what it holds for requests, from its ``/metrics``."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in HELD}


async def test_schema_drawn_bodies_against_a_node_process(node: LocalMesh) -> None:
    url = node.urls[0]
    name = load_manifest(BUNDLED_MODEL).name
    statuses: dict[str, list[int]] = {"valid": [], "invalid": [], "huge": []}
    timeout = aiohttp.ClientTimeout(total=ANSWER_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def post(path: str, data: bytes) -> tuple[int, bytes, str]:
            async with s.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.read(), r.headers.get("Content-Type", "")

        for path, model in ENDPOINTS.items():
            for body in _drawn(valid(model), 12):
                status, raw, ctype = await post(path, dumps(_short(path, body, name)))
                assert status in (200, 400, 404), (path, status, dumps(body)[:300], raw[:300])
                _check_answer(path, status, raw, ctype)
                statuses["valid"].append(status)
            for body, field in _drawn(invalid(model), 12):
                sent = dumps(body)
                status, raw, ctype = await post(path, sent)
                assert status in (400, 413), (path, field, status, sent[:300], raw[:300])
                _check_answer(path, status, raw, ctype)
                statuses["invalid"].append(status)
            for body in _drawn(huge(model), 2):
                status, raw, ctype = await post(path, dumps(_short(path, body, name)))
                assert status in (200, 400, 404, 413), (path, status, raw[:300])
                _check_answer(path, status, raw, ctype)
                statuses["huge"].append(status)
        # the draws reached the model, not only the validators
        assert statuses["valid"].count(200) >= 8, statuses["valid"]
        # nothing held afterwards
        last: dict[str, float] = {}

        def idle() -> bool:
            last.update(held(url))
            return set(last) == set(HELD) and not any(last.values())

        await async_wait_until(idle, "the node holding nothing", 10, describe=lambda: str(last))
        # and it still answers as one process does
        manifest = load_manifest(BUNDLED_MODEL)
        ids = Tokenizer.from_manifest(manifest).encode("def add(a, b):\n")
        want = generate(StageRunner(manifest, 0, manifest.config.num_blocks, threads=1), ids,
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)).token_ids
        status, raw, _ = await post("/v1/completions", json.dumps(
            {"prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode())
        assert status == 200 and json.loads(raw)["meshllm"]["token_ids"] == list(want), raw[:300]
    node.check_alive()
    log = (Path(node.dir) / "node-0.log").read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    bad = [ln for ln in log.splitlines() if (m := LOG_LEVEL.match(ln)) and m.group(1) in ("E", "C")]
    assert not bad, bad[:5]
    assert sum(1 for ln in log.splitlines() if LOG_LEVEL.match(ln)) > 5  # the pattern reads this log
