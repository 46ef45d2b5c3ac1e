"""The papers' experiments, run on the planner's plans and the simulator.

Pure: testbeds come in already parsed, the planner comes in as a function, randomness as a
seed. The command (``meshllm simulate --experiment …``) does the file reading, timing and
printing.

- ``edgeshard_table4``: EdgeShard's Table IV — Llama2-7B/13B/70B, 32 prompt tokens, 96 generated,
  fp32, on the paper's 15-device testbed; latency (one request alone, ms per generated token,
  prefill included) and throughput (a batch of the largest size the plan supports, capped at the
  workload's ``max_batch`` of 8 — the paper's EdgeShard batch — tokens per second).
- ``bandwidth_sweep``: the same cells while the source↔cloud link goes from 1 to 50 Mb/s
  (the paper's Figs. 7 and 8; EdgeShard-Even joins for 70B as in the paper).
- ``e2llm_vs_splitwise``: mean and p99 waiting time of ``e2llm``, ``splitwise``,
  ``edgeshard-throughput`` and ``ring`` under Poisson load from 20% to 120% of the rate at which
  the splitwise plan saturates (measured in the simulator), on each testbed and length mix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from meshllm.errors import DoesNotFit, PlanError
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device, LengthDist, Link, Network, Plan, Workload
from meshllm.sim.adapter import to_sim_model
from meshllm.sim.engine import SimError
from meshllm.sim.model import SimConfig
from meshllm.sim.routing import policy_for
from meshllm.sim.serving import SimResult, simulate
from meshllm.sim.workload import Request, closed_batch, poisson

# make_plan(strategy, profile, devices, network, workload, objective, rng) -> Plan
PlanFn = Callable[[str, ModelProfile, Sequence[Device], Network, Workload, str,
                   np.random.Generator], Plan]


@dataclass(frozen=True, slots=True)
class Testbed:
    name: str
    devices: tuple[Device, ...]
    network: Network

    @property
    def by_name(self) -> dict[str, Device]:
        return {d.name: d for d in self.devices}

    @property
    def source(self) -> str | None:
        return next((d.name for d in self.devices if d.source), None)

    @property
    def cloud(self) -> str:
        """The strongest device (EdgeShard's "cloud server")."""
        return max(self.devices, key=lambda d: (d.tflops, d.name)).name

    def with_link(self, a: str, b: str, mbps: float) -> Testbed:
        """The same testbed with the ``a``–``b`` link set to ``mbps`` (later overrides win)."""
        net = self.network
        old = next((ln for ln in net.links if {ln.a, ln.b} == {a, b}), None)
        rtt = old.rtt_ms if old is not None else None
        return replace(self, network=Network(net.default_mbps, net.default_rtt_ms,
                                             (*net.links, Link(a, b, mbps, rtt))))


# --- EdgeShard Table IV ---------------------------------------------------------------------

PAPER_TABLE4: dict[tuple[str, str], tuple[float, float] | None] = {
    # (model, method) -> (latency ms/token, throughput tokens/s); None = OOM in the paper
    ("llama2-7b", "Edge-Solo"): (140.34, 24.36),
    ("llama2-7b", "Cloud-Edge-Even"): (227.35, 7.56),
    ("llama2-7b", "Cloud-Edge-Opt"): (140.34, 24.36),
    ("llama2-7b", "EdgeShard"): (75.88, 52.45),
    ("llama2-13b", "Edge-Solo"): None,
    ("llama2-13b", "Cloud-Edge-Even"): (319.44, 4.68),
    ("llama2-13b", "Cloud-Edge-Opt"): (243.45, 4.74),
    ("llama2-13b", "EdgeShard"): (173.43, 10.45),
    ("llama2-70b", "Edge-Solo"): None,
    ("llama2-70b", "Cloud-Edge-Even"): None,
    ("llama2-70b", "Cloud-Edge-Opt"): None,
    ("llama2-70b", "EdgeShard"): (3086.43, 1.25),
}
TABLE4_MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
# method -> (strategy for the latency cell, strategy for the throughput cell)
TABLE4_METHODS: dict[str, tuple[str, str]] = {
    "Edge-Solo": ("edge-solo", "edge-solo"),
    "Cloud-Edge-Even": ("cloud-edge-even", "cloud-edge-even"),
    "Cloud-Edge-Opt": ("cloud-edge-opt", "cloud-edge-opt"),
    "EdgeShard": ("edgeshard-latency", "edgeshard-throughput"),
}
TABLE4_WORKLOAD = Workload(arrival_rate=0.0, input_len=LengthDist.fixed(32),
                           output_len=LengthDist.fixed(96), max_batch=8)


@dataclass(frozen=True, slots=True)
class Cell:
    oom: bool
    latency_ms: float | None
    throughput_tok_s: float | None
    batch: int | None = None
    nodes: int | None = None  # devices the latency plan uses
    throughput_bubbles_tok_s: float | None = None  # the same batch with EdgeShard-Bubbles


def _plan(plan_fn: PlanFn, strategy: str, profile: ModelProfile, tb: Testbed, wl: Workload,
          objective: str, seed: int) -> Plan | None:
    try:
        return plan_fn(strategy, profile, tb.devices, tb.network, wl, objective,
                       np.random.default_rng(seed))
    except DoesNotFit:
        return None


def latency_of(plan: Plan, profile: ModelProfile, tb: Testbed, wl: Workload,
               config: SimConfig | None = None) -> float:
    """ms per generated token of one request alone (EdgeShard's latency, prefill included)."""
    n_in, n_out = int(wl.input_len.mean), int(wl.output_len.mean)
    model = to_sim_model(plan, profile, tb.by_name, tb.network, wl, entry=tb.source)
    rec = simulate(model, closed_batch(1, n_in, n_out), config).records[0]
    return 1000.0 * rec.e2e_s / n_out


def throughput_of(plan: Plan, profile: ModelProfile, tb: Testbed, wl: Workload,
                  config: SimConfig | None = None) -> tuple[float, int]:
    """(tokens/s, batch): a batch of the largest size the plan's decoders hold, all at once."""
    n_in, n_out = int(wl.input_len.mean), int(wl.output_len.mean)
    model = to_sim_model(plan, profile, tb.by_name, tb.network, wl, entry=tb.source)
    dec = [r for r in model.replicas if r.role in ("decoder", "both")]
    batch = sum(min(r.max_batch, r.kv_capacity_tokens // (n_in + n_out)) for r in dec)
    if batch < 1:
        raise SimError("the plan cannot hold a single sequence's KV cache")
    res = simulate(model, closed_batch(batch, n_in, n_out), config)
    return res.summary.throughput_tok_s, batch


def table4_cell(plan_fn: PlanFn, model_name: str, method: str, tb: Testbed,
                wl: Workload = TABLE4_WORKLOAD, seed: int = 0,
                config: SimConfig | None = None) -> Cell:
    profile = ModelProfile.from_preset(model_name)
    lat_strategy, thr_strategy = TABLE4_METHODS.get(method, (method, method))
    lat_plan = _plan(plan_fn, lat_strategy, profile, tb, wl, "latency", seed)
    thr_plan = _plan(plan_fn, thr_strategy, profile, tb, wl, "throughput", seed)
    if lat_plan is None or thr_plan is None:
        return Cell(True, None, None)
    lat = latency_of(lat_plan, profile, tb, wl, config)
    thr, batch = throughput_of(thr_plan, profile, tb, wl, config)
    bub, _ = throughput_of(thr_plan, profile, tb, wl, SimConfig(pipeline="bubbles"))
    return Cell(False, lat, thr, batch, len(set(lat_plan.nodes)), bub)


def edgeshard_table4(plan_fn: PlanFn, tb: Testbed, seed: int = 0) -> list[dict[str, object]]:
    rows = []
    for model_name in TABLE4_MODELS:
        for method in TABLE4_METHODS:
            cell = table4_cell(plan_fn, model_name, method, tb, seed=seed)
            paper = PAPER_TABLE4[(model_name, method)]
            rows.append({
                "model": model_name, "method": method, "oom": cell.oom,
                "latency_ms": cell.latency_ms, "throughput_tok_s": cell.throughput_tok_s,
                "batch": cell.batch, "throughput_bubbles_tok_s": cell.throughput_bubbles_tok_s,
                "paper_oom": paper is None,
                "paper_latency_ms": None if paper is None else paper[0],
                "paper_throughput_tok_s": None if paper is None else paper[1],
            })
    return rows


# --- bandwidth sweep (Figs. 7 and 8) ----------------------------------------------------------

SWEEP_MBPS = (1, 2, 5, 10, 20, 30, 40, 50)


def bandwidth_sweep(plan_fn: PlanFn, tb: Testbed, mbps: Sequence[float] = SWEEP_MBPS,
                    models: Sequence[str] = TABLE4_MODELS, seed: int = 0) -> list[dict[str, object]]:
    src, cloud = tb.source, tb.cloud
    if src is None:
        raise PlanError(f"testbed {tb.name} has no source device")
    rows = []
    for model_name in models:
        methods = list(TABLE4_METHODS)
        if model_name == "llama2-70b":
            methods.append("EdgeShard-Even")
        for bw in mbps:
            swept = tb.with_link(src, cloud, float(bw))
            for method in methods:
                if method == "EdgeShard-Even":
                    cell = table4_cell(plan_fn, model_name, "edgeshard-even", swept, seed=seed)
                else:
                    cell = table4_cell(plan_fn, model_name, method, swept, seed=seed)
                rows.append({"model": model_name, "method": method, "bandwidth_mbps": float(bw),
                             "oom": cell.oom, "latency_ms": cell.latency_ms,
                             "throughput_tok_s": cell.throughput_tok_s})
    return rows


# --- E2LLM vs Splitwise -------------------------------------------------------------------------

MIXES: dict[str, tuple[LengthDist, LengthDist]] = {
    # (prompt lengths, output lengths)
    "short-in/long-out": (LengthDist.uniform(16, 64), LengthDist.lognormal(256, 0.4, high=768)),
    "long-in/short-out": (LengthDist.lognormal(768, 0.4, high=2048), LengthDist.uniform(8, 32)),
    "wide": (LengthDist.lognormal(256, 1.0, high=2048), LengthDist.lognormal(128, 1.0, high=768)),
}
WAITING_CONFIG = SimConfig(routing=policy_for("waiting"))
COMPARED = ("e2llm", "splitwise", "edgeshard-throughput", "ring")
LOADS = (0.2, 0.5, 0.8, 1.0, 1.2)


def saturation_rate(result: SimResult) -> float:
    """Requests per second a plan sustains when it never runs dry: the completion rate between
    the 10th and 90th percentile finish times of a batch that all arrives at once."""
    fin = np.sort([r.finish for r in result.records])
    lo, hi = int(0.1 * len(fin)), int(0.9 * len(fin))
    if hi <= lo or fin[hi] <= fin[lo]:
        return len(fin) / max(fin[-1], 1e-12)
    return (hi - lo) / (fin[hi] - fin[lo])


def _lengths_requests(wl: Workload, n: int, rng: np.random.Generator) -> list[Request]:
    ins = np.maximum(wl.input_len.sample(rng, n), 1)
    outs = np.maximum(wl.output_len.sample(rng, n), 1)
    return [Request(i, 0.0, int(a), int(b)) for i, (a, b) in enumerate(zip(ins, outs, strict=True))]


@dataclass(frozen=True, slots=True)
class Arm:
    """One testbed × mix: the plans, the measured splitwise saturation rate, and rows."""

    testbed: str
    mix: str
    saturation_rps: float
    rows: tuple[dict[str, object], ...]
    plans: Mapping[str, Plan]


def e2llm_vs_splitwise_arm(plan_fn: PlanFn, tb: Testbed, model_name: str, mix: str, *,
                           loads: Sequence[float] = LOADS, n_requests: int = 300,
                           strategies: Sequence[str] = COMPARED, seed: int = 0,
                           max_batch: int = 16, config: SimConfig | None = None) -> Arm:
    profile = ModelProfile.from_preset(model_name)
    # the compared figure is waiting time, so the router runs the waiting objective's policy,
    # the same for every strategy and for the saturation measurement
    config = config if config is not None else WAITING_CONFIG
    inp, out = MIXES[mix]
    base = Workload(arrival_rate=1.0, input_len=inp, output_len=out, max_batch=max_batch)
    # the splitwise saturation rate sets the load scale for every strategy (the axis)
    sw_plan = plan_fn("splitwise", profile, tb.devices, tb.network, base, "waiting",
                      np.random.default_rng(seed))
    sw_model = to_sim_model(sw_plan, profile, tb.by_name, tb.network, base, entry=tb.source)
    sat_reqs = _lengths_requests(base, n_requests, np.random.default_rng(seed + 1))
    sat = saturation_rate(simulate(sw_model, sat_reqs, config))
    plans: dict[str, Plan] = {"splitwise": sw_plan}
    # one simulator model per plan, reused over the loads (its timing caches stay warm)
    models = {"splitwise": sw_model}
    errors: dict[str, str] = {}
    rows: list[dict[str, object]] = []
    for frac in loads:
        rate = frac * sat
        # common random numbers: every strategy sees the same requests at a given load
        reqs = poisson(rate, n_requests, inp, out, np.random.default_rng(seed + 2))
        for strat in strategies:
            if strat not in plans and strat not in errors:
                # plans are made once per arm, for the workload at the highest load the
                # experiment asks about (what an operator provisions for)
                try:
                    plans[strat] = plan_fn(strat, profile, tb.devices, tb.network,
                                           base.with_rate(max(loads) * sat), "waiting",
                                           np.random.default_rng(seed))
                except PlanError as e:
                    # a strategy that cannot plan here (or returns an invalid plan) is a
                    # result to show, not a reason to lose the other strategies' figures
                    errors[strat] = str(e)
                else:
                    models[strat] = to_sim_model(plans[strat], profile, tb.by_name, tb.network,
                                                 base, entry=tb.source)
            if strat in errors:
                rows.append({"testbed": tb.name, "mix": mix, "load_fraction": frac,
                             "rate_rps": rate, "strategy": strat, "mean_wait_s": None,
                             "p99_wait_s": None, "mean_ttft_s": None, "mean_e2e_s": None,
                             "throughput_tok_s": None, "error": errors[strat]})
                continue
            s = simulate(models[strat], reqs, config, warmup=n_requests // 10).summary
            rows.append({"testbed": tb.name, "mix": mix, "load_fraction": frac,
                         "rate_rps": rate, "strategy": strat,
                         "mean_wait_s": s.waiting_s.mean, "p99_wait_s": s.waiting_s.p99,
                         "mean_ttft_s": s.ttft_s.mean, "mean_e2e_s": s.e2e_s.mean,
                         "throughput_tok_s": s.throughput_tok_s})
    return Arm(tb.name, mix, sat, tuple(rows), plans)


def reductions(rows: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Per testbed, mix and load: e2llm's mean wait as a fraction of splitwise's, and the
    reduction 1 - that (the E2LLM claim is a reduction of at least 0.5 at load >= 0.8)."""
    by: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("mean_wait_s") is None:
            continue
        key = (r["testbed"], r["mix"], r["load_fraction"])
        by.setdefault(key, {})[str(r["strategy"])] = float(r["mean_wait_s"])  # type: ignore[arg-type]
    out = []
    for (tbn, mix, frac), w in sorted(by.items()):
        if "e2llm" in w and "splitwise" in w:
            e, s = w["e2llm"], w["splitwise"]
            red = 1 - e / s if s > 0 else (0.0 if e == 0 else -math.inf)
            out.append({"testbed": tbn, "mix": mix, "load_fraction": frac,
                        "e2llm_wait_s": e, "splitwise_wait_s": s, "reduction": red})
    return out


# testbed file stem -> the model served on it
E2LLM_TESTBEDS: dict[str, str] = {"edgeshard": "llama2-7b", "home": "llama2-7b"}


def e2llm_vs_splitwise(plan_fn: PlanFn, testbeds: Sequence[Testbed], *, seed: int = 0,
                       quick: bool = False, mixes: Sequence[str] = tuple(MIXES),
                       n_requests: int | None = None, config: SimConfig | None = None,
                       ) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Every testbed × mix arm. Returns (rows, saturation rows)."""
    rows: list[dict[str, object]] = []
    sats: list[dict[str, object]] = []
    loads = (0.4, 0.8, 1.0) if quick else LOADS
    n = n_requests or (120 if quick else 300)
    for tb in testbeds:
        model_name = E2LLM_TESTBEDS.get(tb.name, "llama2-7b")
        for mix in mixes:
            arm = e2llm_vs_splitwise_arm(plan_fn, tb, model_name, mix, loads=loads, n_requests=n,
                                         seed=seed, config=config)
            rows.extend(arm.rows)
            sats.append({"testbed": tb.name, "mix": mix, "model": model_name,
                         "saturation_rps": arm.saturation_rps,
                         "plans": {k: v.to_dict() for k, v in arm.plans.items()}})
    return rows, sats
