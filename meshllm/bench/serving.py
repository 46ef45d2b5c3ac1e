"""Serving by strategy on real processes, beside the simulator: a heterogeneous mesh of node
processes on loopback serves one seeded trace under each strategy's plan, and the simulator serves
the same trace on the same plan with the profiles and links the nodes measured.

For each workload mix (the simulator's ``e2llm-vs-splitwise`` mixes, lengths scaled by
``--length-scale`` to fit a small model on a small machine) and each strategy, a mesh of ``--nodes``
processes with ``--slowdowns`` starts, planning for that mix (its lengths, and the highest load as
its arrival rate); the profiles are measured once, one node at a time, and every mesh reuses them,
so every strategy plans for the same devices. Loads are fractions of the splitwise plan's predicted
saturation rate (the simulator's definition of load in ``e2llm-vs-splitwise``): the same requests
(prompt and answer lengths, Poisson arrival times) for every strategy at a load.

Per cell (mix, load, strategy), ``measured`` and ``predicted`` carry the same keys:

- ``wait_ms`` / ``wait_p99_ms``: waiting time, defined alike on both sides as each request's TTFT
  minus the TTFT of the same request alone (the mesh otherwise idle: measured by sending every
  prompt of the trace one at a time first; predicted by simulating the requests 1000 s apart).
  Where a prompt runs uninterrupted once started, that is the simulator's waiting (arrival to the
  start of the first prefill micro-batch, also given as ``predicted.sim_wait_ms``); it also counts
  time a prompt's chunks wait behind other work once started, which the real scheduler interleaves.
  ``measured.entry_wait_ms`` is the entry's ``meshllm_request_waiting_seconds`` (acceptance to the
  prompt sent to a prefill replica, summed over every node's ``/metrics``, p99 interpolated in its
  buckets): it misses the time a prompt waits at its stage, which is all of a one-stage BOTH
  replica's waiting (its prompt goes with its reservation), so it cannot compare strategies;
- ``predicted_shared_cores`` (and ``error_pct_shared_cores``): the simulator told that the nodes
  share this machine's cores (``SimConfig.shared_cores``), as they do here; ``predicted`` is the
  simulator as it models a real mesh, every node on its own hardware; ``predicted.busy_nodes`` is
  how many nodes compute at once on average;
- load 0 is the first ``--idle`` requests of the trace one at a time (its ``wait_ms`` is the
  run-to-run noise of TTFT alone);
- ``ttft_ms`` / ``ttft_p99_ms``, ``tpot_ms`` / ``tpot_p99_ms``: means and p99 over completed
  requests (TPOT over requests with two tokens or more);
- ``tok_s``: tokens of completed requests over the time from the first arrival to the last token;
- ``completed``, ``rejected`` (429), ``errors``.

``error_pct`` gives the simulator's error on mean TTFT and TPOT, (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from meshllm.bench.load import resolve_model
from meshllm.client import Timed, get_json, get_text, stream_timed

STRATEGIES = ("e2llm", "splitwise", "edgeshard-throughput")
DEFAULT_MIXES = ("short-in/long-out", "long-in/short-out")
TARGETS = {"e2llm_wait_vs_splitwise": "<= 0.5 at the highest load where splitwise's mean wait >= 10 ms",
           "sim_error_ttft_tpot": "within 15% (aim 10%) for every strategy and load"}
WAIT_METRIC = "meshllm_request_waiting_seconds"
TTFT_METRIC = "meshllm_time_to_first_token_seconds"
COMPUTE_METRIC = "meshllm_stage_compute_cpu_seconds_total"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="node processes (default %(default)s)")
    p.add_argument("--slowdowns", default="1,1.5,2,3", help="compute slowdown per node (default %(default)s)")
    p.add_argument("--budgets", default=None, help="memory budget per node (default: none)")
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2 int4, else the bundled one)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="compared strategies (default %(default)s)")
    p.add_argument("--mixes", default=",".join(DEFAULT_MIXES),
                   help="workload mixes of `meshllm simulate e2llm-vs-splitwise` (default %(default)s)")
    p.add_argument("--loads", default="0.5,1.0", help="fractions of splitwise's predicted saturation rate")
    p.add_argument("--length-scale", type=float, default=0.125,
                   help="prompt and answer lengths of the mixes times this (default %(default)s)")
    p.add_argument("--count", type=int, default=12, help="requests per load (default %(default)s)")
    p.add_argument("--idle", type=int, default=4,
                   help="requests sent one at a time first, as load 0 (default %(default)s; 0: none)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences a decoder replica takes at once: the planner's workload and the nodes' "
                        "serve.max_batch alike (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per node (default 1)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an active plan")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw measured vs predicted here")
    p.add_argument("--quick", action="store_true", help="2 nodes, one mix, one load, 4 requests (for tests)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--record", default=None, metavar="FILE",
                   help="write the run's plans, profiles, links, trace and measurements here, for --replay")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="start no mesh: the simulator (as it is now) on a recorded run, beside its measurements")


# --- the trace (pure) -------------------------------------------------------------------------------

def scaled_mix(mix: str, scale: float) -> tuple[Any, Any]:
    """The simulator's mix ``mix`` with every length times ``scale`` (at least 1 prompt token and
    2 answer tokens, so TPOT is defined)."""
    from meshllm.planner.types import LengthDist
    from meshllm.sim.experiments import MIXES

    def sc(d: LengthDist, floor: int) -> LengthDist:
        if d.kind == "uniform":
            return LengthDist.uniform(max(floor, round(d.low * scale)), max(floor, round(d.high * scale)))
        if d.kind == "lognormal":
            return LengthDist.lognormal(max(floor, d.mean_ * scale), d.sigma, max(floor, round(d.high * scale)))
        if d.kind == "fixed":
            return LengthDist.fixed(max(floor, round(d.mean * scale)))
        raise ValueError(f"cannot scale a {d.kind} length")

    if mix not in MIXES:
        from meshllm.errors import UserError
        raise UserError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    inp, out = MIXES[mix]
    return sc(inp, 1), sc(out, 2)


def requests_for(inp: Any, out: Any, rate: float, count: int, seed: int, room: int) -> list[Any]:
    """``count`` requests with Poisson arrivals at ``rate`` (the first at 0), lengths from the mix,
    each fitting ``room`` tokens of context. The same seed gives every rate the same lengths and
    the same arrival pattern, stretched."""
    from meshllm.sim.workload import Request, poisson

    base = poisson(1.0, count, inp, out, np.random.default_rng(seed))
    t0 = base[0].arrival
    out_reqs = []
    for r in base:
        n_in, n_out = r.input_tokens, max(2, r.output_tokens)
        if n_in + n_out > room:
            s = room / (n_in + n_out)
            n_in, n_out = max(1, int(n_in * s)), max(2, int(n_out * s))
        out_reqs.append(Request(r.id, (r.arrival - t0) / rate, n_in, n_out))
    return out_reqs


def _ms(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(1000.0 * x, 2)


def figures(waits: Sequence[float], ttfts: Sequence[float], tpots: Sequence[float], tokens: int, wall_s: float,
            completed: int, rejected: int, errors: int, wait_mean: float | None = None,
            wait_p99: float | None = None) -> dict[str, Any]:
    """One side of a cell (seconds in, milliseconds out)."""
    def mean(xs: Sequence[float]) -> float | None:
        return float(np.mean(xs)) if len(xs) else None

    def p99(xs: Sequence[float]) -> float | None:
        return float(np.percentile(xs, 99)) if len(xs) else None

    return {"wait_ms": _ms(wait_mean if wait_mean is not None else mean(waits)),
            "wait_p99_ms": _ms(wait_p99 if wait_p99 is not None else p99(waits)),
            "ttft_ms": _ms(mean(ttfts)), "ttft_p99_ms": _ms(p99(ttfts)),
            "tpot_ms": _ms(mean(tpots)), "tpot_p99_ms": _ms(p99(tpots)),
            "tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
            "completed": completed, "rejected": rejected, "errors": errors}


def histogram(metrics: dict[str, float], name: str) -> tuple[float, float, list[tuple[float, float]]]:
    """(sum, count, [(upper bound, cumulative count)]) of a histogram in ``metric_values`` form."""
    buckets = []
    for k, v in metrics.items():
        if k.startswith(name + "_bucket{"):
            le = k.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), v))
    return metrics.get(name + "_sum", 0.0), metrics.get(name + "_count", 0.0), sorted(buckets)


def hist_delta(before: Sequence[dict[str, float]], after: Sequence[dict[str, float]],
               name: str) -> tuple[float | None, float | None]:
    """Mean and p99 (interpolated linearly within its bucket) of the observations a histogram got
    between ``before`` and ``after``, summed over nodes."""
    tot_sum, tot_n = 0.0, 0.0
    cum: dict[float, float] = {}
    for b, a in zip(before, after, strict=True):
        sb, nb, bb = histogram(b, name)
        sa, na, ba = histogram(a, name)
        tot_sum += sa - sb
        tot_n += na - nb
        prev = dict(bb)
        for le, c in ba:
            cum[le] = cum.get(le, 0.0) + c - prev.get(le, 0.0)
    if tot_n <= 0:
        return None, None
    target, lo, lo_c = 0.99 * tot_n, 0.0, 0.0
    for le, c in sorted(cum.items()):
        if c >= target:
            if math.isinf(le):
                return tot_sum / tot_n, lo
            return tot_sum / tot_n, lo + (le - lo) * ((target - lo_c) / max(c - lo_c, 1e-12))
        lo, lo_c = le, c
    return tot_sum / tot_n, lo


def error_pct(measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in ("ttft_ms", "tpot_ms", "wait_ms"):
        m, p = measured.get(k), predicted.get(k)
        out[k] = round(100.0 * (p - m) / m, 1) if m and p is not None else None
    return out


# --- the simulator on a live plan ---------------------------------------------------------------------

def mesh_problem(urls: Sequence[str], manifest: Any) -> tuple[Any, dict[str, Any], Any, list[dict[str, Any]]]:
    """(model profile, devices, network, profile documents) of a running mesh, as its nodes report
    them on ``GET /v1/profile``."""
    from meshllm.errors import MeshError

    docs = [get_json(u + "/v1/profile", timeout=10.0) for u in urls]
    if any(not d or not d.get("profile") for d in docs):
        raise MeshError("a node did not report its profile")
    return (*problem_from_docs(docs, manifest), docs)


def slowdowns_of(docs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each node's ``--slowdown``, as its profile document says."""
    return {d["node_id"]: float(d["profile"].get("slowdown", 1.0)) for d in docs}


def problem_from_docs(docs: Sequence[dict[str, Any]], manifest: Any) -> tuple[Any, dict[str, Any], Any]:
    """(model profile, devices, network) from the nodes' ``/v1/profile`` documents (pure)."""
    from meshllm.control.planning import known_devices, network_from_links
    from meshllm.planner.cost import ModelProfile
    from meshllm.runtime.runner import resident_costs

    devices = known_devices({d["node_id"]: d["profile"] for d in docs})
    network = network_from_links(sorted(devices), {d["node_id"]: d.get("links") or {} for d in docs})
    mp = ModelProfile.from_costs(resident_costs(manifest), manifest.name)
    return mp, devices, network


def predict(plan: Any, mp: Any, devices: dict[str, Any], network: Any, workload: Any,
            reqs: Sequence[Any], routing: str, shared_cores: float = 0.0,
            step_token_budget: int = 0, slowdowns: dict[str, float] | None = None,
            max_batch: int | None = None, entries: Sequence[str] | None = None,
            serve_cpu_s: float = 0.0, background_cores: float = 0.0) -> tuple[dict[str, Any], Any]:
    """The simulator's side of a cell, and its result. Its ``wait_ms`` is defined as the measured
    one (each request's TTFT minus its TTFT alone, see ``alone``); ``sim_wait_ms`` is the
    simulator's own (arrival to the first prefill micro-batch's start). ``entries``: the nodes
    whose APIs the requests went to, in turn (request i to ``entries[i % len(entries)]``, as
    ``_send`` sends them): the prompt comes from there and the tokens go back there.
    ``serve_cpu_s``: the serving path's CPU seconds per row of stage work on every node
    (``SimConfig.serve_cpu``; counted with shared cores only; see ``serving_cpu_per_row``);
    ``background_cores``: the cores other work on the machine took meanwhile (shared cores only)."""
    from meshllm.sim.adapter import to_sim_model
    from meshllm.sim.model import SimConfig
    from meshllm.sim.serving import simulate

    # a decoder replica takes as many sequences as its nodes let it (ServeConfig.max_batch), not
    # the workload's planning figure
    model = to_sim_model(plan, mp, devices, network, workload, max_batch=max_batch)
    # the stages' scheduler as the serving core runs it (iterations under the token budget); on
    # shared cores a slowed node computes 1/slowdown of its busy time and sleeps the rest
    config = SimConfig(routing=routing, shared_cores=shared_cores, step_token_budget=step_token_budget,
                       iterations=step_token_budget > 0,
                       core_share=tuple((n, 1.0 / max(1.0, f)) for n, f in sorted((slowdowns or {}).items())),
                       serve_cpu=tuple((n, serve_cpu_s) for n in sorted(devices)) if serve_cpu_s > 0 else (),
                       background_cores=background_cores if shared_cores > 0 else 0.0)
    if entries:
        reqs = [dataclasses.replace(r, entry=entries[i % len(entries)]) for i, r in enumerate(reqs)]
    res = simulate(model, list(reqs), config)
    recs = res.records
    apart = [dataclasses.replace(r, arrival=1000.0 * i) for i, r in enumerate(reqs)]
    alone = {r.id: r.ttft_s for r in simulate(model, apart, config).records}
    first = min(r.arrival for r in recs)
    wall = max(r.finish for r in recs) - first
    side = figures([max(0.0, r.ttft_s - alone[r.id]) for r in recs], [r.ttft_s for r in recs],
                   [t for r in recs if (t := r.tpot_s) is not None], sum(r.output_tokens for r in recs), wall,
                   len(recs), 0, 0)
    side["sim_wait_ms"] = _ms(float(np.mean([r.waiting_s for r in recs])))
    # nodes computing at once, on average over the cell: on one machine they share its cores
    side["busy_nodes"] = round(sum(res.busy_s.values()) / wall, 2) if wall > 0 else None
    if slowdowns is not None:  # a slowed node computes for busy / slowdown and sleeps the rest
        side["compute_cpu_s"] = round(sum(b / slowdowns.get(n, 1.0) for n, b in res.busy_s.items()), 3)
    side["stage_rows"] = sum(res.rows.values())  # prompt micro-batches and decode sequences, every stage
    side["stage_jobs"] = sum(res.jobs.values())
    if serve_cpu_s > 0:
        side["serve_cpu_s"] = round(sum(res.serve_s.values()), 3)
    return side, res


def serving_cpu_per_row(measured: dict[str, Any], predicted: dict[str, Any]) -> float | None:
    """The serving path's CPU seconds per row of stage work (a prompt micro-batch or a decoded
    sequence, at every stage), measured on a cell: what the node processes spent besides the
    model's compute (frames, the stage core, HTTP and SSE at the entries, a slowed node's spin)
    on the same cores, over the rows the simulator served for the same requests
    (``stage_rows``). The nodes' own count where they gave it (``serve_cpu_s``: each process's
    CPU seconds less its runners'), else the processes' CPU seconds (``cpu_s``) less the
    simulator's compute (``compute_cpu_s``: older records); None without CPU figures."""
    rows = predicted.get("stage_rows")
    if not rows:
        return None
    serve = measured.get("serve_cpu_s")
    if serve and all(c is not None for c in serve):
        return max(0.0, sum(serve)) / rows
    cpu, compute = measured.get("cpu_s"), predicted.get("compute_cpu_s")
    if not cpu or any(c is None for c in cpu) or compute is None:
        return None
    return max(0.0, sum(cpu) - compute) / rows


def saturation(plan: Any, mp: Any, devices: dict[str, Any], network: Any, workload: Any, inp: Any, out: Any,
               room: int, seed: int, routing: str) -> float:
    """The plan's predicted saturation rate for the mix (``experiments.saturation_rate``: a batch
    that all arrives at once, its completion rate between the 10th and 90th percentile)."""
    from meshllm.sim.adapter import to_sim_model
    from meshllm.sim.experiments import saturation_rate
    from meshllm.sim.model import SimConfig
    from meshllm.sim.serving import simulate
    from meshllm.sim.workload import Request

    reqs = [Request(r.id, 0.0, r.input_tokens, r.output_tokens)
            for r in requests_for(inp, out, 1.0, 60, seed + 1, room)]
    model = to_sim_model(plan, mp, devices, network, workload)
    return saturation_rate(simulate(model, reqs, SimConfig(routing=routing)))


# --- the shell ----------------------------------------------------------------------------------------

async def _send(urls: Sequence[str], reqs: Sequence[Any], vocab: int, seed: int,
                limit_s: float, one_at_a_time: bool = False) -> tuple[list[Timed], float]:
    import aiohttp

    rng = np.random.default_rng([seed, 7])
    lo, hi = min(100, vocab // 4), max(min(100, vocab // 4) + 1, vocab - 100)
    prompts = [[int(x) for x in rng.integers(lo, hi, size=r.input_tokens)] for r in reqs]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def one(i: int) -> Timed:
            await asyncio.sleep(max(0.0, t0 + reqs[i].arrival - time.perf_counter()))
            body = {"prompt": prompts[i], "max_tokens": reqs[i].output_tokens, "temperature": 0, "ignore_eos": True}
            return await stream_timed(session, urls[i % len(urls)], body, limit_s=limit_s)

        if one_at_a_time:
            results = [await stream_timed(session, urls[i % len(urls)],
                                          {"prompt": prompts[i], "max_tokens": reqs[i].output_tokens,
                                           "temperature": 0, "ignore_eos": True}, limit_s=limit_s)
                       for i in range(len(reqs))]
        else:
            results = list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))
    ends = [r.token_times[-1] for r in results if r.token_times]
    return results, (max(ends) if ends else time.perf_counter()) - t0


def machine_busy_s() -> float | None:
    """CPU seconds this machine's cores have been busy so far, every core together: all but idle
    and I/O wait, the hypervisor's steal included (``/proc/stat``; None where there is none)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user and nice]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK") if len(f) >= 8 else None


def cpu_seconds(pids: Sequence[int]) -> list[float | None]:
    """User plus system CPU seconds each process has used so far (None where it is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: list[float | None] = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            out.append(None)
    return out


def _metrics(urls: Sequence[str]) -> list[dict[str, float]]:
    from meshllm.client import metric_values

    return [metric_values(get_text(u + "/metrics", timeout=10.0) or "") for u in urls]


def _dashboards(urls: Sequence[str]) -> list[dict[str, Any]]:
    return [get_json(u + "/v1/dashboard/node", timeout=10.0) or {} for u in urls]


def by_prefill_replica(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per prefill replica (``"epoch:replica"``), over every entry's dashboard (``GET
    /v1/dashboard/node``, its ``measured.replicas`` sums): the requests whose prompt it prefilled between
    ``before`` and ``after``, their mean time to first token and mean wait (arrival to the prefill's
    start) in ms. Pure. The dashboards keep a replica's last 64 requests (``web.dashboard.WINDOW``):
    a replica that had served that many before is left out (the bench sends fewer to a mesh)."""
    acc: dict[str, dict[str, Any]] = {}
    for b, a in zip(before, after, strict=True):
        mb, ma = (b.get("measured") or {}).get("replicas") or {}, (a.get("measured") or {}).get("replicas") or {}
        for key, doc in ma.items():
            pa, pb = (doc or {}).get("prefill") or {}, (mb.get(key) or {}).get("prefill") or {}
            n = int(pa.get("n", 0)) - int(pb.get("n", 0))
            if n <= 0 or int(pa.get("n", 0)) >= 64:
                continue
            cur = acc.setdefault(key, {"n": 0, "ttft_s": [0.0, 0], "wait_s": [0.0, 0]})
            cur["n"] += n
            for f in ("ttft_s", "wait_s"):
                sa, sb = pa.get(f) or [0.0, 0], pb.get(f) or [0.0, 0]
                cur[f][0] += float(sa[0]) - float(sb[0])
                cur[f][1] += int(sa[1]) - int(sb[1])
    return {key: {"n": v["n"], **{f[:-2] + "_ms": _ms(v[f][0] / v[f][1]) if v[f][1] > 0 else None
                                  for f in ("ttft_s", "wait_s")}}
            for key, v in sorted(acc.items())}


def alone(urls: Sequence[str], reqs: Sequence[Any], vocab: int, seed: int, limit_s: float) -> list[float | None]:
    """Each request's TTFT with the mesh otherwise idle: the same prompt (and entry), two tokens
    asked, one request at a time."""
    two = [type(r)(r.id, 0.0, r.input_tokens, 2) for r in reqs]
    results, _ = asyncio.run(_send(urls, two, vocab, seed, limit_s, one_at_a_time=True))
    return [r.ttft if r.outcome == "ok" else None for r in results]


def measure(urls: Sequence[str], reqs: Sequence[Any], vocab: int, seed: int, limit_s: float,
            one_at_a_time: bool = False, alone_ttft: Sequence[float | None] | None = None,
            pids: Sequence[int] = ()) -> tuple[dict[str, Any], list[list[float | None]]]:
    """One side of a cell, and per request [TTFT, TPOT, TTFT alone] in seconds (None where it
    did not complete). ``pids``: the node processes, whose CPU time during the cell is counted."""
    before = _metrics(urls)
    dash0 = _dashboards(urls)
    cpu0 = cpu_seconds(pids)
    busy0, t0 = machine_busy_s(), time.perf_counter()
    load0 = os.getloadavg()[0]
    results, wall = asyncio.run(_send(urls, reqs, vocab, seed, limit_s, one_at_a_time))
    cpu1 = cpu_seconds(pids)
    busy1, t1 = machine_busy_s(), time.perf_counter()
    after = _metrics(urls)
    dash1 = _dashboards(urls)
    wmean, wp99 = hist_delta(before, after, WAIT_METRIC)
    ok = [r for r, q in zip(results, reqs, strict=True)
          if r.outcome == "ok" and len(r.token_times) == q.output_tokens]
    waits = [max(0.0, r.ttft - a) for r, q, a in zip(results, reqs, alone_ttft or [None] * len(reqs), strict=True)
             if r.outcome == "ok" and len(r.token_times) == q.output_tokens and r.ttft is not None and a is not None]
    side = figures(waits, [t for r in ok if (t := r.ttft) is not None], [t for r in ok if (t := r.tpot) is not None],
                   sum(len(r.token_times) for r in ok), wall, len(ok), sum(r.outcome == "429" for r in results),
                   len(results) - len(ok) - sum(r.outcome == "429" for r in results))
    # the entry's own histogram: acceptance to the prompt sent to a prefill replica (where the
    # prompt then waits at its stage is not in it)
    side["entry_wait_ms"], side["entry_wait_p99_ms"] = _ms(wmean), _ms(wp99)
    # the entries' own TTFT (acceptance to the first token at the entry): the client's TTFT less
    # this is HTTP, SSE and the client, on the same cores
    side["entry_ttft_ms"] = _ms(hist_delta(before, after, TTFT_METRIC)[0])
    # which replica prefilled how many of the cell's prompts, and how long they took there
    side["by_prefill_replica"] = by_prefill_replica(dash0, dash1)
    # CPU seconds the node processes used during the cell (the model's compute and the shells')
    if pids:
        side["cpu_s"] = [None if a is None or b is None else round(b - a, 3) for a, b in zip(cpu0, cpu1, strict=True)]
        # of which the nodes' runners computed (the nodes' own count), and the rest: their serving
        # path's CPU (frames, the stage core, HTTP and SSE)
        comp = [None if COMPUTE_METRIC not in b or COMPUTE_METRIC not in a else round(a[COMPUTE_METRIC] - b[COMPUTE_METRIC], 3)
                for b, a in zip(before, after, strict=True)]
        if len(comp) == len(side["cpu_s"]) and all(c is not None for c in comp + side["cpu_s"]):
            side["runner_cpu_s"] = comp
            side["serve_cpu_s"] = [round(c - r, 3) for c, r in zip(side["cpu_s"], comp, strict=True)]
    # the machine's contention while the cell ran (1-minute load average, before and after), and
    # the cores other work took meanwhile (every core's busy time, the hypervisor's steal
    # included, less the nodes' CPU: the client, other programs), on average over the cell
    side["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if busy0 is not None and busy1 is not None and side.get("cpu_s") and None not in side["cpu_s"] and t1 > t0:
        side["other_cores"] = round(max(0.0, busy1 - busy0 - sum(side["cpu_s"])) / (t1 - t0), 3)
    errs = sorted({r.detail or "answer cut short" for r in results if r.outcome == "error"})
    if errs:
        side["error_examples"] = errs[:3]
    per = [[r.ttft if done else None, r.tpot if done else None, a]
           for r, q, a in zip(results, reqs, alone_ttft or [None] * len(reqs), strict=True)
           for done in [r.outcome == "ok" and len(r.token_times) == q.output_tokens]]
    return side, per


class Shell(Protocol):
    """A mesh of node processes the experiment drives: ``LocalMesh`` on loopback, or the network
    lab's mesh in namespaces (``tools/netlab.py serve``). Not started until entered."""

    n: int

    @property
    def urls(self) -> list[str]: ...

    def state_dir(self, i: int) -> Path: ...

    def premeasure(self) -> None: ...

    def wait_ready(self, timeout: float) -> dict[str, Any]: ...

    def check_alive(self) -> None: ...

    def pids(self) -> list[int]: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


Launch = Callable[[str], Shell]
"""A strategy's mesh, not yet started (the nodes read the workload from the environment)."""


def _copy_profiles(src: Path | None, mesh: Shell) -> Path:
    """Measure each node's profile once (one node at a time), then give every later mesh a copy
    (where the environment gives the nodes one ``profile_dir``, they all read it there: no copies)."""
    from meshllm.settings import profile_dir_setting

    shared = profile_dir_setting(os.environ)
    if shared is not None:
        if src is None:
            mesh.premeasure()
        return shared
    if src is None:
        mesh.premeasure()
        keep = Path(tempfile.mkdtemp(prefix="meshllm-bench-serving-profiles-"))
        for i in range(mesh.n):
            shutil.copytree(mesh.state_dir(i) / "profiles", keep / f"state-{i}" / "profiles")
        return keep
    for i in range(mesh.n):
        shutil.copytree(src / f"state-{i}" / "profiles", mesh.state_dir(i) / "profiles", dirs_exist_ok=True)
    return src


def judged_cell(mix: str, load: float, rate: float, strategy: str, measured: dict[str, Any], plan: Any, mp: Any,
                devices: dict[str, Any], network: Any, wl: Any, reqs: Sequence[Any], routing: str, budget: int,
                cores: float, slowdowns: dict[str, float] | None = None,
                max_batch: int | None = None, entries: Sequence[str] | None = None,
                serve_cpu_s: float | None = None) -> dict[str, Any]:
    """A cell: what was measured, the simulator's prediction (each node on its own hardware), the
    same told that the nodes share ``cores`` (as on one machine), and the errors. ``slowdowns``
    (per node) turn the simulator's busy time into the CPU time its compute takes
    (``compute_cpu_s``, beside the measured ``cpu_s``); ``entries``: see ``predict``.
    ``serve_cpu_s``: the serving path's CPU per row of stage work, measured on the same mesh's
    cell one request at a time (``serving_cpu_per_row``), which the shared-cores prediction
    counts (``serve_cpu_per_row_ms`` of its shared-cores side); the cell's own is the measured
    side's ``serve_cpu_per_row_ms``."""
    measured = dict(measured)
    predicted, _ = predict(plan, mp, devices, network, wl, reqs, routing, step_token_budget=budget,
                           slowdowns=slowdowns, max_batch=max_batch, entries=entries)
    # the cores other work took while the cell ran share the machine with the nodes
    background = float(measured.get("other_cores") or 0.0)
    shared, _ = predict(plan, mp, devices, network, wl, reqs, routing, cores, budget, slowdowns, max_batch,
                        entries, serve_cpu_s or 0.0, background)
    if background:
        shared["background_cores"] = background
    own = serving_cpu_per_row(measured, predicted)
    if own is not None:
        measured["serve_cpu_per_row_ms"] = round(own * 1e3, 3)
    if serve_cpu_s is not None:
        shared["serve_cpu_per_row_ms"] = round(serve_cpu_s * 1e3, 3)
    if load == 0.0:  # requests 1000 s apart: a rate would mean nothing
        predicted["tok_s"] = measured["tok_s"] = shared["tok_s"] = None
    return {"mix": mix, "load": load, "rate_rps": rate, "strategy": strategy, "measured": measured,
            "predicted": predicted, "predicted_shared_cores": shared, "error_pct": error_pct(measured, predicted),
            "error_pct_shared_cores": error_pct(measured, shared)}


def _calibrate(serve: dict[tuple[str, str], float], cell: dict[str, Any]) -> None:
    """After a mesh's cell one request at a time (load 0): its serving CPU per row, which the
    mesh's loaded cells are then predicted with (on shared cores)."""
    got = cell["measured"].get("serve_cpu_per_row_ms")
    if cell["load"] == 0.0 and got is not None:
        serve[cell["mix"], cell["strategy"]] = got / 1e3


def replay(record: dict[str, Any]) -> dict[str, Any]:
    """The simulator as it is now on a recorded run (``--record``): every cell predicted again on
    the run's plans, profiles, measured links and trace, beside the run's measurements (pure but
    for reading the model's manifest)."""
    from meshllm.model.manifest import load_manifest
    from meshllm.planner.types import Plan, Workload
    from meshllm.serve.config import ServeConfig
    from meshllm.sim.workload import Request

    manifest = load_manifest(Path(record["model"]), verify=False)
    max_batch = ServeConfig().max_batch  # what the nodes ran with when the record does not say
    problems = {}
    for mix, by_strat in record["meshes"].items():
        for strat, m in by_strat.items():
            problems[mix, strat] = (Plan.from_dict(m["plan"]), *problem_from_docs(m["profiles"], manifest),
                                    Workload.from_dict(m["workload"]), slowdowns_of(m["profiles"]),
                                    [d["node_id"] for d in m["profiles"]])
    cells = []
    serve: dict[tuple[str, str], float] = {}  # per mesh: its serving CPU per row, measured one at a time
    for c in record["cells"]:
        plan, mp, devices, network, wl, slow, entries = problems[c["mix"], c["strategy"]]
        reqs = [Request(int(i), float(a), int(n_in), int(n_out)) for i, a, n_in, n_out in c["requests"]]
        cells.append(judged_cell(c["mix"], c["load"], c.get("rate_rps", 0.0), c["strategy"], c["measured"], plan, mp,
                                 devices, network, wl, reqs, record["routing"], record["step_token_budget"],
                                 float(record["cores"]), slow, int(record.get("max_batch", max_batch)),
                                 entries, serve.get((c["mix"], c["strategy"])) if c["load"] else None))
        _calibrate(serve, cells[-1])
    return {"bench": "serving", "replay": True, **record["about"], "cells": cells, "judged": judge(cells)}


def run(args: argparse.Namespace) -> int:
    """``meshllm bench serving``: the experiment on loopback."""
    from meshllm.commands.up import LocalMesh

    if args.quick:
        args.slowdowns = ",".join(args.slowdowns.split(",")[:2])

    def launch(strategy: str) -> Shell:
        return LocalMesh(args.nodes, model=args.model, slowdowns=args.slowdowns, budgets=args.budgets,
                         threads=args.threads, strategy=strategy, measure_first=False)

    return experiment(args, launch, {"mesh": "loopback", "slowdowns": args.slowdowns})


def experiment(args: argparse.Namespace, launch: Launch, about: dict[str, Any]) -> int:
    """The serving experiment on the meshes ``launch`` makes (one per mix and strategy; ``args`` as
    ``register`` defines them; ``args.model`` is resolved to a directory before the first launch):
    the trace, the driver, the simulator on each live plan and the judgement. ``about`` (how the
    mesh is made) goes into the output as it is. With ``args.replay``, no mesh: ``replay``."""
    from meshllm.errors import UserError

    if args.replay:
        try:
            again = replay(json.loads(Path(args.replay).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--replay {args.replay}: not a recorded run ({type(e).__name__}: {e})") from None
        if args.plot:
            plot(again["cells"], args.plot)
        print(json.dumps(again) if args.json else json.dumps(again["judged"]))
        return 0
    from meshllm.model.manifest import load_manifest
    from meshllm.planner.types import Plan, Workload
    from meshllm.serve.config import ServeConfig
    from meshllm.sim.routing import policy_for
    from meshllm.sim.workload import Request

    if args.quick:
        args.nodes, args.count, args.idle = min(args.nodes, 2), min(args.count, 4), min(args.idle, 2)
        args.mixes, args.loads = args.mixes.split(",")[0], args.loads.split(",")[0]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    try:
        loads = sorted(float(x) for x in args.loads.split(",") if x.strip())
    except ValueError:
        raise UserError("--loads: comma-separated fractions, e.g. 0.5,1.0") from None
    if not strategies or not mixes or not loads or min(loads) <= 0 or args.count < 2 or args.length_scale <= 0:
        raise UserError("need strategies, mixes, positive loads, --count >= 2 and a positive --length-scale")
    # the simulator's load axis is splitwise's saturation: it runs first
    order = sorted(strategies, key=lambda s: s != "splitwise")
    model, note = resolve_model(args.model)
    manifest = load_manifest(Path(model), verify=False)
    cfg = manifest.config
    room = cfg.max_position - 1
    routing = policy_for("waiting")  # the nodes' default objective is waiting: their router's policy
    # the stages interleave prompt chunks with decode steps under this budget: the simulator too
    budget = ServeConfig().step_token_budget
    # sequences a decoder replica's nodes take at once: the workload's figure, which the planner
    # plans with, the load axis (splitwise's saturation) is computed at and the simulator predicts
    # with. The nodes once kept their own default of 64 while the planner was told 8: splitwise's
    # "saturation" then left its decoders room for 8 times the sequences, and it hardly queued
    max_batch = args.max_batch
    args.model = model
    out: dict[str, Any] = {"bench": "serving", "model": Path(model).name, "nodes": args.nodes, **about,
                           "length_scale": args.length_scale, "count": args.count,
                           "seed": args.seed, "routing": routing, "step_token_budget": budget,
                           "cells": [], "plans": {}, "links_mbps": {}, "saturation_rps": {}}
    if note:
        out["note"] = note
    t_start = time.perf_counter()
    # a terminated bench still stops its nodes (the meshes are context managers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profiles_dir: Path | None = None
    serve: dict[tuple[str, str], float] = {}  # per mesh: its serving CPU per row, measured one at a time
    env_before = dict(os.environ)
    # what the simulator needs to predict every cell again, and what was measured (``--replay``)
    record: dict[str, Any] = {"model": model, "routing": routing, "step_token_budget": budget, "max_batch": max_batch,
                              "cores": os.cpu_count() or 1, "about": about, "meshes": {}, "cells": []}
    try:
        for mix in mixes:
            inp, outl = scaled_mix(mix, args.length_scale)
            sat: float | None = None
            for strat in order:
                wl = Workload(arrival_rate=1.0, input_len=inp, output_len=outl, max_batch=args.max_batch)
                # the nodes plan for this mix (its lengths; the highest load's rate once known)
                rate_hi = (sat or 1.0) * max(loads)
                os.environ.update({"MESHLLM_WORKLOAD_INPUT_LEN": json.dumps(inp.to_dict()),
                                   "MESHLLM_WORKLOAD_OUTPUT_LEN": json.dumps(outl.to_dict()),
                                   "MESHLLM_WORKLOAD_ARRIVAL_RATE": f"{rate_hi:.6g}",
                                   "MESHLLM_WORKLOAD_MAX_BATCH": str(args.max_batch),
                                   "MESHLLM_SERVE_MAX_BATCH": str(max_batch)})
                mesh = launch(strat)
                profiles_dir = _copy_profiles(profiles_dir, mesh)
                with mesh:
                    view = mesh.wait_ready(args.timeout)
                    plan = Plan.from_dict(view["plan"])
                    out["plans"].setdefault(mix, {})[strat] = [
                        {"role": r.role.value, "stages": [[s.node[:8], s.first, s.end] for s in r.stages]}
                        for r in plan.replicas]
                    mp, devices, network, docs = mesh_problem(mesh.urls, manifest)
                    record["meshes"].setdefault(mix, {})[strat] = {"plan": view["plan"], "profiles": docs,
                                                                   "workload": wl.to_dict()}
                    # the links the nodes measured, which the simulator is given
                    out["links_mbps"].setdefault(mix, {})[strat] = {
                        f"{ln.a[:8]}-{ln.b[:8]}": round(ln.mbps, 1) for ln in network.links}
                    if sat is None:
                        sat = saturation(plan, mp, devices, network, wl, inp, outl, room, args.seed, routing)
                        out["saturation_rps"][mix] = round(sat, 3)
                    # one warm-up request per node: sessions and caches are ready before the trace
                    asyncio.run(_send(mesh.urls, requests_for(inp, outl, 1.0, len(mesh.urls), args.seed + 9, room),
                                      cfg.vocab_size, args.seed, args.request_timeout))
                    # every load sends the same prompts (only the arrivals differ): their TTFT alone
                    base = requests_for(inp, outl, 1.0, args.count, args.seed, room)
                    ttft_alone = alone(mesh.urls, base, cfg.vocab_size, args.seed, args.request_timeout)
                    for load in ([0.0] if args.idle > 0 else []) + loads:
                        if load == 0.0:  # one request at a time: the model's error without queueing
                            reqs = [Request(r.id, 1000.0 * i, r.input_tokens, r.output_tokens)
                                    for i, r in enumerate(base[:args.idle])]
                        else:
                            reqs = requests_for(inp, outl, load * sat, args.count, args.seed, room)
                        measured, per = measure(mesh.urls, reqs, cfg.vocab_size, args.seed,
                                                args.request_timeout, one_at_a_time=load == 0.0,
                                                alone_ttft=ttft_alone[:len(reqs)], pids=mesh.pids())
                        out["cells"].append(judged_cell(mix, load, round(load * sat, 3) if load else 0.0, strat,
                                                        measured, plan, mp, devices, network, wl, reqs, routing,
                                                        budget, float(os.cpu_count() or 1), slowdowns_of(docs),
                                                        max_batch, [d["node_id"] for d in docs],
                                                        serve.get((mix, strat)) if load else None))
                        _calibrate(serve, out["cells"][-1])
                        record["cells"].append({"mix": mix, "load": load, "strategy": strat,
                                                "rate_rps": out["cells"][-1]["rate_rps"],
                                                "requests": [[r.id, r.arrival, r.input_tokens, r.output_tokens]
                                                             for r in reqs],
                                                "measured": measured, "per_request": per})
                        print(json.dumps(out["cells"][-1]), file=sys.stderr, flush=True)
                    mesh.check_alive()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        if profiles_dir is not None:  # the profiles kept for the run's later meshes
            shutil.rmtree(profiles_dir, ignore_errors=True)
    out["judged"] = judge(out["cells"])
    out["bench_s"] = round(time.perf_counter() - t_start, 1)
    if args.record:
        Path(args.record).write_text(json.dumps(record))
    out["targets"] = TARGETS
    if args.plot:
        plot(out["cells"], args.plot)
    if args.json:
        print(json.dumps(out))
    else:
        for c in out["cells"]:
            m, p = c["measured"], c["predicted"]
            print(f"{c['mix']:18s} load {c['load']:<4g} {c['strategy']:21s} "
                  + " ".join(f"{k} {m.get(k)}/{p.get(k)}" for k in ("wait_ms", "ttft_ms", "tpot_ms", "tok_s")))
        print(json.dumps(out["judged"]))
    sys.stdout.flush()
    return 0


def judge(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per mix at its highest load: e2llm's measured mean wait over splitwise's; and the worst
    simulator error on mean TTFT and TPOT over every cell."""
    out: dict[str, Any] = {"wait_ratio_at_highest_load": {}}
    for mix in sorted({c["mix"] for c in cells}):
        top = max(c["load"] for c in cells if c["mix"] == mix)
        w = {c["strategy"]: c["measured"].get("wait_ms") for c in cells if c["mix"] == mix and c["load"] == top}
        ew = {c["strategy"]: c["measured"].get("entry_wait_ms") for c in cells if c["mix"] == mix and c["load"] == top}
        e, s = w.get("e2llm"), w.get("splitwise")
        ee, es = ew.get("e2llm"), ew.get("splitwise")
        out["wait_ratio_at_highest_load"][mix] = {
            "load": top, "e2llm_wait_ms": e, "splitwise_wait_ms": s,
            "ratio": round(e / s, 3) if e is not None and s else None,
            "splitwise_queues": bool(s is not None and s >= 10.0),
            # the same on the entry's wait (arrival to the prefill's start: what the planner
            # minimises and the simulator's own claim measures)
            "e2llm_entry_wait_ms": ee, "splitwise_entry_wait_ms": es,
            "entry_ratio": round(ee / es, 3) if ee is not None and es else None}
    errs = [abs(v) for c in cells for k, v in c["error_pct"].items() if k in ("ttft_ms", "tpot_ms") and v is not None]
    out["max_abs_error_pct_ttft_tpot"] = max(errs) if errs else None
    out["cells_within_15pct"] = sum(
        1 for c in cells if all(c["error_pct"].get(k) is not None and abs(c["error_pct"][k]) <= 15
                                for k in ("ttft_ms", "tpot_ms")))
    out["cells_within_15pct_shared_cores"] = sum(
        1 for c in cells if all((c.get("error_pct_shared_cores") or {}).get(k) is not None
                                and abs(c["error_pct_shared_cores"][k]) <= 15 for k in ("ttft_ms", "tpot_ms")))
    shared = [abs(v) for c in cells for k, v in (c.get("error_pct_shared_cores") or {}).items()
              if k in ("ttft_ms", "tpot_ms") and v is not None]
    out["max_abs_error_pct_ttft_tpot_shared_cores"] = max(shared) if shared else None
    idle = [abs(v) for c in cells if c["load"] == 0 for k, v in c["error_pct"].items()
            if k in ("ttft_ms", "tpot_ms") and v is not None]
    out["max_abs_error_pct_ttft_tpot_one_at_a_time"] = max(idle) if idle else None
    out["cells"] = len(cells)
    return out


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def plot(cells: Sequence[dict[str, Any]], path: str) -> None:
    """Measured (filled) vs predicted (hollow) mean wait, TTFT and TPOT per strategy and load, a row
    per mix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = sorted({c["mix"] for c in cells})
    strats = list(dict.fromkeys(c["strategy"] for c in cells))
    keys = (("wait_ms", "mean wait (ms)"), ("ttft_ms", "mean TTFT (ms)"), ("tpot_ms", "mean TPOT (ms)"))
    fig, axes = plt.subplots(len(mixes), 3, figsize=(12, 3.2 * len(mixes)), squeeze=False)
    colors = dict(zip(strats, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=False))
    for i, mix in enumerate(mixes):
        for j, (k, label) in enumerate(keys):
            ax = axes[i][j]
            for s in strats:
                cs = sorted((c for c in cells if c["mix"] == mix and c["strategy"] == s), key=lambda c: c["load"])
                xs = [c["load"] for c in cs]
                ax.plot(xs, [_nan(c["measured"].get(k)) for c in cs], "o-", color=colors[s],
                        label=f"{s} measured")
                ax.plot(xs, [_nan(c["predicted"].get(k)) for c in cs], "s--", color=colors[s],
                        mfc="none", label=f"{s} predicted")
                if all("predicted_shared_cores" in c for c in cs):
                    ax.plot(xs, [_nan(c["predicted_shared_cores"].get(k)) for c in cs], "x:",
                            color=colors[s], label=f"{s} predicted, cores shared")
            ax.set_title(f"{mix}: {label}", fontsize=9)
            ax.set_xlabel("load (fraction of splitwise's predicted saturation)", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
