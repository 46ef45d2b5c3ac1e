"""What a verification pass costs, and what a node that speculates pays per plain step.

For a model directory, one process, the runners taking turns in blocks (``--rounds`` rounds, the
25th percentile of each block): a pass of 1..``--max`` positions of one row on the runner that
verifies drafts in one pass (``StageRunner(one_pass=True)``), in its own one-position steps and in
steps of the GroupQueryAttention runner (what a node that does not speculate runs), at each
``--context``. Prints one JSON object. docs/runtime.md ("Speculative verification: the cost of a
pass") reports the figures.

    .venv/bin/python tools/pass_cost.py ~/.cache/meshllm/models/smollm2-135m-instruct-int4-fast-f7
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from meshllm.model.manifest import load_manifest
from meshllm.runtime.runner import StageRunner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--context", default="64,300,1000", help="positions already in the cache (comma-separated)")
    p.add_argument("--max", type=int, default=5, help="longest pass, in positions")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block", type=int, default=12, help="steps per runner per turn")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    m = load_manifest(a.model)
    ctxs = [int(c) for c in a.context.split(",")]
    slot = max(ctxs) + a.max + 1
    runners = {k: StageRunner(m, 0, m.config.num_blocks, threads=a.threads, max_seqs=1, slot_len=slot,
                              one_pass=k == "one_pass") for k in ("gqa", "one_pass")}
    rng = np.random.default_rng(0)
    vocab = m.config.vocab_size
    out: dict[str, object] = {"model": m.name, "threads": a.threads}
    for ctx in ctxs:
        for r in runners.values():
            r.alloc("s", ctx + a.max)
            r.prefill("s", rng.integers(0, vocab, ctx))

        def block(r: StageRunner, k: int, ctx: int = ctx) -> float:
            ts = []
            for _ in range(a.block):
                x = rng.integers(0, vocab, k)
                t0 = time.perf_counter()
                r.decode_rows(["s"], x, counts=None if k == 1 else [k])
                ts.append(time.perf_counter() - t0)
                r.truncate("s", ctx)
            return float(np.percentile(ts, 25))

        steps: list[float] = []  # the GQA runner's one-position steps
        one: dict[int, list[float]] = {k: [] for k in range(1, a.max + 1)}
        for _ in range(a.rounds):
            steps.append(block(runners["gqa"], 1))
            for k in one:
                one[k].append(block(runners["one_pass"], k))
        g, o1 = np.array(steps), np.array(one[1])
        out[str(ctx)] = {
            "gqa_step_ms": round(float(np.median(g)) * 1e3, 2),
            "one_pass_step_over_gqa": round(float(np.median(o1 / g)), 3),
            "pass_in_own_steps": [round(float(np.median(np.array(one[k]) / o1)), 3) for k in one],
            "pass_in_gqa_steps": [round(float(np.median(np.array(one[k]) / g)), 3) for k in one],
        }
        for r in runners.values():
            r.free("s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
