"""The planner's vocabulary: devices, network, workload, and the plan it returns.

Units everywhere in the planner: seconds, bytes, bytes per second, FLOP per second. The human
units of a testbed file (GB, TFLOPS, GB/s, Mb/s, ms) are converted once, in the constructors'
``from_*`` helpers and in :mod:`meshllm.planner.testbed`.

Everything here is a frozen, slotted dataclass: a plan is a value, safe to share between the
leader, the simulator and tests.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

from meshllm.errors import ConfigError, PlanError

GIB = 1 << 30  # testbed "memory_gb" is binary gigabytes: device memory is sold in powers of two
GB = 1e9  # bandwidths ("GB/s") are decimal, as vendors state them
MBIT = 1e6 / 8  # bytes per second in one Mb/s


class Role(enum.StrEnum):
    """What a replica does: only prompts, only token generation, or both."""

    PREFILL = "prefill"
    DECODER = "decoder"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Device:
    """One machine of the mesh as the planner sees it.

    Either derived from a spec (``tflops``, ``mem_bw_gbs``; the cost model applies the
    efficiency factors) or measured: ``prefill_s_per_token[b]`` is block ``b``'s compute time
    per prompt token and ``decode_s_per_step[b]`` its time for one decode step at batch 1 (both
    indexed by block index, length = number of blocks). Measured times win when present.
    """

    name: str
    memory_bytes: int  # budget for weights + KV cache
    tflops: float  # peak dense TFLOPS at the compute dtype
    mem_bw_gbs: float  # peak memory bandwidth, GB/s
    source: bool = False  # prompts enter here (EdgeShard privacy constraint)
    prefill_s_per_token: tuple[float, ...] | None = None
    decode_s_per_step: tuple[float, ...] | None = None
    measured: bool = False  # True when the times above were measured on the device
    # measured too: what one more token of context adds to block b's decode step per sequence,
    # and the context ``decode_s_per_step`` was measured at (None: no slope measured)
    decode_s_per_ctx_token: tuple[float, ...] | None = None
    decode_ctx: float = 0.0
    # measured too: what a stage's step (a decode step, a prompt chunk) costs more when the device
    # was idle just before it: max(0, idle_step_s + idle_step_frac x the stage's decode step)
    # (cost.idle_time)
    idle_step_s: float = 0.0
    idle_step_frac: float = 0.0
    # measured too: what each sequence beyond the first adds to block b's decode step (None: not
    # measured; the cost model then takes a prompt token's time)
    decode_s_per_row: tuple[float, ...] | None = None
    # measured too: the same as idle_step_*, after a long pause (cost.LONG_IDLE_GAP_S: a quiet
    # mesh's next prompt); 0, 0: not measured, the short pause's figure then holds for any pause
    idle_long_s: float = 0.0
    idle_long_frac: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("device name must not be empty")
        if not (self.idle_step_s >= 0 and math.isfinite(self.idle_step_s) and math.isfinite(self.idle_step_frac)):
            raise ConfigError(f"device {self.name}: idle_step_s must be >= 0 and idle_step_frac finite")
        if not (self.idle_long_s >= 0 and math.isfinite(self.idle_long_s) and math.isfinite(self.idle_long_frac)):
            raise ConfigError(f"device {self.name}: idle_long_s must be >= 0 and idle_long_frac finite")
        if self.memory_bytes <= 0:
            raise ConfigError(f"device {self.name}: memory must be positive")
        if self.tflops <= 0 or self.mem_bw_gbs <= 0:
            raise ConfigError(f"device {self.name}: tflops and mem_bw_gbs must be positive")

    @property
    def flops(self) -> float:
        """Peak FLOP per second."""
        return self.tflops * 1e12

    @property
    def mem_bw(self) -> float:
        """Peak memory bandwidth in bytes per second."""
        return self.mem_bw_gbs * GB

    @classmethod
    def from_spec(cls, name: str, memory_gb: float, tflops: float, mem_bw_gbs: float,
                  source: bool = False) -> Device:
        """A device from public specs: memory in GiB, TFLOPS, GB/s."""
        return cls(name, int(memory_gb * GIB), float(tflops), float(mem_bw_gbs), bool(source))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "memory_bytes": self.memory_bytes,
                             "tflops": self.tflops, "mem_bw_gbs": self.mem_bw_gbs,
                             "source": self.source, "measured": self.measured}
        if self.prefill_s_per_token is not None:
            d["prefill_s_per_token"] = list(self.prefill_s_per_token)
        if self.decode_s_per_step is not None:
            d["decode_s_per_step"] = list(self.decode_s_per_step)
        if self.decode_s_per_ctx_token is not None:
            d["decode_s_per_ctx_token"] = list(self.decode_s_per_ctx_token)
            d["decode_ctx"] = self.decode_ctx
        if self.idle_step_s or self.idle_step_frac:
            d["idle_step_s"] = self.idle_step_s
            d["idle_step_frac"] = self.idle_step_frac
        if self.decode_s_per_row is not None:
            d["decode_s_per_row"] = list(self.decode_s_per_row)
        if self.idle_long_s or self.idle_long_frac:
            d["idle_long_s"] = self.idle_long_s
            d["idle_long_frac"] = self.idle_long_frac
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Device:
        """Inverse of :meth:`to_dict`."""
        p = d.get("prefill_s_per_token")
        q = d.get("decode_s_per_step")
        c = d.get("decode_s_per_ctx_token")
        r = d.get("decode_s_per_row")
        return cls(str(d["name"]), int(d["memory_bytes"]), float(d["tflops"]),
                   float(d["mem_bw_gbs"]), bool(d.get("source", False)),
                   tuple(float(x) for x in p) if p is not None else None,
                   tuple(float(x) for x in q) if q is not None else None,
                   bool(d.get("measured", False)),
                   tuple(float(x) for x in c) if c is not None else None,
                   float(d.get("decode_ctx", 0.0)), float(d.get("idle_step_s", 0.0)),
                   float(d.get("idle_step_frac", 0.0)),
                   tuple(float(x) for x in r) if r is not None else None,
                   float(d.get("idle_long_s", 0.0)), float(d.get("idle_long_frac", 0.0)))


@dataclass(frozen=True, slots=True)
class Link:
    """An override for one (unordered) device pair."""

    a: str
    b: str
    mbps: float
    rtt_ms: float | None = None  # None: the network default


@dataclass(frozen=True, slots=True)
class Network:
    """Bandwidth and round-trip time per device pair: a default plus per-pair overrides.

    Links are symmetric. A device talking to itself has infinite bandwidth and no delay.
    """

    default_mbps: float = 1000.0
    default_rtt_ms: float = 1.0
    links: tuple[Link, ...] = ()
    _index: dict[frozenset[str], Link] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.default_mbps <= 0 or self.default_rtt_ms < 0:
            raise ConfigError("network default_mbps must be positive and default_rtt_ms >= 0")
        idx: dict[frozenset[str], Link] = {}
        for ln in self.links:
            if ln.mbps <= 0 or (ln.rtt_ms is not None and ln.rtt_ms < 0):
                raise ConfigError(f"link {ln.a}-{ln.b}: mbps must be positive, rtt_ms >= 0")
            idx[frozenset((ln.a, ln.b))] = ln  # later overrides win
        object.__setattr__(self, "_index", idx)

    def bandwidth(self, a: str, b: str) -> float:
        """Bytes per second from ``a`` to ``b`` (inf for a == b)."""
        if a == b:
            return math.inf
        ln = self._index.get(frozenset((a, b)))
        return (ln.mbps if ln is not None else self.default_mbps) * MBIT

    def rtt(self, a: str, b: str) -> float:
        """Round-trip time in seconds between ``a`` and ``b`` (0 for a == b)."""
        if a == b:
            return 0.0
        ln = self._index.get(frozenset((a, b)))
        ms = ln.rtt_ms if ln is not None and ln.rtt_ms is not None else self.default_rtt_ms
        return ms / 1000.0

    def matrices(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(bw, rtt)`` as (M, M) arrays over ``names`` in order; diagonal inf / 0."""
        m = len(names)
        bw = np.empty((m, m))
        rtt = np.empty((m, m))
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                bw[i, j] = self.bandwidth(a, b)
                rtt[i, j] = self.rtt(a, b)
        return bw, rtt

    def to_dict(self) -> dict[str, Any]:
        return {"default_mbps": self.default_mbps, "default_rtt_ms": self.default_rtt_ms,
                "links": [{"a": ln.a, "b": ln.b, "mbps": ln.mbps, "rtt_ms": ln.rtt_ms}
                          for ln in self.links]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Network:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d.get("default_mbps", 1000.0)), float(d.get("default_rtt_ms", 1.0)),
                   tuple(Link(str(x["a"]), str(x["b"]), float(x["mbps"]),
                              None if x.get("rtt_ms") is None else float(x["rtt_ms"]))
                         for x in d.get("links", ())))


LENGTH_KINDS = ("fixed", "uniform", "lognormal", "empirical")
_GRID = 256  # quantile points used for deterministic moments of a length distribution


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts (prompt or generated length), always integers >= 1.

    - ``fixed``: ``value``
    - ``uniform``: integers in ``[low, high]``
    - ``lognormal``: ``exp(N(mu, sigma))`` with ``mu`` chosen so the unclipped mean is
      ``mean``, rounded and clipped to ``[1, high]`` (``high`` 0 means no clip)
    - ``empirical``: drawn uniformly from ``values``

    Moments (:attr:`mean`, :attr:`second_moment`) and :meth:`quantiles` are deterministic; the
    planner uses them, the simulator uses :meth:`sample`.
    """

    kind: str = "fixed"
    value: int = 0
    low: int = 0
    high: int = 0
    mean_: float = 0.0
    sigma: float = 0.0
    values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        k = self.kind
        if k not in LENGTH_KINDS:
            raise ConfigError(f"length distribution kind must be one of {LENGTH_KINDS}, got {k!r}")
        if k == "fixed" and self.value < 1:
            raise ConfigError("fixed length must be >= 1")
        if k == "uniform" and not (1 <= self.low <= self.high):
            raise ConfigError("uniform length needs 1 <= low <= high")
        if k == "lognormal" and (self.mean_ < 1 or self.sigma < 0 or self.high < 0):
            raise ConfigError("lognormal length needs mean >= 1, sigma >= 0, high >= 0")
        if k == "empirical" and (not self.values or min(self.values) < 1):
            raise ConfigError("empirical lengths must be a non-empty list of integers >= 1")

    # --- constructors ---------------------------------------------------------------------
    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        return cls("fixed", value=int(n))

    @classmethod
    def uniform(cls, low: int, high: int) -> LengthDist:
        return cls("uniform", low=int(low), high=int(high))

    @classmethod
    def lognormal(cls, mean: float, sigma: float, high: int = 0) -> LengthDist:
        return cls("lognormal", mean_=float(mean), sigma=float(sigma), high=int(high))

    @classmethod
    def empirical(cls, values: Sequence[int]) -> LengthDist:
        return cls("empirical", values=tuple(int(v) for v in values))

    # --- sampling and moments -------------------------------------------------------------
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` integer lengths (int64 array) drawn with ``rng``."""
        if self.kind == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)
        if self.kind == "empirical":
            return np.asarray(self.values, dtype=np.int64)[rng.integers(0, len(self.values), size=n)]
        mu = math.log(self.mean_) - self.sigma ** 2 / 2
        x = np.rint(rng.lognormal(mu, self.sigma, size=n))
        return self._clip(x).astype(np.int64)

    def _clip(self, x: np.ndarray) -> np.ndarray:
        x = np.maximum(x, 1)
        return np.minimum(x, self.high) if self.high > 0 else x

    def quantiles(self, n: int = _GRID) -> np.ndarray:
        """``n`` equally weighted representative lengths (float array, mid-point quantiles)."""
        return np.array(_quantiles(self, n))

    @property
    def mean(self) -> float:
        """Mean length (exact for fixed/uniform/empirical, quantile grid for lognormal)."""
        if self.kind == "fixed":
            return float(self.value)
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "empirical":
            return float(np.mean(self.values))
        return float(self.quantiles().mean())

    @property
    def second_moment(self) -> float:
        """E[L^2], used by the queueing estimate."""
        q = self.quantiles()
        return float(np.mean(q * q))

    def percentile(self, pct: float) -> int:
        """A high percentile (e.g. 99) used to size KV memory; max for bounded kinds."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return self.high
        if self.kind == "empirical":
            return int(np.percentile(self.values, pct, method="higher"))
        return int(np.percentile(self.quantiles(1000), pct, method="higher"))

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "fixed":
            return {"kind": "fixed", "value": self.value}
        if self.kind == "uniform":
            return {"kind": "uniform", "low": self.low, "high": self.high}
        if self.kind == "lognormal":
            return {"kind": "lognormal", "mean": self.mean_, "sigma": self.sigma, "high": self.high}
        return {"kind": "empirical", "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | int) -> LengthDist:
        """From :meth:`to_dict`'s form, or a bare integer for a fixed length."""
        if isinstance(d, int):
            return cls.fixed(d)
        try:
            k = d.get("kind", "fixed")
            if k == "fixed":
                return cls.fixed(int(d["value"]))
            if k == "uniform":
                return cls.uniform(int(d["low"]), int(d["high"]))
            if k == "lognormal":
                return cls.lognormal(float(d["mean"]), float(d["sigma"]), int(d.get("high", 0)))
            if k == "empirical":
                return cls.empirical([int(v) for v in d["values"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid length distribution {dict(d)!r}: {e}") from None
        raise ConfigError(f"length distribution kind must be one of {LENGTH_KINDS}, got {k!r}")


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests arriving as a Poisson process, with prompt/output length distributions.

    ``max_batch`` caps the sequences a replica decodes at once (continuous batching);
    ``kv_percentile`` is the length percentile whose KV cache must fit for ``max_batch``
    sequences (the memory check sizes a replica's batch to what fits, at least 1).
    """

    arrival_rate: float = 1.0  # requests per second
    input_len: LengthDist = field(default_factory=lambda: LengthDist.fixed(32))
    output_len: LengthDist = field(default_factory=lambda: LengthDist.fixed(96))
    max_batch: int = 8
    kv_percentile: float = 99.0

    def __post_init__(self) -> None:
        if self.arrival_rate < 0 or not math.isfinite(self.arrival_rate):
            raise ConfigError("arrival_rate must be a finite number >= 0")
        if self.max_batch < 1:
            raise ConfigError("max_batch must be >= 1")

    @property
    def target_len(self) -> int:
        """Tokens of context one sequence must be able to hold (prompt + output percentiles)."""
        return self.input_len.percentile(self.kv_percentile) + self.output_len.percentile(
            self.kv_percentile)

    def with_rate(self, rate: float) -> Workload:
        """The same workload at another arrival rate."""
        return Workload(rate, self.input_len, self.output_len, self.max_batch, self.kv_percentile)

    def to_dict(self) -> dict[str, Any]:
        return {"arrival_rate": self.arrival_rate, "input_len": self.input_len.to_dict(),
                "output_len": self.output_len.to_dict(), "max_batch": self.max_batch,
                "kv_percentile": self.kv_percentile}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Workload:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d.get("arrival_rate", 1.0)),
                   LengthDist.from_dict(d.get("input_len", 32)),
                   LengthDist.from_dict(d.get("output_len", 96)),
                   int(d.get("max_batch", 8)), float(d.get("kv_percentile", 99.0)))


@lru_cache(maxsize=256)
def _quantiles(dist: LengthDist, n: int) -> tuple[float, ...]:
    # memoised: a pure function of a frozen value, and the lognormal's inverse CDF is scalar
    p = (np.arange(n) + 0.5) / n
    if dist.kind == "fixed":
        return tuple(np.full(n, float(dist.value)).tolist())
    if dist.kind == "uniform":
        return tuple(np.floor(dist.low + p * (dist.high - dist.low + 1)).tolist())
    if dist.kind == "empirical":
        v = np.sort(np.asarray(dist.values, dtype=float))
        return tuple(v[np.minimum((p * len(v)).astype(int), len(v) - 1)].tolist())
    mu = math.log(dist.mean_) - dist.sigma ** 2 / 2
    nd = NormalDist(mu, dist.sigma) if dist.sigma > 0 else None
    x = np.array([math.exp(nd.inv_cdf(float(q))) if nd else math.exp(mu) for q in p])
    return tuple(dist._clip(np.rint(x)).astype(float).tolist())


# --- the plan -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Stage:
    """Device ``node`` runs blocks ``[layers[0], layers[1])``."""

    node: str
    layers: tuple[int, int]

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def end(self) -> int:
        return self.layers[1]


@dataclass(frozen=True, slots=True)
class Replica:
    """A full copy of the model: stages in pipeline order covering every block once."""

    id: int
    role: Role
    stages: tuple[Stage, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.stages)


@dataclass(frozen=True, slots=True)
class Predicted:
    """What the cost model predicts for a plan (None where a figure does not apply).

    - ``latency_ms_per_token``: one request alone, mean time per generated token including its
      prefill (EdgeShard's "latency"), on the fastest replica
    - ``throughput_tps``: generated tokens per second with every decoding replica at its batch
    - ``prefill_capacity_rps`` / ``decode_capacity_rps``: requests per second each phase can
      sustain at the workload's mean lengths
    - ``mean_wait_s``: predicted mean time from a request's arrival until its prefill starts
      (queueing for a prefill pipeline and for a decoder's KV room) under the workload — the
      queueing estimate of :mod:`meshllm.planner.queueing`; inf when overloaded
    - ``mean_ttft_s``: the same estimate up to the first token
    - ``mean_e2e_s``: the same estimate up to the last token
    - ``saturation_rps``: the arrival rate at which the estimate says the plan saturates
    """

    latency_ms_per_token: float | None = None
    throughput_tps: float | None = None
    prefill_capacity_rps: float | None = None
    decode_capacity_rps: float | None = None
    mean_wait_s: float | None = None
    mean_ttft_s: float | None = None
    mean_e2e_s: float | None = None
    saturation_rps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        # JSON has no inf: an overloaded plan's waiting time is written as null plus a flag
        out: dict[str, Any] = {}
        for name in self.__slots__:
            v = getattr(self, name)
            out[name] = None if v is None or not math.isfinite(v) else float(v)
        out["overloaded"] = self.mean_wait_s is not None and not math.isfinite(self.mean_wait_s)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Predicted:
        """Inverse of :meth:`to_dict` (an overloaded plan's waiting time comes back as inf)."""
        kw = {k: (None if d.get(k) is None else float(d[k])) for k in cls.__slots__}
        if d.get("overloaded"):
            for k in ("mean_wait_s", "mean_ttft_s", "mean_e2e_s"):
                kw[k] = math.inf
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's answer. ``to_dict()`` is the wire/JSON form:
    ``{epoch, strategy, replicas: [{id, role, stages: [{node, layers: [first, end)}]}], predicted}``.
    """

    epoch: int
    replicas: tuple[Replica, ...]
    predicted: Predicted = field(default_factory=Predicted)
    strategy: str = ""
    note: str = ""  # how the strategy got its answer when that matters (exact, or a proven gap)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node the plan uses, in replica and stage order."""
        return tuple(s.node for r in self.replicas for s in r.stages)

    def replicas_with(self, role: Role) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if r.role == role)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "strategy": self.strategy,
            "replicas": [{"id": r.id, "role": r.role.value,
                          "stages": [{"node": s.node, "layers": [s.first, s.end]} for s in r.stages]}
                         for r in self.replicas],
            "predicted": self.predicted.to_dict(),
        } | ({"note": self.note} if self.note else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; a malformed dict raises :class:`PlanError`."""
        try:
            reps = tuple(
                Replica(int(r["id"]), Role(r["role"]),
                        tuple(Stage(str(s["node"]), (int(s["layers"][0]), int(s["layers"][1])))
                              for s in r["stages"]))
                for r in d["replicas"])
            return cls(int(d["epoch"]), reps, Predicted.from_dict(d.get("predicted", {})),
                       str(d.get("strategy", "")), str(d.get("note", "")))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PlanError(f"malformed plan: {e!r}") from None

    def with_epoch(self, epoch: int) -> Plan:
        return Plan(epoch, self.replicas, self.predicted, self.strategy, self.note)
