"""``meshllm plan``: place a model on a testbed with a strategy and print the plan."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from meshllm.errors import ConfigError, PlanError, UserError
from meshllm.model.config import PRESETS
from meshllm.planner.cost import ModelProfile
from meshllm.planner.problem import Problem, check_workload
from meshllm.planner.strategies import OBJECTIVES, STRATEGIES, cost_inputs, parse_strategy, plan_problem
from meshllm.planner.testbed import load_testbed
from meshllm.planner.types import LengthDist, Plan, Workload


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="place a model on a testbed (EdgeShard, E2LLM and baselines)",
                       description=__doc__)
    p.add_argument("--testbed", required=True, help="testbed TOML file (see tools/testbeds/)")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}) or a model directory with manifest.json")
    p.add_argument("--strategy", default="e2llm", type=_strategy, metavar="STRATEGY",
                   help=f"one of {', '.join(sorted(STRATEGIES))} (default %(default)s); for experiments "
                        "e2llm:ROLES pins the replicas' roles (e2llm:prefill,decoder) and e2llm:N their "
                        "number, the planner still grouping the devices and splitting the layers")
    p.add_argument("--objective", default="waiting", choices=OBJECTIVES,
                   help="what cloud-edge-opt optimises (the others have their own)")
    p.add_argument("--workload", default="",
                   help="overrides of the testbed's [workload], comma separated: rate=R, "
                        "input=SPEC, output=SPEC, batch=B; SPEC is N, uniform:LO:HI, "
                        "lognormal:MEAN:SIGMA[:MAX] or empirical:A/B/C")
    p.add_argument("--seed", type=int, default=0, help="seed of the GA (e2llm)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--json", action="store_true", help="the plan and the cost tables it used, as JSON")
    p.set_defaults(func=run)


def _strategy(text: str) -> str:
    try:
        parse_strategy(text)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_profile(spec: str) -> ModelProfile:
    """A preset name, or a model directory / manifest.json path."""
    if spec in PRESETS:
        return ModelProfile.from_preset(spec)
    from meshllm.model.manifest import load_manifest

    path = Path(spec)
    if path.name == "manifest.json":
        path = path.parent
    if not path.is_dir():
        raise UserError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    m = load_manifest(path, verify=False)
    return ModelProfile.from_costs(m.costs, m.name, m.config.max_position)


def length_spec(text: str) -> LengthDist:
    """``32`` | ``uniform:16:256`` | ``lognormal:256:0.8[:2048]`` | ``empirical:10/20/30``."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return LengthDist.fixed(int(parts[0]))
        kind, args = parts[0], parts[1:]
        if kind == "uniform" and len(args) == 2:
            return LengthDist.uniform(int(args[0]), int(args[1]))
        if kind == "lognormal" and len(args) in (2, 3):
            return LengthDist.lognormal(float(args[0]), float(args[1]), int(args[2]) if len(args) == 3 else 0)
        if kind == "empirical" and len(args) == 1:
            return LengthDist.empirical([int(x) for x in args[0].split("/")])
    except ValueError:
        pass
    raise ConfigError(f"bad length spec {text!r}; use N, uniform:LO:HI, lognormal:MEAN:SIGMA[:MAX] "
                      "or empirical:A/B/C")


def workload_from(base: Workload | None, text: str) -> Workload:
    """The testbed's workload (or the default) with ``key=value`` overrides applied."""
    w = base if base is not None else Workload()
    rate, inp, out, batch = w.arrival_rate, w.input_len, w.output_len, w.max_batch
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --workload item {item!r}; expected key=value")
        try:
            if key == "rate":
                rate = float(val)
            elif key == "input":
                inp = length_spec(val)
            elif key == "output":
                out = length_spec(val)
            elif key == "batch":
                batch = int(val)
            else:
                raise ConfigError(f"unknown --workload key {key!r}; use rate, input, output, batch")
        except ValueError:
            raise ConfigError(f"bad --workload value {item!r}") from None
    return Workload(rate, inp, out, batch, w.kv_percentile)


def _fmt(x: float | None, unit: str = "", nd: int = 2) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "overloaded"
    return f"{x:.{nd}f}{unit}"


def render(plan: Plan, pb: Problem) -> str:
    """The plan as a readable table."""
    p = pb.profile
    lines = [f"plan epoch {plan.epoch}  strategy {plan.strategy}  model {p.name or '?'} "
             f"({p.n_blocks} blocks, {p.total_weight_bytes / 2**30:.1f} GiB)",
             f"workload: {pb.workload.arrival_rate:g} req/s, prompt mean {pb.workload.input_len.mean:.0f}, "
             f"output mean {pb.workload.output_len.mean:.0f}, batch <= {pb.workload.max_batch}", ""]
    lines.append(f"{'replica':>7}  {'role':<8} {'node':<16} {'blocks':>10}  {'weights':>9}  {'memory':>9}")
    for r in plan.replicas:
        for k, s in enumerate(r.stages):
            dev = pb.devices[pb.index[s.node]]
            lines.append(f"{r.id if k == 0 else '':>7}  {r.role.value if k == 0 else '':<8} {s.node:<16} "
                         f"{f'[{s.first}, {s.end})':>10}  {p.weight_bytes(s.first, s.end) / 2**30:7.2f}Gi  "
                         f"{dev.memory_bytes / 2**30:7.1f}Gi")
    used = set(plan.nodes)
    idle = [d.name for d in pb.devices if d.name not in used]
    if idle:
        lines.append(f"idle: {', '.join(idle)}")
    if plan.note:
        lines.append(plan.note)
    pr = plan.predicted
    lines += ["", "predicted:",
              f"  latency            {_fmt(pr.latency_ms_per_token, ' ms/token')}",
              f"  throughput         {_fmt(pr.throughput_tps, ' tokens/s')}",
              f"  prefill capacity   {_fmt(pr.prefill_capacity_rps, ' req/s', 3)}",
              f"  decode capacity    {_fmt(pr.decode_capacity_rps, ' req/s', 3)}",
              f"  saturation         {_fmt(pr.saturation_rps, ' req/s', 3)}",
              f"  mean wait          {_fmt(pr.mean_wait_s, ' s', 3)}",
              f"  mean TTFT          {_fmt(pr.mean_ttft_s, ' s', 3)}",
              f"  mean end-to-end    {_fmt(pr.mean_e2e_s, ' s', 3)}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    tb = load_testbed(args.testbed)
    prof = model_profile(args.model)
    w = workload_from(tb.workload, args.workload)
    check_workload(w, prof.max_context)
    pb = Problem(prof, tb.devices, tb.network, w)
    plan = plan_problem(args.strategy, pb, args.objective, np.random.default_rng(args.seed), args.epoch)
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "inputs": cost_inputs(pb)}, indent=1))
    else:
        print(render(plan, pb))
    return 0
