"""Runtime speed: the per-layer runner vs one monolithic ONNX graph vs transformers, and the roofline.

Everything is measured in one run, side by side, because the machines are shared and noisy: the
engines take turns in blocks of decode steps (``harness.blocked_decode``: ``--steps`` steps of one
engine, then of the next, shuffled, ``--reps`` rounds), so each block runs with its own weights
warm, as a user's run would, while a burst of load from other processes still falls on all of
them alike; the 10th-percentile step time counts (medians are reported too). Memory read
bandwidth is sampled before and after the engines: numpy matrix-vector product, sum, and a dot
product of an array with itself, each over 256 MiB of float32; the highest counts. Batch-1 decode
is compared with the roofline it implies: bytes read per token / bandwidth.
The model is a random one of the chosen preset, exported to a temporary directory. With
``--model DIR`` a real model directory is measured instead (``model_runtime``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from meshllm.bench.harness import (
    BATCH,
    InProcess,
    RunnerEngine,
    _median,
    _timed,
    bandwidth_samplers,
    blocked_decode,
    sample_bandwidth,
    stat,
)
from meshllm.errors import UserError
from meshllm.model.blocks import build_monolithic
from meshllm.model.config import PRESETS, ModelConfig, param_count
from meshllm.model.export import export_model, random_weights
from meshllm.runtime.runner import bind_buffer, default_threads, session_options

TARGETS = {"ratio_vs_monolithic": ">= 0.9", "ratio_vs_transformers": ">= 1.0",
           "roofline_fraction": ">= 0.6", "ctx_growth": "<= 1.5"}


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench", choices=["tiny", "small", "bench"],
                   help="model shape (random weights); default: bench (~125M parameters)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=None, help="threads per engine (default: all cores)")
    p.add_argument("--steps", type=int, default=64,
                   help="decode steps per block (engines take turns a block at a time)")
    p.add_argument("--reps", type=int, default=3, help="rounds of blocks per engine")
    p.add_argument("--context", type=int, default=64, help="prompt length before decode is timed")
    p.add_argument("--long-context", type=int, default=1024, help="context for ctx_growth")
    p.add_argument("--prefill", type=int, default=None,
                   help="prompt length for prefill tokens/s (default 128; 300 with --model)")
    p.add_argument("--model", default=None,
                   help="a model directory to measure instead of a random preset (see bench/model_runtime.py)")
    p.add_argument("--gguf", default=None,
                   help="with --model: the GGUF file it came from, for llama.cpp and transformers side by side")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-ortgenai", action="store_true",
                   help="with --gguf: skip onnxruntime-genai (its builder's model is built once, cached)")
    p.add_argument("--no-kernels", action="store_true", help="with --model: skip counting kernels per token")
    p.add_argument("--no-spin", action="store_true",
                   help="with --model: skip the runner_spin column (onnxruntime threads waiting busy)")
    p.add_argument("--exact-model", default=None,
                   help="with --model (a fast int4 import): the exact import of the same file, for fast_agreement")
    p.add_argument("--attention", choices=("auto", "fused", "plain"), default=None,
                   help="with --model: the attention kind of the runner columns (default: the kind a `meshllm node` "
                        "started here would serve with, $MESHLLM_RUNTIME_ATTENTION or auto); the other kind is "
                        "measured beside it at batch 1 (runner_plain or runner_fused) unless --no-other-attention")
    p.add_argument("--no-other-attention", action="store_true",
                   help="with --model: skip the column of the other attention kind")
    p.add_argument("--seed", type=int, default=0)


# --- engines ---------------------------------------------------------------------------------
class MonolithicEngine:
    """The same model as one ONNX graph, run by onnxruntime directly (KV buffers shared in place)."""

    name = "monolithic"

    def __init__(self, weights: dict[str, np.ndarray], cfg: ModelConfig, threads: int, max_len: int,
                 tmp: Path) -> None:
        path = tmp / "monolithic.onnx"
        onnx.save_model(build_monolithic(weights, cfg), str(path))
        self.sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.cfg = cfg
        self.max_len = max_len
        shape = (BATCH, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.lens = np.zeros(0, np.int32)

    def _run(self, ids: np.ndarray, row0: int, lens: np.ndarray) -> np.ndarray:
        """ids (B, S) for cache rows [row0, row0 + B) whose past lengths are lens (B,)."""
        B, S = ids.shape
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", ids.astype(np.int64))
        io.bind_cpu_input("seqlens_k", (lens + S - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(int(lens.max()) + S, np.int32))
        out = np.empty((B, S, self.cfg.vocab_size), np.float32)
        bind_buffer(io, "logits", out, output=True)
        for i in range(self.cfg.num_layers):
            for kind, bufs in (("key", self.k), ("value", self.v)):
                view = bufs[i][row0:row0 + B]
                bind_buffer(io, f"past_{kind}.{i}", view, output=False)
                bind_buffer(io, f"present_{kind}.{i}", view, output=True)
        self.sess.run_with_iobinding(io)
        return out

    def start(self, prompts: np.ndarray) -> None:
        for j, p in enumerate(prompts):
            self._run(p[None], j, np.zeros(1, np.int32))
        self.lens = np.full(len(prompts), prompts.shape[1], np.int32)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        out = self._run(tokens[:, None], 0, self.lens)[:, 0]  # (B, V)
        self.lens += 1
        return out

    def prefill_logits(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids[None], BATCH - 1, np.zeros(1, np.int32))[0, -1]  # (V,)


class TransformersEngine:
    """``LlamaForCausalLM`` on the same weights, torch threads set to the same count."""

    name = "transformers"

    def __init__(self, weights: dict[str, np.ndarray], cfg: ModelConfig, threads: int) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position,
                             rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        model = LlamaForCausalLM(hf_cfg)
        state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): torch.from_numpy(v.astype(np.float32))
                 for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
            raise RuntimeError(f"transformers weights mismatch: missing {missing}, unexpected {unexpected}")
        self.model = model.eval()
        self.past: Any = None

    def start(self, prompts: np.ndarray) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(prompts.astype(np.int64)), use_cache=True)
        self.past = out.past_key_values

    def step(self, tokens: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(tokens.astype(np.int64)[:, None]),
                             past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].numpy()

    def prefill_logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(ids.astype(np.int64)[None]), use_cache=True)
        return out.logits[0, -1].numpy()


# --- measurements -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        from meshllm.bench.model_runtime import run_model

        return run_model(args)
    if args.gguf is not None:
        raise UserError("--gguf needs --model (the model directory imported from it)")
    if args.prefill is None:
        args.prefill = 128
    cfg = PRESETS[args.preset]
    threads = args.threads or default_threads()
    rng = np.random.default_rng(args.seed)
    n = args.steps * args.reps  # timed decode steps per engine and scenario
    long_ctx = min(args.long_context, cfg.max_position - n - 2)
    max_len = min(cfg.max_position, max(long_ctx, args.context, args.prefill) + n + 2)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else (lambda s: None)

    weights = random_weights(cfg, rng)
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-") as tmp_s:
        tmp = Path(tmp_s)
        log(f"exporting a random {args.preset} model ({param_count(cfg) / 1e6:.1f}M parameters)")
        export_model(weights, cfg, tmp / "model", name=f"bench-{args.preset}", progress=not args.json)
        runner = RunnerEngine(tmp / "model", threads, max_len)
        engines: list[Any] = [runner, MonolithicEngine(weights, cfg, threads, max_len, tmp),
                              RunnerEngine(tmp / "model", threads, max_len, fuse=False)]
        hf_note = None
        if not args.no_transformers:
            # onnxruntime runs with spinning off; let torch's OpenMP pool wait passively too, so
            # that neither steals the cores from the other while they take turns
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                engines.append(TransformersEngine(weights, cfg, threads))
            except ImportError as e:
                hf_note = f"transformers not installed ({e.name})"
        del weights

        # the engines compute the same function: check before timing them
        probe = rng.integers(0, cfg.vocab_size, 16)
        ref_logits = engines[0].prefill_logits(probe)
        agree = {e.name: float(np.abs(e.prefill_logits(probe) - ref_logits).max()) for e in engines[1:]}

        log("read bandwidth")
        samplers = bandwidth_samplers()
        tbw: dict[str, list[float]] = {}
        sample_bandwidth(samplers, args.steps, rng, tbw)
        log(f"decode, batch 1: {args.reps} rounds of {args.steps}-step blocks per engine")
        blocks = [InProcess(e) for e in engines]
        t1 = blocked_decode(list(blocks), rng.integers(0, cfg.vocab_size, (1, args.context)),
                            rng.integers(0, cfg.vocab_size, (n + 1, 1)), rng, args.steps)
        log(f"decode, batch {BATCH}")
        tB = blocked_decode(list(blocks), rng.integers(0, cfg.vocab_size, (BATCH, args.context)),
                            rng.integers(0, cfg.vocab_size, (n + 1, BATCH)), rng, args.steps)
        log("prefill")
        pre = rng.integers(0, cfg.vocab_size, args.prefill)
        tp: dict[str, list[float]] = {e.name: [] for e in engines}
        for _ in range(max(6, 2 * args.reps)):
            for j in rng.permutation(len(engines)):
                tp[engines[j].name].append(_timed(functools.partial(engines[j].prefill_logits, pre)))
        log(f"context growth: decode at context {args.context} and {long_ctx}, taking turns")
        r = runner.runner
        for s in runner.seqs:
            r.free(s)
        runner.seqs = []
        ctx_ids = {"short": args.context, "long": long_ctx}
        for name, c in ctx_ids.items():
            r.alloc(name, c + n + 2)
            r.prefill(name, rng.integers(0, cfg.vocab_size, c))
            r.decode([name], np.array([1]))  # warm
        tc: dict[str, list[float]] = {"short": [], "long": []}
        for _ in range(n):
            for name in rng.permutation(list(ctx_ids)):
                tc[str(name)].append(_timed(functools.partial(r.decode, [str(name)], np.array([1]))))
        log("read bandwidth, again")
        sample_bandwidth(samplers, args.steps, rng, tbw)

    bw = {k.removeprefix("bw:"): (1 << 28) / stat(v) for k, v in tbw.items()}
    bandwidth = max(bw.values())
    # batch-1 decode reads every weight matrix once (fp32 in memory: float16 files are cast at
    # load), one embedding row, and the KV of the context
    layer_params = (param_count(cfg) - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
                    - cfg.hidden_size)
    head_params = cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    kv_bytes = 2 * cfg.kv_size * 4 * cfg.num_layers * (args.context + n // 2)
    bytes_per_token = 4 * (layer_params + head_params + cfg.hidden_size) + kv_bytes
    roofline = bandwidth / bytes_per_token
    best: dict[str, dict[str, float]] = {}
    medians: dict[str, dict[str, float]] = {}
    for name in (eng.name for eng in engines):
        for table, f in ((best, stat), (medians, _median)):
            table[name] = {"decode_tok_s_b1": 1 / f(t1[name]),
                           f"decode_tok_s_b{BATCH}": BATCH / f(tB[name]),
                           "prefill_tok_s": args.prefill / f(tp[name])}
    run_b = best["runner"]
    run_b["decode_ms_ctx_short"] = 1e3 * stat(tc["short"])
    run_b["decode_ms_ctx_long"] = 1e3 * stat(tc["long"])
    medians["runner"]["decode_ms_ctx_short"] = 1e3 * _median(tc["short"])
    medians["runner"]["decode_ms_ctx_long"] = 1e3 * _median(tc["long"])
    medians["read_bandwidth_gb_s"] = {k.removeprefix("bw:"): (1 << 28) / _median(v) / 1e9
                                      for k, v in tbw.items()}
    mono = best["monolithic"]
    ratios_mono = {k: run_b[k] / mono[k] for k in mono}
    result: dict[str, Any] = {
        "preset": args.preset, "parameters": param_count(cfg), "threads": threads, "attention": "fused",
        "context": args.context, "timed_steps": n, "reps": args.reps,
        "statistic": f"10th-percentile step time (the least disturbed by other processes); engines "
                     f"take turns in blocks of {args.steps} steps (shuffled order, {args.reps} rounds); "
                     "'medians' holds the same figures from median times",
        "block_steps": args.steps,
        "runner": run_b, "runner_per_block": best["runner_per_block"], "monolithic": mono,
        "transformers": best.get("transformers"),
        "max_abs_logit_diff": agree,
        "read_bandwidth_gb_s": {k: v / 1e9 for k, v in bw.items()},
        "bytes_per_token_b1": bytes_per_token,
        "roofline_tok_s_b1": roofline,
        "roofline_fraction": run_b["decode_tok_s_b1"] / roofline,
        "ratio_vs_monolithic": ratios_mono["decode_tok_s_b1"],
        "ratios_vs_monolithic": ratios_mono,
        "ratio_vs_transformers": None,
        "ctx_growth": run_b["decode_ms_ctx_long"] / run_b["decode_ms_ctx_short"],
        "ctx_growth_contexts": [args.context, long_ctx],
        "targets": TARGETS,
        "medians": medians,
    }
    if "transformers" in best:
        hf = best["transformers"]
        result["ratios_vs_transformers"] = {k: run_b[k] / hf[k] for k in hf}
        result["ratio_vs_transformers"] = result["ratios_vs_transformers"]["decode_tok_s_b1"]
    elif hf_note:
        result["transformers_note"] = hf_note
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_table(result)
    return 0


def _print_table(r: dict[str, Any]) -> None:
    print(f"model {r['preset']} ({r['parameters'] / 1e6:.1f}M params), {r['threads']} threads")
    keys = ["decode_tok_s_b1", f"decode_tok_s_b{BATCH}", "prefill_tok_s"]
    print(f"{'':18}" + "".join(f"{k:>20}" for k in keys))
    for name in ("runner", "runner_per_block", "monolithic", "transformers"):
        if r.get(name):
            print(f"{name:18}" + "".join(f"{r[name][k]:20.1f}" for k in keys))
    print(f"read bandwidth {max(r['read_bandwidth_gb_s'].values()):.1f} GB/s, batch-1 roofline "
          f"{r['roofline_tok_s_b1']:.1f} tok/s")
    for k, target in TARGETS.items():
        v = r.get(k)
        print(f"{k:24} {'n/a' if v is None else f'{v:.3f}':>8}   target {target}")
