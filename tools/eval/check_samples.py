"""Recompute, in one process, the log-likelihoods an lm-evaluation-harness run got from a mesh.

lm-evaluation-harness's ``--log_samples`` writes, for every choice it scored, the context, the
continuation and what it computed from the server's answer: the continuation's summed logprob
and whether every continuation token was the greedy one. This script tokenizes each pair as the
harness does (trailing spaces of the context move to the continuation; the whole text is
encoded, the context's ids split off; no special tokens), runs the whole model in this process
(``StageRunner`` over every block, the rows of one prefill) and sums the same logprobs. It prints
one JSON object and exits 1 when any choice differs by more than ``--tol`` or any greedy flag
differs.

    python tools/eval/check_samples.py --model DIR /tmp/lmeval_out/*/samples_meshllm_mc_*.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.model.manifest import load_manifest
from meshllm.model.paths import resolve_model_dir
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import prompt_logprobs


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split of one request into context ids and continuation ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def score(runner: StageRunner, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The continuation's summed logprob after the context, and whether each of its tokens was the
    likeliest there."""
    ids = ctx + cont
    runner.alloc("x", len(ids))
    try:
        rows = runner.prefill("x", np.array(ids, np.int64), last_only=False)  # (P, V)
    finally:
        runner.free("x")
    scored = prompt_logprobs(rows[:-1], ids[1:], 1)[len(ctx) - 1:]  # the continuation's tokens
    return sum(lp for lp, _ in scored), all(top[0][0] == t for (_, top), t in zip(scored, cont, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("samples", nargs="+", help="lm-eval's samples_*.jsonl")
    args = ap.parse_args(argv)
    manifest = load_manifest(resolve_model_dir(args.model))
    tok = Tokenizer.from_manifest(manifest)
    runner = StageRunner(manifest, 0, manifest.config.num_blocks, threads=1)
    n, worst, greedy_diff = 0, 0.0, 0
    for path in args.samples:
        for line in Path(path).read_text().splitlines():
            doc: dict[str, Any] = json.loads(line)
            for key, resp in zip(doc["arguments"], doc["resps"], strict=True):
                arg = doc["arguments"][key]
                ll, greedy = score(runner, *encode_pair(tok, arg["arg_0"], arg["arg_1"]))
                got_ll, got_greedy = float(resp[0][0]), resp[0][1] in (True, "True")
                worst = max(worst, abs(ll - got_ll))
                greedy_diff += greedy != got_greedy
                n += 1
    ok = n > 0 and worst <= args.tol and greedy_diff == 0
    print(json.dumps({"choices": n, "max_abs_diff": worst, "greedy_flags_differing": greedy_diff,
                      "tolerance": args.tol, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
