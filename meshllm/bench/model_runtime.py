"""Runtime speed of a real model directory (``meshllm bench runtime --model DIR [--gguf FILE]``).

The runner on the model is measured side by side with llama.cpp (``llama-cpp-python``, when it is
importable and the GGUF file is given) and transformers (loading the same GGUF, unless
``--no-transformers``), with the same thread count, taking turns step by step as the preset
benchmark does. The roofline comes from the bytes the model really reads per decoded token: the
stored weights of the layers and the head (int4: packed values, scales, zero points, offsets;
float16 files are cast to float32 at load, so twice their size), one embedding row, and the KV of
the context, over the best measured read bandwidth. ``rss_mb`` is the process's resident memory
after loading the runner, before any other engine is loaded (``VmRSS`` in ``/proc/self/status``).

The runner columns run the attention kind a node started here serves with by default
(``runtime.attention``; ``attention`` in the JSON, ``--attention`` to choose); the other kind runs
beside them at batch 1 (``runner_plain`` or ``runner_fused``, ``decode_ratio_<kind>_vs_<other>``),
and ``kernels_per_token`` is counted for both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.bench.foreign import rss_mb
from meshllm.bench.harness import EngineFailed
from meshllm.errors import MeshError, UserError

TARGETS_INT4 = {"ratio_vs_llamacpp": ">= 1.25 (aim 1.8)", "ratio_vs_ortgenai": ">= 1.0 (aim 1.1)",
                "b8_vs_llamacpp_b1": ">= 4 (aim 5)", "prefill_ratio_vs_llamacpp": ">= 3 (aim 4)",
                "fast_agreement": ">= 0.98 (aim 1.0)", "rss_over_stored": "<= 1.2 (aim 1.1)"}
AGREEMENT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
                     "Give me a tip for writing clean code.", "What is 17 times 3?", "Name three colours.",
                     "Summarise the plot of Hamlet in one sentence.", "How do I boil an egg?",
                     "Why is the sky blue?", "Write a short poem about autumn leaves.",
                     "List two benefits of regular exercise.", "What does a compiler do?",
                     "Translate 'good morning' into French.", "Describe a cat in three words.",
                     "What is the boiling point of water at sea level?", "Suggest a name for a pet fish."]
AGREEMENT_TOKENS = 48  # 16 prompts x 48 positions: one flipped near-tie moves the figure by 0.0013


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
    from meshllm.bench.harness import (
        BATCH,
        ForeignEngine,
        InProcess,
        RunnerEngine,
        _median,
        agreement,
        bandwidth_samplers,
        blocked_decode,
        exact_continuations,
        kernels_per_token,
        ortgenai_picks,
        runner_picks,
        sample_bandwidth,
        stat,
    )
    from meshllm.model.manifest import load_manifest
    from meshllm.runtime.runner import StageRunner, default_threads

    model_dir = Path(args.model)
    manifest = load_manifest(model_dir)
    cfg = manifest.config
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and not gguf.is_file():
        raise UserError(f"--gguf {gguf}: no such file")
    threads = args.threads or default_threads()
    rng = np.random.default_rng(args.seed)
    block = args.steps
    n = args.steps * args.reps
    prefill = args.prefill or 300
    max_len = min(cfg.max_position, max(args.context, prefill) + n + 2)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else (lambda s: None)

    # the attention a node started here serves with by default (runtime.attention, serve.speculate)
    import os

    from meshllm.runtime.attention import FUSED, PLAIN, choose
    from meshllm.settings import attention_setting

    setting, speculate = attention_setting(os.environ)
    attn = choose(getattr(args, "attention", None) or setting, speculate)
    other = PLAIN if attn == FUSED else FUSED
    rss0 = rss_mb()
    runner = RunnerEngine(model_dir, threads, max_len, attention=attn)
    rss_runner = rss_mb()
    engines: list[Any] = [InProcess(runner)]
    if not args.no_spin:  # the same runner with onnxruntime's threads waiting busy between kernels
        engines.append(InProcess(RunnerEngine(model_dir, threads, max_len, name="runner_spin", spin=True,
                                              attention=attn)))
    if not getattr(args, "no_other_attention", False):  # the other kind, side by side (batch 1)
        engines.append(InProcess(RunnerEngine(model_dir, threads, max_len, name=f"runner_{other}", attention=other)))
    notes: dict[str, str] = {}
    foreign: list[tuple[str, dict[str, Any]]] = []
    og_dir: Path | None = None
    if gguf is None:
        notes["llamacpp"] = notes["transformers"] = notes["ortgenai"] = "no --gguf file given"
    else:
        foreign.append(("llamacpp", {"gguf": str(gguf), "threads": threads, "n_ctx": max_len + 8}))
        if not args.no_ortgenai:
            try:
                from meshllm.bench.ortgenai import ensure_ortgenai_model
                from meshllm.model.fetch import cache_root

                log("onnxruntime-genai: its builder's int4 CPU model of the same weights (built once)")
                og_dir = ensure_ortgenai_model(gguf, cache_root())
                foreign.append(("ortgenai", {"model_dir": str(og_dir), "threads": threads, "n_ctx": max_len + 8}))
            except (ImportError, MeshError, OSError) as e:
                notes["ortgenai"] = str(e)
        if not args.no_transformers:
            foreign.append(("transformers", {"gguf": str(gguf), "threads": threads, "n_ctx": max_len}))
    foreign_rss: dict[str, float] = {}
    for kind, options in foreign:
        try:
            eng = ForeignEngine(kind, kind, **options)
            foreign_rss[kind] = eng.info.get("rss_mb", float("nan"))
            engines.append(eng)
        except EngineFailed as e:
            notes[kind] = str(e)
    names = [eng.name for eng in engines]
    log(f"engines: {', '.join(names)}; read bandwidth")
    samplers = bandwidth_samplers()
    tbw: dict[str, list[float]] = {}
    sample_bandwidth(samplers, max(4, args.reps), rng, tbw)
    log(f"decode, batch 1: {args.reps} rounds of {block}-step blocks per engine")
    t1 = blocked_decode(engines, rng.integers(0, cfg.vocab_size, (1, args.context)),
                        rng.integers(0, cfg.vocab_size, (n + 1, 1)), rng, block, notes)
    log(f"decode, batch {BATCH} (meshllm and transformers)")
    batched = [eng for eng in engines if eng.name in ("runner", "runner_spin", "transformers")]
    tB = blocked_decode(batched, rng.integers(0, cfg.vocab_size, (BATCH, args.context)),
                        rng.integers(0, cfg.vocab_size, (n + 1, BATCH)), rng, block, notes)
    engines = [eng for eng in engines if eng.name not in notes]
    log(f"prefill of {prefill} tokens")
    pre = rng.integers(0, cfg.vocab_size, prefill)
    tp: dict[str, list[float]] = {eng.name: [] for eng in engines}
    for rep in range(max(4, args.reps) + 1):  # the first is a warm-up
        for eng in [engines[j] for j in rng.permutation(len(engines))]:
            try:
                s = eng.prefill_s(pre)
            except EngineFailed as e:
                notes[eng.name] = str(e)
                engines.remove(eng)
                continue
            if rep:
                tp[eng.name].append(s)
    sample_bandwidth(samplers, max(4, args.reps), rng, tbw)
    for eng in engines:
        eng.close()
    live = [name for name in names if name in t1 and tp.get(name)]

    extra: dict[str, Any] = {}
    if not args.no_kernels:
        log("kernels per decode step (onnxruntime's profiler)")
        extra["kernels_per_token"] = kernels_per_token(model_dir, threads, args.context, attention=attn)
        extra[f"kernels_per_token_{other}"] = kernels_per_token(model_dir, threads, args.context, attention=other)
    if args.exact_model:
        log("the fast mode's teacher-forced agreement with the exact mode")
        from meshllm.model.tokenizer import Tokenizer

        tok = Tokenizer.from_manifest(manifest)
        prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in AGREEMENT_PROMPTS]
        rx, seqs = exact_continuations(Path(args.exact_model), prompts, AGREEMENT_TOKENS, threads, attention=attn)
        exact_picks = runner_picks(rx, prompts, seqs)
        rf = StageRunner(manifest, 0, cfg.num_blocks, threads=threads, max_seqs=1, one_pass=attn == PLAIN)
        same, total = agreement(exact_picks, runner_picks(rf, prompts, seqs))
        del rx, rf
        extra["fast_agreement"] = same / total
        extra["fast_agreement_counts"] = [same, total]
        if og_dir is not None:  # the same measure for onnxruntime-genai's build of the same file
            try:
                same, total = agreement(exact_picks, ortgenai_picks(og_dir, prompts, seqs, threads))
                extra["ortgenai_agreement"] = same / total
                extra["ortgenai_agreement_counts"] = [same, total]
            except Exception as e:  # onnxruntime raises its own types; the figure is optional
                notes["ortgenai_agreement"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if not args.no_kernels:
            extra["kernels_per_token_exact"] = kernels_per_token(Path(args.exact_model), threads, args.context,
                                                                 attention=attn)

    bandwidth = max((1 << 28) / stat(v) for v in tbw.values())
    bpt = bytes_per_token(manifest, args.context + n // 2)
    roofline = bandwidth / bpt
    figures: dict[str, dict[str, float]] = {}
    medians: dict[str, dict[str, float]] = {}
    for name in live:
        for table, f in ((figures, stat), (medians, _median)):
            row = {"decode_tok_s_b1": 1 / f(t1[name]), "prefill_tok_s": prefill / f(tp[name])}
            if name in tB:
                row[f"decode_tok_s_b{BATCH}"] = BATCH / f(tB[name])
            table[name] = row
    r = figures["runner"]
    stored = sum(b.cost.param_bytes for b in manifest.blocks)
    result: dict[str, Any] = {
        "model": str(model_dir), "name": manifest.name, "dtype": cfg.weight_dtype, "attention": attn,
        "int4_mode": (manifest.provenance or {}).get("int4_mode"), "threads": threads,
        "context": args.context, "prefill_tokens": prefill, "timed_steps": n, "block_steps": block,
        "statistic": f"10th-percentile step time; engines take turns in blocks of {block} steps "
                     f"(shuffled order, {args.reps} rounds); foreign engines run in child processes; "
                     "'medians' holds the same figures from median times",
        "decode_tok_s_b1": r["decode_tok_s_b1"], f"decode_tok_s_b{BATCH}": r[f"decode_tok_s_b{BATCH}"],
        "prefill_tok_s": r["prefill_tok_s"],
        "stored_weight_mb": stored / 2**20,
        "rss_mb": rss_runner, "rss_mb_before_load": rss0,
        "rss_over_stored": (rss_runner - rss0) * 2**20 / stored,
        "read_bandwidth_gb_s": bandwidth / 1e9, "bytes_per_token_b1": bpt,
        "roofline_tok_s_b1": roofline, "roofline_fraction": r["decode_tok_s_b1"] / roofline,
        "llamacpp_decode_tok_s_b1": None, "llamacpp_prefill_tok_s": None, "ratio_vs_llamacpp": None,
        "prefill_ratio_vs_llamacpp": None, "b8_vs_llamacpp_b1": None,
        "ortgenai_decode_tok_s_b1": None, "ortgenai_prefill_tok_s": None, "ratio_vs_ortgenai": None,
        "transformers": figures.get("transformers"), "ratio_vs_transformers": None,
        "foreign_rss_mb": foreign_rss,
        **extra,
        "targets": TARGETS_INT4 if cfg.weight_dtype == "int4" else {},
        "medians": medians, "notes": notes,
    }
    if "llamacpp" in figures:
        lc = figures["llamacpp"]
        result.update(llamacpp_decode_tok_s_b1=lc["decode_tok_s_b1"], llamacpp_prefill_tok_s=lc["prefill_tok_s"],
                      ratio_vs_llamacpp=r["decode_tok_s_b1"] / lc["decode_tok_s_b1"],
                      prefill_ratio_vs_llamacpp=r["prefill_tok_s"] / lc["prefill_tok_s"],
                      b8_vs_llamacpp_b1=r[f"decode_tok_s_b{BATCH}"] / lc["decode_tok_s_b1"])
    if "ortgenai" in figures:
        og = figures["ortgenai"]
        result.update(ortgenai_decode_tok_s_b1=og["decode_tok_s_b1"], ortgenai_prefill_tok_s=og["prefill_tok_s"],
                      ratio_vs_ortgenai=r["decode_tok_s_b1"] / og["decode_tok_s_b1"])
    if "runner_spin" in figures:
        sp = figures["runner_spin"]
        result["runner_spin"] = sp
        for base in ("llamacpp", "ortgenai"):
            if base in figures:
                result[f"spin_ratio_vs_{base}"] = sp["decode_tok_s_b1"] / figures[base]["decode_tok_s_b1"]
    if f"runner_{other}" in figures:  # the other attention kind, same run, batch 1
        ot = figures[f"runner_{other}"]
        result[f"runner_{other}"] = ot
        result[f"decode_ratio_{attn}_vs_{other}"] = r["decode_tok_s_b1"] / ot["decode_tok_s_b1"]
    if "transformers" in figures:
        result["ratio_vs_transformers"] = r["decode_tok_s_b1"] / figures["transformers"]["decode_tok_s_b1"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k in ("decode_tok_s_b1", f"decode_tok_s_b{BATCH}", "prefill_tok_s", "llamacpp_decode_tok_s_b1",
                  "llamacpp_prefill_tok_s", "ortgenai_decode_tok_s_b1", "ortgenai_prefill_tok_s",
                  "ratio_vs_llamacpp", "ratio_vs_ortgenai", "prefill_ratio_vs_llamacpp", "b8_vs_llamacpp_b1",
                  "fast_agreement", "rss_over_stored", "roofline_fraction", "rss_mb", "stored_weight_mb"):
            v = result.get(k)
            target = result["targets"].get(k, "")
            print(f"{k:28} {'n/a' if v is None else f'{v:.2f}':>10}   {target}")
        if "kernels_per_token" in result:
            print(f"{'kernels_per_token':28} {result['kernels_per_token']['total']:>10}")
        for k, note in notes.items():
            print(f"{k}: {note}")
    return 0
