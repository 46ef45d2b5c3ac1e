"""The child process of a foreign engine in the runtime benchmark (``harness.ForeignEngine``).

``python -m meshllm.bench.foreign KIND OPTIONS_JSON`` reads one JSON request per line on stdin
and answers one JSON line on stdout: ``hello`` (the engine is loaded; answers the process's
resident memory), ``start`` (prefill one prompt per row), ``steps`` (decode the given tokens, one
step per row of tokens, timing each step here), ``prefill`` (a fresh prompt, timed). An error
the engine raises is answered as ``{"error": ...}``; a crash ends the process, which the parent
reports. Engines:

* ``llamacpp``: llama.cpp through llama-cpp-python on a GGUF file (batch 1);
* ``ortgenai``: onnxruntime-genai's generator on a model its own builder made (batch 1);
* ``transformers``: transformers loading the GGUF file, dequantized to float32.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class LlamaCpp:
    def __init__(self, gguf: str, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)

    def start(self, prompts: list[list[int]]) -> None:
        if len(prompts) != 1:
            raise ValueError("the llama.cpp engine runs batch 1")
        self.llm.reset()
        self.llm.eval(prompts[0])

    def step(self, tokens: list[int]) -> None:
        self.llm.eval([tokens[0]])

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)


class OrtGenai:
    def __init__(self, model_dir: str, threads: int, n_ctx: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.n_ctx = n_ctx
        self.gen: Any = None

    def _generator(self) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        return self.og.Generator(self.model, params)

    def start(self, prompts: list[list[int]]) -> None:
        if len(prompts) != 1:
            raise ValueError("the onnxruntime-genai engine runs batch 1 here")
        self.gen = None  # free the previous generator's KV first
        self.gen = self._generator()
        self.gen.append_tokens(prompts[0])

    def step(self, tokens: list[int]) -> None:
        self.gen.append_tokens([tokens[0]])  # one decode step (the logits are computed)

    def prefill(self, ids: list[int]) -> None:
        gen = self._generator()
        gen.append_tokens(ids)


class Transformers:
    def __init__(self, gguf: str, threads: int, n_ctx: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        path = Path(gguf)
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self.past: Any = None

    def start(self, prompts: list[list[int]]) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor(prompts, dtype=self.torch.int64), use_cache=True)
        self.past = out.past_key_values

    def step(self, tokens: list[int]) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor(tokens, dtype=self.torch.int64)[:, None],
                             past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values

    def prefill(self, ids: list[int]) -> None:
        with self.torch.inference_mode():
            self.model(input_ids=self.torch.tensor([ids], dtype=self.torch.int64), use_cache=True)


ENGINES: dict[str, Any] = {"llamacpp": LlamaCpp, "ortgenai": OrtGenai, "transformers": Transformers}


def serve(engine: Any, lines: Any, out: Any) -> None:
    for line in lines:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "hello":
                answer: dict[str, Any] = {"rss_mb": rss_mb()}
            elif op == "start":
                engine.start([[int(t) for t in row] for row in req["prompts"]])
                answer = {}
            elif op == "steps":
                times = []
                for row in req["tokens"]:
                    t0 = time.perf_counter()
                    engine.step([int(t) for t in row])
                    times.append(time.perf_counter() - t0)
                answer = {"times": times}
            elif op == "prefill":
                ids = [int(t) for t in req["ids"]]
                t0 = time.perf_counter()
                engine.prefill(ids)
                answer = {"s": time.perf_counter() - t0}
            else:
                answer = {"error": f"unknown request {op!r}"}
        except Exception as e:  # reported to the parent, which drops the engine
            answer = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main(argv: list[str]) -> int:
    kind, options = argv[0], json.loads(argv[1])
    # the protocol owns stdout: anything the engines print goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        engine = ENGINES[kind](**options)
    except Exception as e:  # an engine that cannot load is reported, not fatal
        why = (f"{e.name} is not installed" if isinstance(e, ImportError) and e.name
               else f"cannot load: {type(e).__name__}: {e}")
        first = sys.stdin.readline()
        if first:
            out.write(json.dumps({"error": why[:500]}) + "\n")
            out.flush()
        return 1
    serve(engine, sys.stdin, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
