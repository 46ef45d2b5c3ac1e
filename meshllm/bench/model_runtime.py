"""Runtime speed of a real model directory (``meshllm bench runtime --model DIR [--gguf FILE]``).

The runner on the model is measured side by side with llama.cpp (``llama-cpp-python``, when it is
importable and the GGUF file is given) and transformers (loading the same GGUF, unless
``--no-transformers``), with the same thread count, taking turns step by step as the preset
benchmark does. The roofline comes from the bytes the model really reads per decoded token: the
stored weights of the layers and the head (int4: packed values, scales, zero points, offsets;
float16 files are cast to float32 at load, so twice their size), one embedding row, and the KV of
the context, over the best measured read bandwidth. ``rss_mb`` is the process's resident memory
after loading the runner, before any other engine is loaded (``VmRSS`` in ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.errors import UserError

BATCH = 8
TARGETS_INT4 = {"ratio_vs_llamacpp": ">= 1.0 (aim 1.25)", "prefill_ratio_vs_llamacpp": ">= 2.0",
                "b8_vs_llamacpp_b1": ">= 4.0"}


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python on the GGUF file: batch 1 only."""

    name = "llamacpp"

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)

    def close(self) -> None:
        self.llm.close()  # frees the model now, not in a finalizer at some later collection

    def start(self, prompts: np.ndarray) -> None:
        if prompts.shape[0] != 1:
            raise ValueError("the llama.cpp engine runs batch 1")
        self.llm.reset()
        self.llm.eval([int(t) for t in prompts[0]])

    def step(self, tokens: np.ndarray) -> None:
        self.llm.eval([int(tokens[0])])

    def prefill_logits(self, ids: np.ndarray) -> None:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])


class TransformersGGUFEngine:
    """transformers loading the same GGUF file (dequantized to float32)."""

    name = "transformers"

    def __init__(self, gguf: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()
        self.past: Any = None

    def start(self, prompts: np.ndarray) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(prompts.astype(np.int64)), use_cache=True)
        self.past = out.past_key_values

    def step(self, tokens: np.ndarray) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(tokens.astype(np.int64)[:, None]),
                             past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values

    def prefill_logits(self, ids: np.ndarray) -> None:
        with self.torch.inference_mode():
            self.model(input_ids=self.torch.from_numpy(ids.astype(np.int64)[None]), use_cache=True)


def bytes_per_token(manifest: Any, context: int) -> int:
    """Bytes one batch-1 decode step reads: weights of layers and head, an embedding row, KV."""
    cfg = manifest.config
    weights = sum(b.cost.param_bytes for b in manifest.blocks[1:])
    if cfg.weight_dtype == "float16":
        weights *= 2  # cast to float32 once at load: float32 is what is read
    embed_row = manifest.blocks[0].cost.param_bytes // cfg.vocab_size
    kv = 2 * cfg.kv_size * 4 * cfg.num_layers * context
    return int(weights + embed_row + kv)


def run_model(args: argparse.Namespace) -> int:
    from meshllm.bench.runtime import (
        RunnerEngine,
        _median,
        _timed,
        bandwidth_samplers,
        interleaved_decode,
        sample_bandwidth,
        stat,
    )
    from meshllm.model.manifest import load_manifest
    from meshllm.runtime.runner import default_threads

    model_dir = Path(args.model)
    manifest = load_manifest(model_dir)
    cfg = manifest.config
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and not gguf.is_file():
        raise UserError(f"--gguf {gguf}: no such file")
    threads = args.threads or default_threads()
    rng = np.random.default_rng(args.seed)
    n = args.steps * args.reps
    prefill = args.prefill or 300
    max_len = min(cfg.max_position, max(args.context, prefill) + n + 2)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else (lambda s: None)

    rss0 = rss_mb()
    runner = RunnerEngine(model_dir, threads, max_len)
    rss_runner = rss_mb()
    engines: list[Any] = [runner]
    notes: dict[str, str] = {}
    if gguf is None:
        notes["llamacpp"] = notes["transformers"] = "no --gguf file given"
    else:
        try:
            engines.append(LlamaCppEngine(gguf, threads, max_len + 8))
        except ImportError:
            notes["llamacpp"] = "llama-cpp-python is not installed (make bench installs it)"
        if not args.no_transformers:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                engines.append(TransformersGGUFEngine(gguf, threads))
            except ImportError as e:
                notes["transformers"] = f"transformers not installed ({e.name})"
    names = [eng.name for eng in engines]
    log(f"engines: {', '.join(names)}; read bandwidth")
    samplers = bandwidth_samplers()
    tbw: dict[str, list[float]] = {}
    sample_bandwidth(samplers, args.steps, rng, tbw)
    log("decode, batch 1")
    t1 = interleaved_decode(engines, rng.integers(0, cfg.vocab_size, (1, args.context)),
                            rng.integers(0, cfg.vocab_size, (n + 1, 1)), rng, samplers, tbw)
    log(f"decode, batch {BATCH} (runner and transformers)")
    batched = [eng for eng in engines if eng.name != "llamacpp"]
    tB = interleaved_decode(batched, rng.integers(0, cfg.vocab_size, (BATCH, args.context)),
                            rng.integers(0, cfg.vocab_size, (n + 1, BATCH)), rng)
    log(f"prefill of {prefill} tokens")
    pre = rng.integers(0, cfg.vocab_size, prefill)
    tp: dict[str, list[float]] = {eng.name: [] for eng in engines}
    for eng in engines:
        eng.prefill_logits(pre)  # warm
    for _ in range(max(4, args.reps)):
        for j in rng.permutation(len(engines)):
            tp[engines[j].name].append(_timed(functools.partial(engines[j].prefill_logits, pre)))
    sample_bandwidth(samplers, args.steps, rng, tbw)
    for eng in engines:
        if isinstance(eng, LlamaCppEngine):
            eng.close()

    bandwidth = max((1 << 28) / stat(v) for v in tbw.values())
    bpt = bytes_per_token(manifest, args.context + n // 2)
    roofline = bandwidth / bpt
    figures: dict[str, dict[str, float]] = {}
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        for table, f in ((figures, stat), (medians, _median)):
            row = {"decode_tok_s_b1": 1 / f(t1[name]), "prefill_tok_s": prefill / f(tp[name])}
            if name in tB:
                row[f"decode_tok_s_b{BATCH}"] = BATCH / f(tB[name])
            table[name] = row
    r = figures["runner"]
    result: dict[str, Any] = {
        "model": str(model_dir), "name": manifest.name, "dtype": cfg.weight_dtype,
        "int4_mode": (manifest.provenance or {}).get("int4_mode"), "threads": threads,
        "context": args.context, "prefill_tokens": prefill, "timed_steps": n,
        "statistic": "10th-percentile step time, engines taking turns step by step in shuffled order; "
                     "'medians' holds the same figures from median times",
        "decode_tok_s_b1": r["decode_tok_s_b1"], f"decode_tok_s_b{BATCH}": r[f"decode_tok_s_b{BATCH}"],
        "prefill_tok_s": r["prefill_tok_s"],
        "stored_weight_mb": sum(b.cost.param_bytes for b in manifest.blocks) / 2**20,
        "rss_mb": rss_runner, "rss_mb_before_load": rss0,
        "read_bandwidth_gb_s": bandwidth / 1e9, "bytes_per_token_b1": bpt,
        "roofline_tok_s_b1": roofline, "roofline_fraction": r["decode_tok_s_b1"] / roofline,
        "llamacpp_decode_tok_s_b1": None, "llamacpp_prefill_tok_s": None, "ratio_vs_llamacpp": None,
        "prefill_ratio_vs_llamacpp": None, "b8_vs_llamacpp_b1": None,
        "transformers": figures.get("transformers"), "ratio_vs_transformers": None,
        "targets": TARGETS_INT4 if cfg.weight_dtype == "int4" else {},
        "medians": medians, "notes": notes,
    }
    if "llamacpp" in figures:
        lc = figures["llamacpp"]
        result.update(llamacpp_decode_tok_s_b1=lc["decode_tok_s_b1"], llamacpp_prefill_tok_s=lc["prefill_tok_s"],
                      ratio_vs_llamacpp=r["decode_tok_s_b1"] / lc["decode_tok_s_b1"],
                      prefill_ratio_vs_llamacpp=r["prefill_tok_s"] / lc["prefill_tok_s"],
                      b8_vs_llamacpp_b1=r[f"decode_tok_s_b{BATCH}"] / lc["decode_tok_s_b1"])
    if "transformers" in figures:
        result["ratio_vs_transformers"] = r["decode_tok_s_b1"] / figures["transformers"]["decode_tok_s_b1"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k in ("decode_tok_s_b1", f"decode_tok_s_b{BATCH}", "prefill_tok_s", "llamacpp_decode_tok_s_b1",
                  "llamacpp_prefill_tok_s", "ratio_vs_llamacpp", "prefill_ratio_vs_llamacpp",
                  "b8_vs_llamacpp_b1", "roofline_fraction", "rss_mb", "stored_weight_mb"):
            v = result[k]
            target = result["targets"].get(k, "")
            print(f"{k:28} {'n/a' if v is None else f'{v:.2f}':>10}   {target}")
        for k, note in notes.items():
            print(f"{k}: {note}")
    return 0
