"""``meshllm bench <what>``: benchmarks that print JSON comparing side by side in one run."""

from __future__ import annotations

import argparse
import importlib

# name -> module under meshllm/bench with register(parser) and run(args) -> int
BENCHES = ["runtime", "planner", "sim", "mesh", "wire", "load", "serving"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON, ratios measured in one run)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    for name in BENCHES:
        mod = importlib.import_module(f"meshllm.bench.{name}")
        bp = bsub.add_parser(name, help=(mod.__doc__ or "").strip().split("\n")[0])
        mod.register(bp)
        bp.set_defaults(func=mod.run)
