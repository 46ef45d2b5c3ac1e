"""Simulator speed: events per CPU second on a deep pipeline and on a phase-split plan, and the
e2llm-vs-splitwise experiment's time (its budget here is 2 minutes).

Times are CPU seconds of this process (``time.process_time``) so other load on a shared machine
does not count; wall seconds beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

TESTBEDS = Path(__file__).resolve().parents[2] / "tools" / "testbeds"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    p.add_argument("--requests", type=int, default=300, help="requests per simulation")
    p.add_argument("--skip-experiment", action="store_true",
                   help="leave out the full e2llm-vs-splitwise run (~1 minute)")


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def run(args: argparse.Namespace) -> int:
    from meshllm.commands.simulate import load_testbed
    from meshllm.planner.cost import ModelProfile
    from meshllm.planner.strategies import make_plan
    from meshllm.planner.types import Workload
    from meshllm.sim import experiments as ex
    from meshllm.sim.adapter import to_sim_model
    from meshllm.sim.serving import simulate
    from meshllm.sim.workload import poisson

    tb = load_testbed(TESTBEDS / "edgeshard.toml")
    profile = ModelProfile.from_preset("llama2-7b")
    inp, out = ex.MIXES["wide"]
    wl = Workload(0.1, inp, out, 16)
    result: dict[str, object] = {}
    for name, strategy in (("ring_15_stages", "ring"), ("splitwise", "splitwise")):
        plan = make_plan(strategy, profile, tb.devices, tb.network, wl, "waiting",
                         np.random.default_rng(0))
        model = to_sim_model(plan, profile, tb.by_name, tb.network, wl, entry=tb.source)
        reqs = poisson(0.1, args.requests, inp, out, np.random.default_rng(1))
        res, cpu, wall = _timed(lambda m=model, r=reqs: simulate(m, r))
        result[name] = {"requests": args.requests, "events": res.events, "cpu_s": round(cpu, 3),
                        "wall_s": round(wall, 3), "events_per_cpu_s": round(res.events / cpu)}
    if not args.skip_experiment:
        tbs = [load_testbed(TESTBEDS / f"{n}.toml") for n in ex.E2LLM_TESTBEDS]
        _, cpu, wall = _timed(lambda: ex.e2llm_vs_splitwise(make_plan, tbs))
        result["e2llm_vs_splitwise"] = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                                        "target_wall_s": "< 120"}
    print(json.dumps(result, indent=1))
    return 0
