"""Is verifying drafts in one multi-position pass numerically the same as one-token decode steps?

For a model directory: (1) the logits of 8 positions computed in one pass
(``prefill(seq, x, last_only=False)``) against the same positions decoded one at a time, and a
batch of one-token rows against one row alone (max |Δ logit|; 0 where the runner is exact by
construction, ``runner.one_pass_exact``); (2) greedy tokens of plain decoding against a speculative
loop that verifies prompt-lookup drafts in one pass (``decode_rows(..., counts=)``), per prompt
(first differing token). docs/serving.md reports the figures.

    .venv/bin/python tools/spec_numerics.py models/tiny --tokens 64
"""

from __future__ import annotations

import argparse

import numpy as np

from meshllm.model.manifest import load_manifest
from meshllm.runtime.runner import StageRunner
from meshllm.serve.spec import PromptLookup


def logits_diff(r: StageRunner, prompt: np.ndarray) -> tuple[float, float]:
    r.alloc("a", len(prompt) + 20)
    toks = [int(r.prefill("a", prompt).argmax())]
    steps = []
    for _ in range(8):
        out = r.decode(["a"], np.array([toks[-1]]))[0].copy()
        steps.append(out)
        toks.append(int(out.argmax()))
    r.alloc("b", len(prompt) + 20)
    r.prefill("b", prompt)
    multi = r.prefill("b", np.array(toks[:8]), last_only=False)
    one_pass = max(float(np.abs(multi[i] - steps[i]).max()) for i in range(8))
    ids = [f"z{i}" for i in range(4)]
    for s in ids:
        r.alloc(s, len(prompt) + 20)
        r.prefill(s, prompt)
    batched = float(np.abs(r.decode(ids, np.array([toks[0]] * 4))[0] - steps[0]).max())
    for s in ["a", "b", *ids]:
        r.free(s)
    return one_pass, batched


def greedy(r: StageRunner, prompt: list[int], n: int, one_pass: bool, k: int = 4) -> tuple[list[int], int]:
    r.alloc("s", len(prompt) + n + k + 2)
    toks = [int(r.prefill("s", np.array(prompt)).argmax())]
    look = PromptLookup(prompt)
    look.extend(toks)
    steps = 0
    while len(toks) < n:
        d = look.propose(min(k, n - len(toks) - 1)) if one_pass else ()
        start = r.seq_len("s")
        out = r.decode_rows(["s"], np.array([toks[-1], *d]), counts=[len(d) + 1])[0]
        new = []
        for j in range(len(d) + 1):
            new.append(int(out[j].argmax()))
            if j == len(d) or new[-1] != d[j]:
                break
        r.truncate("s", start + len(new))
        toks += new
        look.extend(new)
        steps += 1
    r.free("s")
    return toks[:n], steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    m = load_manifest(args.model)
    cfg = m.config
    r = StageRunner(m, 0, cfg.num_blocks, threads=1, one_pass=True)
    rng = np.random.default_rng(0)
    one, batch = logits_diff(r, rng.integers(3, min(cfg.vocab_size, 5000), 40))
    print(f"max |Δ logit|: one pass of 8 positions vs 8 one-token steps {one:.3g}; "
          f"a batch of 4 one-token rows vs one row {batch:.3g}")
    prompts = [list(rng.integers(3, min(cfg.vocab_size, 5000), 30)) for _ in range(6)]
    prompts += [[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 8]
    same = 0
    for pr in prompts:
        a, _ = greedy(r, pr, args.tokens, False)
        b, steps = greedy(r, pr, args.tokens, True)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        same += first is None
        print(("identical" if first is None else f"differs from token {first}") + f" ({steps} one-pass steps)")
    print(f"{same}/{len(prompts)} prompts: greedy tokens identical with one-pass verification "
          f"(runner.one_pass_exact: {r.one_pass_exact})")


if __name__ == "__main__":
    main()
