#!/usr/bin/env python3
"""The README's dashboard screenshot (``docs/img/dashboard.png``), taken from the demo's mesh.

    .venv/bin/python tools/screenshot.py [--model DIR] [--duration 60] [--out docs/img/dashboard.png]
                                         [--json FILE]

What ``meshllm demo`` starts, served the traffic it tells its planner to expect, then asked its
question in the page's chat box:

1. three ``meshllm node`` processes on loopback with the demo's memory budgets and workload
   (``meshllm.commands.demo``: ``demo_budgets``, ``DEMO_WORKLOAD``), SmolLM2 int4 from
   ``meshllm fetch smollm2`` unless ``--model`` says otherwise; it stops (exit 1) unless the
   planner, unforced, made a PREFILL and a DECODER replica;
2. ``--duration`` seconds of that workload through the OpenAI API: Poisson arrivals at its rate,
   prompts of its prompt length (random token ids), answers of exactly its answer length, over
   every node's API in turn;
3. Debian's ``chromium`` (headless, driven by Playwright, as ``tests/test_dashboard_browser.py``
   does) opens node 0's dashboard, asks ``DEMO_QUESTION`` greedily in the chat box, waits for the
   answer and for the page to count it, and saves the whole page to ``--out``.

It prints the answer and the dashboard's measured and predicted figures as one JSON object
(``--json FILE`` writes it there too). It takes a few minutes and all of the machine's cores:
run it on an otherwise idle machine, as the figures on the page are timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.bench.load import arrivals  # noqa: E402
from meshllm.client import Timed, get_json, stream_timed  # noqa: E402
from meshllm.commands.demo import DEMO_QUESTION, DEMO_WORKLOAD, demo_budgets  # noqa: E402
from meshllm.commands.up import LocalMesh, plan_lines  # noqa: E402

CHROMIUM = os.environ.get("MESHLLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def smollm2() -> str:
    out = subprocess.run([sys.executable, "-m", "meshllm.cli", "fetch", "smollm2", "--quiet"], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


async def drive(urls: list[str], duration: float, vocab: int, seed: int) -> list[Timed]:
    """The demo's workload for ``duration`` seconds: Poisson arrivals at its rate, prompts of its
    length, answers of exactly its length, over every node's API in turn."""
    import aiohttp

    rng = np.random.default_rng(seed)
    rate, n_in, n_out = float(DEMO_WORKLOAD["arrival_rate"]), int(DEMO_WORKLOAD["input_len"]), \
        int(DEMO_WORKLOAD["output_len"])
    at = arrivals(rng, rate, duration, 10_000)
    lo, hi = min(100, vocab // 4), vocab - 100
    prompts = [[int(x) for x in rng.integers(lo, hi, size=n_in)] for _ in at]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def one(i: int) -> Timed:
            await asyncio.sleep(max(0.0, t0 + at[i] - time.perf_counter()))
            body = {"prompt": prompts[i], "max_tokens": n_out, "temperature": 0, "ignore_eos": True}
            return await stream_timed(session, urls[i % len(urls)], body, limit_s=120.0)

        return list(await asyncio.gather(*(one(i) for i in range(len(at)))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: `meshllm fetch smollm2 --quiet`)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the demo's workload (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrivals and prompts")
    ap.add_argument("--out", default=str(ROOT / "docs/img/dashboard.png"), help="the screenshot (default %(default)s)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--width", type=int, default=1280, help="the page's width in pixels (default %(default)s)")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from meshllm.model.manifest import load_manifest

    model = args.model or smollm2()
    manifest = load_manifest(Path(model), verify=False)
    budgets = demo_budgets(Path(model), 3)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="meshllm-shot-", delete=False) as conf:
        conf.write("[workload]\n" + "".join(f"{k} = {v}\n" for k, v in DEMO_WORKLOAD.items()))
    try:
        with LocalMesh(3, model=model, budgets=",".join(str(b) for b in budgets), extra=["--config", conf.name]) as mesh:
            view = mesh.wait_ready(300)
            print("\n".join(plan_lines(view)), file=sys.stderr, flush=True)
            roles = {r["role"] for r in view["plan"]["replicas"]}
            if not {"prefill", "decoder"} <= roles:
                print(f"the planner made {sorted(roles)} replicas, not PREFILL and DECODER: no screenshot",
                      file=sys.stderr)
                return 1
            t0 = time.monotonic()
            results = asyncio.run(drive(mesh.urls, args.duration, manifest.config.vocab_size, args.seed))
            bad = [r.detail for r in results if r.outcome != "ok"]
            print(f"{len(results)} requests in {time.monotonic() - t0:.0f} s, {len(bad)} failed {bad[:3]}",
                  file=sys.stderr, flush=True)
            url = mesh.urls[0]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": args.width, "height": 1000})
                page.goto(url + "/")
                page.wait_for_selector("#status[data-ready=true]", timeout=30_000)
                page.fill("#temperature", "0")
                page.fill("#max-tokens", "60")
                page.fill("#chat-input", DEMO_QUESTION)
                page.click("#send")
                page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
                answer = page.text_content(".msg.assistant[data-state=done] .content")
                n = len(results) - len(bad) + 1
                page.wait_for_function(
                    f"document.getElementById('plan').textContent.includes('last {min(n, 64)} requests')",
                    timeout=15_000)
                page.wait_for_timeout(1500)  # one more poll: the decoders' load reports settle
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
            dash = get_json(url + "/v1/dashboard", timeout=10.0)
    finally:
        os.unlink(conf.name)
    out = {"question": DEMO_QUESTION, "answer": answer, "requests": len(results), "failed": len(bad),
           "plan": dash.get("plan"), "replicas": dash.get("replicas")}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    verdicts = [("plan", k, v) for k, v in ((dash.get("plan") or {}).get("compare") or {}).items()]
    verdicts += [(f"replica {r['id']}", k, v) for r in dash.get("replicas") or [] for k, v in (r.get("compare") or {}).items()]
    for where, k, v in verdicts:
        print(f"{where} {k}: measured {v['measured']}, predicted {v['predicted']}" + (f": {v['note']}" if v["off"] else ""),
              file=sys.stderr)
    print(f"screenshot: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
