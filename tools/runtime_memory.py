#!/usr/bin/env python3
"""The memory measurements behind docs/runtime.md, as one JSON object.

    .venv/bin/python tools/runtime_memory.py [--preset bench] [--json]

* ``weights``: VmRSS after building a ``StageRunner`` over the whole model, minus before, over the
  block files' bytes, for fp32, fp16 and int4 (fast, exact) weights, fused and per block (each in a fresh process so
  one load's leftovers do not count in the next), beside ``weight_bytes_resident``;
* ``kv``: VmRSS after writing 8 sequences x 300 positions into a 16-slot cache of the preset's
  shape, and after freeing them;
* ``fp16_runtime_cast``: one layer's decode step with float16 weights folded to float32 at load
  (what the runner does) vs kept float16 and cast every step (weights fed as graph inputs so
  nothing folds them), taking turns, 10th-percentile ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_one(model_dir: str, fuse: bool) -> dict[str, Any]:
    """In this process: RSS growth of loading a whole-model runner."""
    from meshllm.model.manifest import load_manifest
    from meshllm.runtime.runner import StageRunner

    m = load_manifest(model_dir)
    stored = sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in (".onnx", ".data"))
    before = rss()
    r = StageRunner(m, 0, m.config.num_blocks, threads=1, max_seqs=9, fuse=fuse)
    grown = rss() - before
    return {"fuse": fuse, "stored_mib": stored / 2**20, "rss_growth_mib": grown / 2**20,
            "ratio": grown / stored, "weight_bytes_resident_mib": r.weight_bytes_resident / 2**20}


def kv_pages(preset: str) -> dict[str, float]:
    from meshllm.model.config import PRESETS
    from meshllm.runtime.kv import KVCache

    cfg = PRESETS[preset]
    kv = KVCache(list(range(1, cfg.num_layers + 1)), kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 slot_len=cfg.max_position, max_seqs=16, budget_bytes=None)
    base = rss()
    k = np.ones((300, cfg.num_kv_heads, cfg.head_dim), np.float32)
    for s in range(8):
        kv.alloc(s, cfg.max_position)
        for b in kv.blocks:
            kv.import_(s, b, k, k, 0)
    written = rss() - base
    for s in range(8):
        kv.free(s)
    return {"kv_written_mib": 8 * 300 * kv.bytes_per_token / 2**20, "rss_growth_mib": written / 2**20,
            "rss_after_free_mib": (rss() - base) / 2**20}


def runtime_cast(layer_file: Path, hidden: int, kv_heads: int, head_dim: int) -> dict[str, float]:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from meshllm.runtime.runner import bind_buffer, session_options

    m = onnx.load(str(layer_file))
    casted = {n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    feeds, keep = {}, []
    for t in m2.graph.initializer:
        if t.name in casted and t.data_type == onnx.TensorProto.FLOAT16:
            feeds[t.name] = numpy_helper.to_array(t).copy()
            m2.graph.input.append(onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT16,
                                                                     list(t.dims)))
        else:
            keep.append(t)
    del m2.graph.initializer[:]
    m2.graph.initializer.extend(keep)
    sessions = [ort.InferenceSession(x.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
                for x in (m, m2)]
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for B in (1, 8):
        kv = [np.zeros((B, kv_heads, 256, head_dim), np.float32) for _ in range(2)]
        x = rng.standard_normal((B, 1, hidden)).astype(np.float32)  # (B, 1, H)
        seqlens, total = np.full(B, 64, np.int32), np.array(65, np.int32)
        runs = []
        for sess, extra in zip(sessions, ({}, feeds), strict=True):
            io = sess.io_binding()
            y = np.empty((B, 1, hidden), np.float32)
            bind_buffer(io, "hidden", x, False)
            bind_buffer(io, "hidden_out", y, True)
            bind_buffer(io, "seqlens_k", seqlens, False)
            bind_buffer(io, "total_sequence_length", total, False)
            for name, buf in (("key", kv[0]), ("value", kv[1])):
                bind_buffer(io, f"past_{name}", buf, False)
                bind_buffer(io, f"present_{name}", buf, True)
            for name, a in extra.items():
                bind_buffer(io, name, a, False)
            runs.append((sess, io, y))  # y must outlive the binding
        times: list[list[float]] = [[], []]
        for _ in range(60):
            for j in rng.permutation(2):
                sess, io, _ = runs[j]
                t0 = time.perf_counter()
                sess.run_with_iobinding(io)
                times[j].append(time.perf_counter() - t0)
        folded, cast = (float(np.percentile(t[5:], 10)) * 1e3 for t in times)
        out[f"b{B}_folded_ms"], out[f"b{B}_runtime_cast_ms"] = folded, cast
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--json", action="store_true")
    p.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._load:  # child process: one load
        print(json.dumps(load_one(args._load[0], args._load[1] == "1")))
        return
    from meshllm.model.config import PRESETS
    from meshllm.model.export import export_model, random_weights

    cfg = PRESETS[args.preset]
    report: dict[str, Any] = {"preset": args.preset, "weights": {}}
    with tempfile.TemporaryDirectory() as tmp:
        w = random_weights(cfg, np.random.default_rng(0))
        for dtype, mode in (("float32", None), ("float16", None), ("int4", "fast"), ("int4", "exact")):
            kind = dtype if mode is None else f"{dtype}_{mode}"
            d = Path(tmp) / kind
            export_model(w, cfg, d, name=kind, weight_dtype=dtype, progress=False,
                         **({"int4_mode": mode} if mode else {}))
            for fuse in (True, False):
                res = subprocess.run([sys.executable, __file__, "--_load", str(d), "1" if fuse else "0"],
                                     check=True, capture_output=True, text=True)
                report["weights"][f"{kind}_{'fused' if fuse else 'per_block'}"] = json.loads(res.stdout)
        del w
        report["kv"] = kv_pages(args.preset)
        report["fp16_runtime_cast"] = runtime_cast(Path(tmp) / "float16" / "layer.0.onnx", cfg.hidden_size,
                                                   cfg.num_kv_heads, cfg.head_dim)
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
