"""``meshllm export``: write a model directory (ONNX blocks + manifest.json).

    meshllm export --random --preset {tiny,small,bench} --seed S --out DIR [--dtype float32|float16]
    meshllm export --hf-dir DIR --out DIR [--dtype float32|float16|int4] [--context N]
    meshllm export --gguf FILE --out DIR [--dtype float32|float16|int4] [--int4-mode exact|fast] [--context N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshllm.errors import ModelError, UserError
from meshllm.model.config import DEFAULT_INT4_MODE, INT4_MODES

if TYPE_CHECKING:
    from meshllm.model.manifest import Manifest

RANDOM_PRESETS = ["tiny", "small", "bench"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model directory of ONNX blocks",
                       description="Write a model directory (ONNX blocks + manifest.json) from random "
                                   "weights of a preset shape or from a local Hugging Face checkpoint.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--random", action="store_true", help="random weights of a preset shape")
    src.add_argument("--hf-dir", type=Path, help="a local Hugging Face checkpoint directory")
    src.add_argument("--gguf", type=Path, help="a GGUF file (llama.cpp / Ollama / LM Studio) of a "
                                               "llama, mistral or qwen2 model")
    p.add_argument("--preset", choices=RANDOM_PRESETS, default="tiny", help="shape for --random (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --random (default %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to ship with a --random model")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--dtype", choices=["float32", "float16", "int4"], default="float32",
                   help="storage dtype of the weights (default %(default)s). float16 is cast to float32 "
                        "at load; int4 keeps GGUF Q4_0/Q4_1/Q8_0 matrices exactly as stored and "
                        "quantizes the others to 4 bits, run by onnxruntime's MatMulNBits")
    p.add_argument("--int4-mode", choices=list(INT4_MODES), default=DEFAULT_INT4_MODE,
                   help="int4 compute: exact (float32 activations) or fast (int8 activations); "
                        "see docs/models.md (default %(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="cap the context length (tokens) below the checkpoint's")
    p.add_argument("--name", default=None, help="model name in the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_out(out: Path) -> None:
    # Refuse to scatter block files into an unrelated non-empty directory; re-exporting over a
    # model directory (it has a manifest.json) is fine.
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise UserError(f"--out {out} is a non-empty directory that is not a meshllm model; "
                        f"choose an empty or new directory")


def run(args: argparse.Namespace) -> int:
    _check_out(args.out)
    if args.context is not None and args.context <= 0:
        raise UserError(f"--context must be positive, got {args.context}")
    if args.random:
        manifest = _export_random(args)
    elif args.gguf is not None:
        from meshllm.model.gguf_import import import_gguf

        manifest = import_gguf(args.gguf, args.out, weight_dtype=args.dtype, int4_mode=args.int4_mode,
                               name=args.name, max_position=args.context, progress=not args.quiet)
    else:
        from meshllm.model.hf_import import import_checkpoint

        manifest = import_checkpoint(args.hf_dir, args.out, weight_dtype=args.dtype, name=args.name,
                                     max_position=args.context, progress=not args.quiet,
                                     int4_mode=args.int4_mode)
    cfg = manifest.config
    print(json.dumps({"out": str(args.out), "name": manifest.name, "model_id": manifest.model_id,
                      "architecture": cfg.architecture, "layers": cfg.num_layers,
                      "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "context": cfg.max_position,
                      "dtype": cfg.weight_dtype,
                      **({"int4_mode": manifest.provenance.get("int4_mode")}
                         if manifest.provenance and "int4_mode" in manifest.provenance else {}),
                      "param_bytes": sum(b.cost.param_bytes for b in manifest.blocks),
                      "tokenizer": manifest.tokenizer_file is not None}))
    return 0


def _export_random(args: argparse.Namespace) -> Manifest:
    import dataclasses

    from meshllm.model.config import preset
    from meshllm.model.export import export_model, random_weights

    cfg = preset(args.preset)
    if args.context is not None:
        cfg = dataclasses.replace(cfg, max_position=args.context)
    if args.tokenizer is not None:
        from meshllm.model.tokenizer import Tokenizer

        n = Tokenizer.from_file(args.tokenizer).vocab_size
        if n > cfg.vocab_size:
            raise ModelError(f"tokenizer {args.tokenizer} has {n} tokens, more than the preset's "
                             f"vocabulary of {cfg.vocab_size}")
    weights = random_weights(cfg, np.random.default_rng(args.seed))
    return export_model(weights, cfg, args.out, name=args.name or f"{args.preset}-random-{args.seed}",
                        tokenizer_file=args.tokenizer, weight_dtype=args.dtype,
                        int4_mode=args.int4_mode, progress=not args.quiet)
