"""``meshllm simulate``: run a plan against a workload in the discrete-event simulator, or run
one of the papers' experiments (``--experiment``) and print our figures beside theirs."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.errors import ConfigError, UserError

EXPERIMENTS = ("edgeshard-table4", "bandwidth-sweep", "e2llm-vs-splitwise")
TESTBED_DIR = Path(__file__).resolve().parents[2] / "tools" / "testbeds"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a plan serving a workload, or the papers' experiments",
                       description=__doc__)
    p.add_argument("--experiment", choices=EXPERIMENTS, help="run one of the papers' experiments")
    p.add_argument("--json", action="store_true", help='print {"rows": [...]} as JSON')
    p.add_argument("--plots", metavar="DIR", help="write PNG charts into DIR (needs matplotlib)")
    p.add_argument("--testbeds-dir", default=str(TESTBED_DIR),
                   help="where the experiments find edgeshard.toml and home.toml")
    p.add_argument("--quick", action="store_true",
                   help="e2llm-vs-splitwise: fewer requests and loads (a smoke run)")
    p.add_argument("--testbed", metavar="FILE", help="testbed TOML for a single simulation")
    p.add_argument("--model", default="llama2-7b", help="model preset or model directory")
    p.add_argument("--strategy", default="e2llm", help="planner strategy")
    p.add_argument("--objective", default="waiting", choices=("latency", "throughput", "waiting"))
    p.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, requests/s")
    p.add_argument("--requests", type=int, default=300, help="number of requests to simulate")
    p.add_argument("--arrivals", default="poisson", choices=("poisson", "bursty"))
    p.add_argument("--burst-on", type=float, default=10.0, help="bursty: mean on period, s")
    p.add_argument("--burst-off", type=float, default=10.0, help="bursty: mean off period, s")
    p.add_argument("--trace", metavar="CSV", help="arrival_s,input_tokens,output_tokens rows")
    p.add_argument("--input-len", default="32",
                   help="N | uniform:LO:HI | lognormal:MEAN:SIGMA[:MAX] | empirical:A,B,C")
    p.add_argument("--output-len", default="96", help="same forms as --input-len")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded at once per replica")
    p.add_argument("--pipeline", default="no-bubbles", choices=("no-bubbles", "bubbles"))
    p.add_argument("--routing", default="completion", choices=("completion", "start"),
                   help="routing policy: least predicted completion, or earliest start (the "
                        "waiting-time objective; the e2llm-vs-splitwise experiment uses it)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


# --- inputs ---------------------------------------------------------------------------------

def parse_length(text: str):
    from meshllm.planner.types import LengthDist

    t = text.strip()
    try:
        if ":" not in t:
            return LengthDist.fixed(int(t))
        kind, _, rest = t.partition(":")
        if kind == "uniform":
            lo, hi = rest.split(":")
            return LengthDist.uniform(int(lo), int(hi))
        if kind == "lognormal":
            parts = rest.split(":")
            return LengthDist.lognormal(float(parts[0]), float(parts[1]),
                                        int(parts[2]) if len(parts) > 2 else 0)
        if kind == "empirical":
            return LengthDist.empirical([int(x) for x in rest.split(",") if x.strip()])
        if kind == "fixed":
            return LengthDist.fixed(int(rest))
    except (ValueError, IndexError):
        pass
    raise UserError(f"bad length {text!r}: use N, uniform:LO:HI, lognormal:MEAN:SIGMA[:MAX] "
                    "or empirical:A,B,C")


def load_testbed(path: str | Path):
    from meshllm.planner import testbed as tbmod
    from meshllm.sim.experiments import Testbed

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"testbed file not found: {p}")
    tb = tbmod.load_testbed(p)
    return Testbed(p.stem, tuple(tb.devices), tb.network)


def _plan_fn():
    from meshllm.planner.strategies import make_plan

    return make_plan


# --- printing -------------------------------------------------------------------------------

def _no_nan(v: Any) -> Any:
    """``v`` with every NaN float as None (null): JSON has no NaN, and a figure no request has
    (TPOT when every output is one token) is null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_no_nan(x) for x in v]
    return v


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"  # a figure no request has (TPOT when every output is one token)
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("%"))
    except ValueError:
        return cell in ("-", "OOM", "inf")
    return True


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w[i]) for i, h in enumerate(headers))
    out = [line, "  ".join("-" * x for x in w)]
    out += ["  ".join(c.rjust(w[i]) if i and _numeric(c) else c.ljust(w[i]) for i, c in enumerate(r))
            for r in rows]
    return "\n".join(out)


def print_table4(rows: list[dict]) -> None:
    body = []
    for r in rows:
        ours_l = "OOM" if r["oom"] else _fmt(r["latency_ms"])
        ours_t = "OOM" if r["oom"] else _fmt(r["throughput_tok_s"])
        pap_l = "OOM" if r["paper_latency_ms"] is None else _fmt(r["paper_latency_ms"])
        pap_t = "OOM" if r["paper_throughput_tok_s"] is None else _fmt(r["paper_throughput_tok_s"])
        bub = "OOM" if r["oom"] else _fmt(r.get("throughput_bubbles_tok_s"))
        body.append([r["model"], r["method"], ours_l, pap_l, ours_t, pap_t, _fmt(r.get("batch")), bub])
    print(_table(["model", "method", "latency ms/tok", "paper", "throughput tok/s", "paper",
                  "batch", "Bubbles tok/s"], body))


def print_sweep(rows: list[dict]) -> None:
    body = [[r["model"], r["method"], _fmt(r["bandwidth_mbps"], 0),
             "OOM" if r["oom"] else _fmt(r["latency_ms"]),
             "OOM" if r["oom"] else _fmt(r["throughput_tok_s"])] for r in rows]
    print(_table(["model", "method", "Mb/s", "latency ms/tok", "throughput tok/s"], body))


def print_e2llm(rows: list[dict], reds: list[dict], sats: list[dict]) -> None:
    for s in sats:
        print(f"# {s['testbed']} / {s['mix']}: model {s['model']}, splitwise saturates at "
              f"{s['saturation_rps']:.3f} req/s")
    body = [[r["testbed"], r["mix"], _fmt(r["load_fraction"]), r["strategy"],
             _fmt(r["mean_wait_s"], 3), _fmt(r["p99_wait_s"], 3), _fmt(r["throughput_tok_s"], 1)]
            for r in rows]
    for msg in dict.fromkeys(f"{r['testbed']} / {r['mix']}: {r['strategy']} could not plan: {r['error']}"
                             for r in rows if r.get("error")):
        print(f"# {msg}")
    print(_table(["testbed", "mix", "load", "strategy", "mean wait s", "p99 wait s", "tok/s"], body))
    print()
    body = [[r["testbed"], r["mix"], _fmt(r["load_fraction"]), _fmt(r["e2llm_wait_s"], 3),
             _fmt(r["splitwise_wait_s"], 3), f"{100 * r['reduction']:.0f}%"] for r in reds]
    print(_table(["testbed", "mix", "load", "e2llm wait s", "splitwise wait s", "reduction"], body))


# --- plots ----------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'meshllm[plots]'") from None
    return plt


def plot_table4(rows: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    models = sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, pkey, label in ((axes[0], "latency_ms", "paper_latency_ms", "latency, ms/token"),
                                 (axes[1], "throughput_tok_s", "paper_throughput_tok_s",
                                  "throughput, tokens/s")):
        x = np.arange(len(models))
        wd = 0.8 / len(methods)
        for i, meth in enumerate(methods):
            ours = [next((r[key] for r in rows if r["model"] == m and r["method"] == meth), None)
                    for m in models]
            paper = [next((r[pkey] for r in rows if r["model"] == m and r["method"] == meth), None)
                     for m in models]
            xs = x + (i - (len(methods) - 1) / 2) * wd
            bars = ax.bar(xs, [v or 0 for v in ours], wd, label=meth)
            ax.scatter(xs, [v if v is not None else np.nan for v in paper], marker="_", s=200,
                       color="black", zorder=3, label="paper" if i == 0 else None)
            for b, v in zip(bars, ours, strict=True):
                if v is None:
                    ax.text(b.get_x() + b.get_width() / 2, 0, "OOM", rotation=90, ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(x, models)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("EdgeShard Table IV: ours (bars) and the paper's (black marks)")
    fig.tight_layout()
    path = out / "edgeshard_table4.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = []
    for key, label, name in (("latency_ms", "latency, ms/token", "bandwidth_latency.png"),
                             ("throughput_tok_s", "throughput, tokens/s", "bandwidth_throughput.png")):
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
        for ax, m in zip(axes[0], models, strict=True):
            for meth in dict.fromkeys(r["method"] for r in rows if r["model"] == m):
                pts = [(r["bandwidth_mbps"], r[key]) for r in rows
                       if r["model"] == m and r["method"] == meth and not r["oom"]]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=meth)
            ax.set_title(m)
            ax.set_xlabel("source-cloud bandwidth, Mb/s")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_e2llm(rows: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    arms = list(dict.fromkeys((r["testbed"], r["mix"]) for r in rows))
    tbs = list(dict.fromkeys(a[0] for a in arms))
    mixes = list(dict.fromkeys(a[1] for a in arms))
    fig, axes = plt.subplots(len(tbs), len(mixes), figsize=(4.2 * len(mixes), 3.4 * len(tbs)),
                             squeeze=False)
    for i, tb in enumerate(tbs):
        for j, mix in enumerate(mixes):
            ax = axes[i][j]
            for strat in dict.fromkeys(r["strategy"] for r in rows):
                pts = [(r["load_fraction"], r["mean_wait_s"]) for r in rows
                       if r["testbed"] == tb and r["mix"] == mix and r["strategy"] == strat
                       and r["mean_wait_s"] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=strat)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_title(f"{tb}: {mix}", fontsize=9)
            ax.set_xlabel("load, fraction of splitwise saturation")
            ax.set_ylabel("mean waiting time, s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "e2llm_vs_splitwise.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# --- runs -----------------------------------------------------------------------------------

def run_experiment(args: argparse.Namespace) -> int:
    from meshllm.sim import experiments as ex

    tdir = Path(args.testbeds_dir)
    plan_fn = _plan_fn()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.experiment == "edgeshard-table4":
        rows = ex.edgeshard_table4(plan_fn, load_testbed(tdir / "edgeshard.toml"), seed=args.seed)
    elif args.experiment == "bandwidth-sweep":
        rows = ex.bandwidth_sweep(plan_fn, load_testbed(tdir / "edgeshard.toml"), seed=args.seed)
    else:
        tbs = [load_testbed(tdir / f"{n}.toml") for n in ex.E2LLM_TESTBEDS]
        rows, sats = ex.e2llm_vs_splitwise(plan_fn, tbs, seed=args.seed, quick=args.quick)
        extra["saturation"] = sats
        extra["reductions"] = ex.reductions(rows)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"experiment": args.experiment, "elapsed_s": round(elapsed, 2),
                          "rows": rows, **extra}, indent=1, default=float))
    else:
        if args.experiment == "edgeshard-table4":
            print_table4(rows)
        elif args.experiment == "bandwidth-sweep":
            print_sweep(rows)
        else:
            print_e2llm(rows, extra["reductions"], extra["saturation"])
        print(f"\n({args.experiment}: {elapsed:.1f} s)")
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        plot = {"edgeshard-table4": plot_table4, "bandwidth-sweep": plot_sweep,
                "e2llm-vs-splitwise": plot_e2llm}[args.experiment]
        for path in plot(rows, out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def run_single(args: argparse.Namespace) -> int:
    from meshllm.planner.cost import ModelProfile
    from meshllm.planner.problem import check_workload
    from meshllm.planner.types import Workload
    from meshllm.sim.adapter import to_sim_model
    from meshllm.sim.model import SimConfig
    from meshllm.sim.serving import simulate
    from meshllm.sim.workload import bursty, parse_trace, poisson

    if not args.testbed:
        raise UserError("give --experiment NAME, or --testbed FILE for a single simulation")
    tb = load_testbed(args.testbed)
    if Path(args.model).is_dir():
        from meshllm.model.manifest import load_manifest

        # the profile needs the costs only; checking every block's sha256 is the loader's job
        m = load_manifest(Path(args.model), verify=False)
        profile = ModelProfile.from_costs(m.costs, name=m.name, max_context=m.config.max_position)
    else:
        profile = ModelProfile.from_preset(args.model)
    if args.requests < 1 or args.max_batch < 1:
        raise UserError("--requests and --max-batch must be at least 1")
    rng = np.random.default_rng(args.seed)
    inp, out = parse_length(args.input_len), parse_length(args.output_len)
    if args.trace:
        tp = Path(args.trace)
        if not tp.is_file():
            raise UserError(f"trace file not found: {tp}")
        reqs = parse_trace(tp.read_text())
        span = max(r.arrival for r in reqs) - min(r.arrival for r in reqs)
        rate = len(reqs) / span if span > 0 else 1.0
        from meshllm.planner.types import LengthDist

        inp = LengthDist.empirical([r.input_tokens for r in reqs])
        out = LengthDist.empirical([r.output_tokens for r in reqs])
    else:
        if args.rate <= 0:
            raise UserError("--rate must be positive")
        rate = args.rate
        if args.arrivals == "poisson":
            reqs = poisson(rate, args.requests, inp, out, rng)
        else:
            reqs = bursty(rate, args.requests, inp, out, rng, mean_on_s=args.burst_on,
                          mean_off_s=args.burst_off)
    wl = Workload(rate, inp, out, args.max_batch)
    check_workload(wl, profile.max_context)
    plan = _plan_fn()(args.strategy, profile, tb.devices, tb.network, wl, args.objective,
                      np.random.default_rng(args.seed))
    model = to_sim_model(plan, profile, tb.by_name, tb.network, wl, entry=tb.source)
    res = simulate(model, reqs, SimConfig(pipeline=args.pipeline, routing=args.routing), warmup=len(reqs) // 10)
    s = res.summary
    if args.json:
        print(json.dumps(_no_nan({"plan": plan.to_dict(), "summary": s.to_dict(), "events": res.events}),
                         indent=1, default=float))
        return 0
    print(f"plan {args.strategy} on {tb.name}, {profile.name}: "
          + "; ".join(f"replica {r.id} {r.role.value}: "
                      + " > ".join(f"{st.node}[{st.first},{st.end})" for st in r.stages)
                      for r in plan.replicas))
    print(f"{s.requests} requests at {rate:.3f} req/s over {s.duration_s:.1f} s simulated")
    body = [[name, _fmt(st.mean, 3), _fmt(st.p50, 3), _fmt(st.p95, 3), _fmt(st.p99, 3)]
            for name, st in (("waiting s", s.waiting_s), ("TTFT s", s.ttft_s),
                             ("TPOT s", s.tpot_s), ("end-to-end s", s.e2e_s))]
    print(_table(["metric", "mean", "p50", "p95", "p99"], body))
    print(f"throughput {s.throughput_tok_s:.1f} tokens/s, {s.throughput_req_s:.3f} requests/s")
    print("utilisation: " + ", ".join(f"{n} {100 * u:.0f}%" for n, u in s.utilisation.items()))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.experiment:
        return run_experiment(args)
    return run_single(args)
