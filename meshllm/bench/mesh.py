"""Mesh serving speed on loopback: N node processes vs one process, side by side in one run.

The same model runs in this process (one ``StageRunner`` over every block, the nodes' thread
count) and on a mesh of N ``meshllm node`` processes on 127.0.0.1 that splits one replica over
all of them (``--strategy ring`` by default: every node a stage). Reported:

- ``single_decode_ms``: one process, ms per decode step at batch 1 (median of a block's steps);
  it stays loaded while the mesh runs, and its blocks of ``--tokens`` steps take turns with the
  mesh's requests of as many tokens, ``--rounds`` rounds, the order alternating; each figure below
  is the median of its rounds;
- ``ttft_ms``: time to the first streamed token of a request through the mesh;
- ``decode_tok_s_1``: one request's decode tokens/s through the mesh (first to last token);
- ``aggregate_tok_s_8``: tokens/s of 8 concurrent requests; ``batch_speedup`` = that / 1 request;
- ``per_hop_overhead_ms``: (mesh ms/token − one-process ms/token) / hops, a hop being a stage
  boundary of the decode ring (S stages: S − 1 forward hops and the tokens back to stage 0), each
  round's mesh against the same round's one process (``per_hop_overhead_ms_rounds``);
- ``mesh_compute_ms``: the stages' own onnxruntime time per token (each node reports it), and
  ``serving_overhead_per_hop_ms`` = (mesh ms/token − that) / hops: what the serving path itself
  costs, apart from compute that runs slower split over processes than in one;
- ``predicted_decode_ms`` / ``measured_decode_ms``: the planner's latency per token for the active
  plan (its prefill included, at the workload's lengths) beside the same figure measured with
  a request of those lengths;
- ``rss_mb``: each node's resident memory after the runs;
- ``bunched_share_1`` / ``bunched_share_8``: the share of a stream's token events that reached
  the client less than 1 ms after the one before (tokens held back and let go together: a
  stream that falls behind its steps), one request and the 8 concurrent ones; ``gap_p99_ms_8``:
  the 99th percentile of the gaps between a stream's token events, the 8 concurrent ones.

``--speculate`` measures speculative decoding instead (``serve/spec.py``), on ``--model`` (a chat
model with a tokenizer, e.g. SmolLM2): the prompt sets of ``bench/spec_prompts.py`` ("echo-heavy":
rewrite or edit what the prompt gives; "free": open questions), each set ``--rounds`` times, every
prompt answered with speculation off and on one after the other, the order alternating from prompt
to prompt and round to round (``spec_orders``), on a ``--nodes``-stage mesh whose stages hold every
frame they send ``--hop-delay-ms`` (``serve.hop_delay_ms``: netem is not available on loopback) and
on one node. Keys: ``echo_mesh_speedup``, ``echo_one_node_speedup`` (tok/s with / without: the
median over the rounds of each round's ratio), ``free_speedup`` (the lower of the mesh's and the
one node's), ``tokens_identical`` (greedy in every round and seeded, every prompt),
``acceptance`` (drafts kept per drafted step, per set); each set's ``rounds`` hold the per-round
figures, ``speedup_min`` / ``speedup_max`` their spread.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = {"per_hop_overhead_ms": "<= 1.0 (aim 0.5)", "batch_speedup": ">= 2.0 (4 nodes, 8 requests)",
           "decode_prediction_error": "<= 0.2"}


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="node processes (default %(default)s)")
    p.add_argument("--preset", default="bench", choices=["tiny", "small", "bench"],
                   help="random model of this shape (default bench, ~125M parameters)")
    p.add_argument("--model", default=None, help="a model directory instead of a random preset")
    p.add_argument("--strategy", default="ring", help="placement strategy of the mesh (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per node and here (default 1)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default %(default)s)")
    p.add_argument("--concurrent", type=int, default=8, help="requests at once for the aggregate figure")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--wake-qos", action="store_true",
                   help="nodes hold a CPU wake-up latency request of 0 while they decode (serve.wake_qos; needs "
                        "write access to /dev/cpu_dma_latency), and so does the one process while it steps")
    p.add_argument("--speculate", action="store_true",
                   help="speculative decoding with / without, side by side: the echo-heavy and free prompt sets "
                        "(chat, needs --model with a tokenizer, e.g. SmolLM2) on the mesh and on one node")
    p.add_argument("--no-cost-aware", action="store_true",
                   help="with --speculate: draft the acceptance-adapted length whatever the steps cost "
                        "(serve.spec_cost_aware = false)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds of the one process and the mesh taking turns, the order alternating (default "
                        "%(default)s; each figure the median of its rounds); with --speculate: times each prompt "
                        "set is answered both ways, each set's speedup the median of its rounds")
    p.add_argument("--hop-delay-ms", type=float, default=2.0,
                   help="with --speculate: every stage holds each frame it sends to another node this long "
                        "(default %(default)s)")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _stream(url: str, prompt: list[int], tokens: int) -> list[float]:
    """Arrival times of the streamed tokens of one greedy request (EOS ignored)."""
    from meshllm.client import ask, sse_events

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    times = []
    with ask(url, body, chat=False, stream=True, timeout=600) as r:
        for ev in sse_events(r):
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("meshllm", {}).get("token_ids"):
                times.append(time.perf_counter())
    return times


BUNCHED_S = 0.001  # token events closer than this reached the client together


def smoothness(streams: list[list[float]]) -> tuple[float | None, float | None]:
    """(share of the gaps between a stream's token events under ``BUNCHED_S``, their 99th
    percentile in ms) over ``streams`` (each a list of arrival times); None without gaps."""
    gaps = [b - a for t in streams for a, b in itertools.pairwise(t)]
    if not gaps:
        return None, None
    return round(sum(g < BUNCHED_S for g in gaps) / len(gaps), 3), round(float(np.percentile(gaps, 99)) * 1000, 2)


def _compute(url: str) -> tuple[float, int]:
    """A node's decode compute so far: (seconds in onnxruntime, decode steps)."""
    from meshllm.client import get_json

    st = ((get_json(url + "/v1/mesh") or {}).get("serving") or {}).get("stage") or {}
    return float(st.get("decode_compute_s", 0.0)), int(st.get("decode_calls", 0))


class _SingleProcess:
    """The model in this process (one runner over every block, the nodes' thread count), kept
    loaded while the mesh runs, so that its blocks of steps take turns with the mesh's requests."""

    def __init__(self, model_dir: Path, threads: int, attention: str) -> None:
        from meshllm.model.manifest import load_manifest
        from meshllm.runtime.attention import PLAIN
        from meshllm.runtime.runner import StageRunner

        m = load_manifest(model_dir, verify=False)
        self.runner = StageRunner(m, 0, m.config.num_blocks, threads=threads, max_seqs=2,
                                  one_pass=attention == PLAIN)

    def block(self, prompt: list[int], steps: int) -> float:
        """ms per decode step at batch 1 (the median of ``steps`` greedy steps after ``prompt``)."""
        r = self.runner
        r.alloc("s", len(prompt) + steps + 1)
        try:
            logits = r.prefill("s", np.asarray(prompt, np.int64))
            tok = int(np.argmax(logits))
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                out = r.decode(["s"], np.array([tok], np.int64))
                times.append(time.perf_counter() - t0)
                tok = int(np.argmax(out[0]))
        finally:
            r.free("s")
        return statistics.median(times) * 1000


@contextlib.contextmanager
def _wake_qos(on: bool) -> Iterator[None]:
    """Hold a CPU wake-up latency request of 0 in this process while the block runs (as the
    nodes do with serve.wake_qos), when asked and allowed."""
    if not on:
        yield
        return
    from meshllm.serve.wake import PATH

    try:
        f = open(PATH, "wb", buffering=0)  # noqa: SIM115 - the request lasts while the file is open
        f.write(struct.pack("i", 0))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        f.close()


SPEC_TARGETS = {"echo_mesh_speedup": ">= 1.5 (aim 2)", "echo_one_node_speedup": ">= 1.3 (aim 1.6)",
                "free_speedup": ">= 0.95 (aim 1.05)", "tokens_identical": "true"}


def _chat(url: str, text: str, tokens: int, speculate: bool, seed: int | None) -> tuple[list[int], float]:
    """One streamed chat answer: its token ids and its decode time (first token to last)."""
    from meshllm.client import ask, sse_events

    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens,
                            "speculate": speculate, "ignore_eos": True}
    body.update({"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed})
    ids: list[int] = []
    times: list[float] = []
    with ask(url, body, chat=True, stream=True, timeout=600) as r:
        for ev in sse_events(r):
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            got = ev.get("meshllm", {}).get("token_ids")
            if got:
                ids += list(got)
                times.append(time.perf_counter())
    return ids, (times[-1] - times[0]) if len(times) > 1 else 0.0


def _spec_stats(urls: list[str]) -> tuple[int, int, int]:
    from meshllm.client import get_json

    rows = drafted = accepted = 0
    for u in urls:
        st = ((get_json(u + "/v1/mesh") or {}).get("serving") or {}).get("stage") or {}
        rows += int(st.get("spec_rows", 0))
        drafted += int(st.get("spec_drafted", 0))
        accepted += int(st.get("spec_accepted", 0))
    return rows, drafted, accepted


def spec_orders(rounds: int, prompts: int) -> list[list[tuple[bool, bool]]]:
    """The order each prompt is answered in, per round: speculation (off, on) or (on, off),
    alternating from prompt to prompt and from round to round, so over two rounds each prompt runs
    first once each way and neither side always follows the other's warm-up or the machine's
    drift."""
    return [[(False, True) if (r + i) % 2 == 0 else (True, False) for i in range(prompts)] for r in range(rounds)]


def set_figures(rounds: list[dict[bool, tuple[int, float]]]) -> dict[str, Any]:
    """A prompt set's figures from its rounds (per round, speculation off / on -> (tokens, decode
    seconds) over the set's prompts): tok/s off and on and their ratio per round, and as the
    set's figures the median of each over the rounds (one slow round, the machine busy under
    one side, moves a median little)."""
    per = []
    for r in rounds:
        off = r[False][0] / max(r[False][1], 1e-9)
        on = r[True][0] / max(r[True][1], 1e-9)
        per.append({"tok_s_off": round(off, 2), "tok_s_on": round(on, 2), "speedup": round(on / off, 3)})
    return {"tok_s_off": round(statistics.median(p["tok_s_off"] for p in per), 2),
            "tok_s_on": round(statistics.median(p["tok_s_on"] for p in per), 2),
            "speedup": round(statistics.median(p["speedup"] for p in per), 3),
            "speedup_min": min(p["speedup"] for p in per), "speedup_max": max(p["speedup"] for p in per),
            "rounds": per}


def _spec_side_by_side(urls: list[str], tokens: int, rounds: int) -> dict[str, Any]:
    """Each prompt set, ``rounds`` times, every prompt answered with speculation off and on in the
    orders of ``spec_orders`` (greedy, timed; ``set_figures``), then seeded (tokens compared only):
    tok/s per set and mode, whether the tokens are identical, and the mean number of drafts kept
    per drafted step."""
    from meshllm.bench.spec_prompts import SETS

    out: dict[str, Any] = {}
    identical = True
    for name, prompts in SETS.items():
        before = _spec_stats(urls)
        timed: list[dict[bool, tuple[int, float]]] = []
        first: dict[int, list[int]] = {}
        for order in spec_orders(rounds, len(prompts)):
            n = {False: 0, True: 0}
            t = {False: 0.0, True: 0.0}
            for i, (p, sides) in enumerate(zip(prompts, order, strict=True)):
                ids = {}
                for spec in sides:
                    ids[spec], dt = _chat(urls[0], p, tokens, spec, None)
                    n[spec] += len(ids[spec]) - 1
                    t[spec] += dt
                identical &= ids[False] == ids[True] == first.setdefault(i, ids[False])
            timed.append({s: (n[s], t[s]) for s in (False, True)})
        after = _spec_stats(urls)
        for p in prompts[:2]:
            seeded = [_chat(urls[0], p, tokens // 2, spec, 1234)[0] for spec in (False, True)]
            identical &= seeded[0] == seeded[1]
        rows, drafted, accepted = (a - b for a, b in zip(after, before, strict=True))
        out[name] = {**set_figures(timed),
                     "acceptance": round(accepted / rows, 3) if rows else 0.0,
                     "draft_acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0}
    out["tokens_identical"] = identical
    return out


def run_speculate(args: argparse.Namespace) -> int:
    """``--speculate``: the mesh (``--nodes`` stages, ``--hop-delay-ms`` per hop) and one node, each
    serving both prompt sets with speculation off and on (a request's ``speculate``), side by side.
    ``acceptance``: drafts kept per step that carried drafts (with the cost-aware length on, a
    compute-bound mesh drafts little; ``--no-cost-aware`` shows what the proposer would keep)."""
    import os

    from meshllm.commands.up import LocalMesh

    if not args.model:
        raise SystemExit("--speculate needs --model (a model with a tokenizer and chat template, e.g. "
                         "`meshllm fetch smollm2`)")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    out: dict[str, Any] = {"nodes": args.nodes, "hop_delay_ms": args.hop_delay_ms, "tokens": args.tokens,
                           "rounds": args.rounds}
    out.update({"cost_aware": not args.no_cost_aware})
    os.environ["MESHLLM_SERVE_SPEC_COST_AWARE"] = "false" if args.no_cost_aware else "true"
    # nodes that speculate by default on plain attention (every node verifies a step's drafts in
    # one pass); requests without speculation run on the same attention, so both sides see the
    # same graphs (the kind pinned: a MESHLLM_RUNTIME_ATTENTION of the caller's does not change it)
    os.environ["MESHLLM_SERVE_SPECULATE"] = "true"
    os.environ["MESHLLM_RUNTIME_ATTENTION"] = "plain"
    out["attention"] = "plain"
    for label, nodes, delay in (("mesh", args.nodes, args.hop_delay_ms), ("one_node", 1, 0.0)):
        os.environ["MESHLLM_SERVE_HOP_DELAY_MS"] = str(delay)
        try:
            with LocalMesh(nodes, model=args.model, threads=args.threads, strategy=args.strategy) as mesh:
                view = mesh.wait_ready(args.timeout)
                out[f"{label}_stages"] = max(len(r["stages"]) for r in view["plan"]["replicas"])
                _chat(mesh.urls[0], "Hello", 4, True, None)  # warm up every stage's sessions
                out[label] = _spec_side_by_side(mesh.urls, args.tokens, args.rounds)
        finally:
            os.environ.pop("MESHLLM_SERVE_HOP_DELAY_MS", None)
    out.update({
        "echo_mesh_speedup": out["mesh"]["echo-heavy"]["speedup"],
        "echo_one_node_speedup": out["one_node"]["echo-heavy"]["speedup"],
        "free_speedup": min(out["mesh"]["free"]["speedup"], out["one_node"]["free"]["speedup"]),
        "tokens_identical": out["mesh"]["tokens_identical"] and out["one_node"]["tokens_identical"],
        "acceptance": {k: out["mesh"][k]["acceptance"] for k in ("echo-heavy", "free")},
        "targets": SPEC_TARGETS,
    })
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    sys.stdout.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    from meshllm.client import get_json
    from meshllm.commands.up import LocalMesh
    if getattr(args, "speculate", False):
        return run_speculate(args)
    from meshllm.model.config import PRESETS
    from meshllm.model.export import export_model, random_weights

    with tempfile.TemporaryDirectory(prefix="meshllm-bench-mesh-") as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            cfg = PRESETS[args.preset]
            model_dir = Path(tmp) / "model"
            export_model(random_weights(cfg, np.random.default_rng(0)), cfg, model_dir,
                         name=f"bench-{args.preset}", progress=False)
        from meshllm.model.manifest import load_manifest

        cfg = load_manifest(model_dir, verify=False).config
        rng = np.random.default_rng(1)
        prompt = [int(x) for x in rng.integers(3, cfg.vocab_size, size=args.prompt_len)]
        # the one process runs the attention kind the mesh's nodes choose (they read this environment)
        import os

        from meshllm.runtime.attention import choose
        from meshllm.settings import attention_setting

        kind = choose(*attention_setting(os.environ))
        wake = bool(getattr(args, "wake_qos", False))
        if wake:
            os.environ["MESHLLM_SERVE_WAKE_QOS"] = "true"
        rounds = max(1, args.rounds)
        out: dict[str, Any] = {"nodes": args.nodes, "model_params_mb": None, "attention": kind, "wake_qos": wake,
                               "rounds": rounds}
        single = _SingleProcess(model_dir, args.threads, kind)
        with LocalMesh(args.nodes, model=str(model_dir), threads=args.threads, strategy=args.strategy) as mesh:
            view = mesh.wait_ready(args.timeout)
            plan = view["plan"]
            if plan.get("attention", "plain") != kind:
                raise RuntimeError(f"the mesh runs {plan.get('attention')} attention, the one process {kind}")
            url = mesh.urls[0]
            stages = max(len(r["stages"]) for r in plan["replicas"])
            _stream(url, prompt, 4)  # warm up every stage's sessions
            with _wake_qos(wake):
                single.block(prompt, 4)  # and the one process's

            def mesh_request() -> tuple[list[float], float, float]:
                before = [_compute(u) for u in mesh.urls]
                t0 = time.perf_counter()
                times = _stream(url, prompt, args.tokens)
                after = [_compute(u) for u in mesh.urls]
                # each stage's onnxruntime time per decode step of this request, summed over the stages
                compute = sum((a[0] - b[0]) / max(a[1] - b[1], 1) for a, b in zip(after, before, strict=True)
                              if a[1] > b[1]) * 1000
                return times, t0, compute

            # The one process and the mesh take turns, the order alternating from round to round, so
            # that both see the machine's noise alike (here the one process's median step came out
            # anywhere between 11 and 15 ms from run to run, a swing larger than a hop's cost): each per-hop figure is the mesh's
            # token against the one process's step of the same round
            singles: list[float] = []
            meshes: list[tuple[list[float], float, float]] = []
            for i in range(rounds):
                for side in (("single", "mesh") if i % 2 == 0 else ("mesh", "single")):
                    if side == "single":
                        with _wake_qos(wake):
                            singles.append(single.block(prompt, args.tokens))
                    else:
                        meshes.append(mesh_request())
            per_token_ms = [(t[-1] - t[0]) / max(len(t) - 1, 1) * 1000 for t, _, _ in meshes]
            hop_ms = [(m - s) / max(stages, 1) for m, s in zip(per_token_ms, singles, strict=True)]
            single_ms = statistics.median(singles)
            compute_ms = statistics.median(c for _, _, c in meshes)
            ttft = statistics.median(t[0] - s for t, s, _ in meshes)
            per_token = statistics.median(per_token_ms) / 1000
            total1 = statistics.median(len(t) / (t[-1] - s) for t, s, _ in meshes)
            results: list[list[float]] = [[] for _ in range(args.concurrent)]
            errors: list[BaseException] = []

            def one(i: int) -> None:
                try:
                    results[i] = _stream(mesh.urls[i % len(mesh.urls)],
                                         [int(x) for x in rng.integers(3, cfg.vocab_size, size=args.prompt_len)],
                                         args.tokens)
                except BaseException as e:  # reported below
                    errors.append(e)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.concurrent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if errors:
                raise RuntimeError(f"concurrent requests failed: {errors[0]}")
            aggregate = sum(len(r) for r in results) / wall
            # the planner's per-token latency at its workload's lengths, measured the same way
            wl = (plan.get("workload") or {})
            n_in = max(1, round(float(wl.get("mean_input_len") or 32)))
            n_out = max(1, round(float(wl.get("mean_output_len") or 96)))
            n_in = min(n_in, cfg.max_position - n_out - 1)
            p2 = [int(x) for x in rng.integers(3, cfg.vocab_size, size=n_in)]
            t0 = time.perf_counter()
            t2 = _stream(url, p2, n_out)
            measured = (t2[-1] - t0) / len(t2) * 1000
            predicted = (plan.get("predicted") or {}).get("latency_ms_per_token")
            rss = {f"node-{i}": rss_mb(p.pid) for i, p in enumerate(mesh.procs)}
            serving = [get_json(u + "/v1/mesh") for u in mesh.urls]
            if wake:  # whether the nodes could hold the request
                out["wake_qos_held"] = all(
                    ((((v or {}).get("serving") or {}).get("stage") or {}).get("wake_qos") or {}).get("holds", 0) > 0
                    for v in serving)
        mesh_ms = per_token * 1000
        bunched_1, _ = smoothness([t for t, _, _ in meshes])
        bunched_8, gap_p99_8 = smoothness(results)
        out.update({
            "strategy": plan.get("strategy"), "stages": stages,
            "plan": [[s["layers"] for s in r["stages"]] for r in plan["replicas"]],
            "ttft_ms": round(ttft * 1000, 2),
            "mesh_decode_ms": round(mesh_ms, 3),
            "decode_tok_s_1": round(1000 / mesh_ms, 2),
            "tok_s_1_with_prefill": round(total1, 2),
            "aggregate_tok_s_8": round(aggregate, 2),
            "batch_speedup": round(aggregate / total1, 3),
            "single_decode_ms": round(single_ms, 3),
            "per_hop_overhead_ms": round(statistics.median(hop_ms), 3),
            "per_hop_overhead_ms_rounds": [round(h, 3) for h in hop_ms],
            "mesh_compute_ms": round(compute_ms, 3),
            "serving_overhead_per_hop_ms": round((mesh_ms - compute_ms) / max(stages, 1), 3),
            "predicted_decode_ms": None if predicted is None else round(float(predicted), 3),
            "measured_decode_ms": round(measured, 3),
            "decode_prediction_error": (None if not predicted else round(abs(measured - predicted) / predicted, 3)),
            "workload_lengths": [n_in, n_out],
            "rss_mb": rss,
            "bunched_share_1": bunched_1, "bunched_share_8": bunched_8, "gap_p99_ms_8": gap_p99_8,
            "errors": sum(int(((v or {}).get("serving") or {}).get("entry", {}).get("failed", 0)) for v in serving),
            "targets": TARGETS,
        })
        out.pop("model_params_mb")
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    sys.stdout.flush()
    return 0
