"""Self-profiling: how fast this node runs each block of the mesh's model, measured, not guessed.

For every block the node runs it alone in a ``StageRunner`` with the node's own onnxruntime thread
count and ``--slowdown`` (so a slowed node's profile shows it), and measures

- prefill: seconds per prompt token (a ``prompt_tokens`` prompt, best of ``repeats``);
- decode: seconds per step at batch 1 with a short context (median of ``decode_steps``).

A block alone is not what a stage runs: a stage runs its blocks as one onnxruntime session, one
launch per step, with the other blocks' weights streaming through the caches in between. So the
blocks are then run again as stages, in contiguous runs of blocks that fit in half the memory
budget (the whole model where it fits), and each run's measured prefill and decode times are
shared out over its blocks in proportion to their own measurements: the per-block figures keep
their shape (what the planner's split needs), and a stage of those blocks sums to what that
stage measured (blocks alone, evicted between steps, summed to 20.5 ms for SmolLM2-135M int4's
step against 15.4 ms measured for the whole model in one runner).

Last, each run's decode step is timed again after a ``LONG_CTX``-token prompt: the difference
over the contexts is what one more token of context adds to a step (attention reads, and on the
plain-operator attention copies, more of the cache), shared over the run's blocks by the KV they
hold per token (``decode_s_per_ctx_token``; SmolLM2 int4: 9.1 µs, a step 18.2 ms at 100
positions and 25.0 at 1000).

Each block alone and each run also time a decode step of ``ROW_BATCH`` sequences at different
positions: what each row beyond the first adds (``decode_s_per_row``; shared out over a run's blocks
like the rest). It is not a prompt token's time: a decode row runs the head, where a prompt runs it
for its last position only, and its attention and rotary work per row are not a prompt's. Measured on
SmolLM2 int4 (1 thread): a layer's row 0.08 ms, as its prompt token; the head's 0.38-0.41 ms against
0.05 ms per prompt token; the whole model 2.9 ms a row against 2.4 per prompt token, so a step of 8
(16) rows took 33.4 (56.9) ms where the prompt's figure said 29.7 (48.8).

Then what a stage's work costs more when its node was idle just before it (``idle_step_s`` +
``idle_step_frac`` × the stage's step, never below 0): decode steps after a pause of
``IDLE_GAP_S`` alternate with steps back to back (so a co-tenant's burst lands on both), for the
first run and for a stage of one layer, and the extra is fitted as a line in the step
(``idle_fit``). A node that sleeps between steps (a stage of a
pipeline waits while the others compute; a prefill node waits for the next prompt) comes back to
cold caches, its core perhaps taken by other work meanwhile: measured on the 2-core build machine
(SmolLM2 int4, 1 thread), a 20 ms pause made the whole model's step 17.9–18.6 → 24.3–25.6 ms and
one layer's 0.45–0.59 → 1.9–2.1 ms, where steps back to back, and pauses spent computing, cost
nothing more. A slowed node (``--slowdown``) sleeps after every step already, so its long steps
back to back are cold already (the whole model at slowdown 3: 69–84 ms, paused 73–84) while a
short stage still pays after a pause (one layer: 2.0–2.5 → 5.3–5.9 ms): its fraction is negative.
Version 8 also times ``LONG_IDLE_STEPS`` steps after a ``LONG_IDLE_GAP_S`` pause on the same two
stages (``idle_long_s`` + ``idle_long_frac`` × the step): the pause before the next prompt of a
quiet mesh, after which a step costs more than after a pipeline stage's short wait (the whole
model, a 5-token prompt: +1.3 ms after 20 ms, +3.9 after 100 ms, +4.5 after 0.3 s and after 1 s).

From those it derives the effective TFLOPS and memory bandwidth the planner's spec fields need
(the measured per-block times are what the cost model uses). The runners run the attention kind
the node chooses for itself (``runtime.attention``; a mesh whose plan names the other kind is
planned with these figures all the same). Results are cached on disk keyed by (model id,
machine, threads, slowdown, attention kind), because measuring costs seconds that a restart
should not pay again. The memory budget is applied on top and is not part of the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from meshllm.model.manifest import Manifest
from meshllm.runtime.attention import FUSED, PLAIN
from meshllm.runtime.runner import StageRunner, weight_bytes_resident

log = logging.getLogger("meshllm.runtime.profile")

PROFILE_VERSION = 8  # 2: decode with cold caches (_Evictor); 3: scaled to stages (_stage_runs); 4: context
# slope; 5: a step after an idle pause (idle_step_s, idle_step_frac); 6: a slowed runner paced by its
# steps' typical compute (runtime/pacing.py), not by each step's own; 7: what each more row of a decode
# step costs (decode_s_per_row); 8: a step after a long pause (idle_long_s, idle_long_frac)
ROW_BATCH = 8  # the decode batch a step's cost per row is measured at (against batch 1)
LONG_CTX = 512  # the longer context a stage's decode step is also timed at (the slope per context token)
IDLE_GAP_S = 0.02  # the pause before each step timed after idling (a pipeline stage waits about this long)
# the longer pause, as between two prompts of a quiet mesh: after it the cost has stopped growing
# (SmolLM2 int4, whole model, 1 thread: a 5-token prompt 19.6 ms back to back, 20.9 after 20 ms,
# 23.5 after 100 ms, 24.1 after 300 ms and 24.0 after 1 s)
LONG_IDLE_GAP_S = 0.3
LONG_IDLE_STEPS = 3  # steps timed after it (a median), per stage
EVICT_BYTES = 96 << 20  # read between decode steps: more than any last-level cache here (32 MiB)


class _Evictor:
    """Reads a buffer larger than the last-level cache, so the next step finds a block's weights
    in memory, not in cache. A block measured alone, step after step, keeps its weights cached
    and decodes several times faster than it does in a real step, where every other block's
    weights pass through the cache in between (measured: 2.8 ms summed per block vs 6.0 ms for
    the whole model's step, on the `small` preset)."""

    def __init__(self, nbytes: int = EVICT_BYTES) -> None:
        self.buf = np.ones(nbytes // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf.sum()


@dataclass(frozen=True, slots=True)
class NodeProfile:
    """What a node tells the leader about itself."""

    model_id: str
    threads: int
    slowdown: float
    memory_bytes: int
    prefill_s_per_token: tuple[float, ...]  # per block index
    decode_s_per_step: tuple[float, ...]  # per block index, batch 1
    tflops: float  # effective, derived from the prefill measurement
    mem_bw_gbs: float  # effective, derived from the decode measurement
    machine: str
    measured_at: float  # unix time of the measurement (informational)
    # per block: what one more token of context adds to its decode step (attention reads and
    # copies more of the cache), and the context decode_s_per_step holds at
    decode_s_per_ctx_token: tuple[float, ...] = ()
    decode_ctx: float = 0.0
    # what a stage's work (a decode step or a prompt chunk) costs more when the node was idle just
    # before it: max(0, idle_step_s + idle_step_frac x the stage's decode step); the fraction may
    # be negative (0, 0: not measured, before version 5)
    idle_step_s: float = 0.0
    idle_step_frac: float = 0.0
    # per block: what each sequence beyond the first adds to a decode step (a step of ROW_BATCH
    # rows at different positions against one row; () before version 7)
    decode_s_per_row: tuple[float, ...] = ()
    # the same as idle_step_*, after a pause of LONG_IDLE_GAP_S (0, 0: not measured, before version 8)
    idle_long_s: float = 0.0
    idle_long_frac: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "model_id": self.model_id, "threads": self.threads,
                "slowdown": self.slowdown, "memory_bytes": self.memory_bytes,
                "prefill_s_per_token": list(self.prefill_s_per_token),
                "decode_s_per_step": list(self.decode_s_per_step), "tflops": self.tflops,
                "mem_bw_gbs": self.mem_bw_gbs, "machine": self.machine, "measured_at": self.measured_at,
                "decode_s_per_ctx_token": list(self.decode_s_per_ctx_token), "decode_ctx": self.decode_ctx,
                "idle_step_s": self.idle_step_s, "idle_step_frac": self.idle_step_frac,
                "decode_s_per_row": list(self.decode_s_per_row),
                "idle_long_s": self.idle_long_s, "idle_long_frac": self.idle_long_frac}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeProfile:
        return cls(str(d["model_id"]), int(d["threads"]), float(d["slowdown"]), int(d["memory_bytes"]),
                   tuple(float(x) for x in d["prefill_s_per_token"]),
                   tuple(float(x) for x in d["decode_s_per_step"]), float(d["tflops"]),
                   float(d["mem_bw_gbs"]), str(d.get("machine", "")), float(d.get("measured_at", 0.0)),
                   tuple(float(x) for x in d.get("decode_s_per_ctx_token") or ()), float(d.get("decode_ctx", 0.0)),
                   max(0.0, float(d.get("idle_step_s", 0.0))), float(d.get("idle_step_frac", 0.0)),
                   tuple(max(0.0, float(x)) for x in d.get("decode_s_per_row") or ()),
                   max(0.0, float(d.get("idle_long_s", 0.0))), float(d.get("idle_long_frac", 0.0)))

    def with_memory(self, memory_bytes: int) -> NodeProfile:
        return NodeProfile(self.model_id, self.threads, self.slowdown, memory_bytes,
                           self.prefill_s_per_token, self.decode_s_per_step, self.tflops,
                           self.mem_bw_gbs, self.machine, self.measured_at, self.decode_s_per_ctx_token,
                           self.decode_ctx, self.idle_step_s, self.idle_step_frac, self.decode_s_per_row,
                           self.idle_long_s, self.idle_long_frac)

    @property
    def decode_s_per_token(self) -> float:
        """The whole model on this node, one token at batch 1."""
        return float(sum(self.decode_s_per_step))


def machine_fingerprint() -> str:
    """Identifies the hardware and runtime a measurement is valid for."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}|{platform.machine()}|{cpu}|{os.cpu_count()}|ort {ort.__version__}"


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory; 80% of it, leaving headroom."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * 0.8)
    except (OSError, ValueError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def cache_path(state_dir: Path, model_id: str, threads: int, slowdown: float, attention: str = FUSED,
               cache_dir: Path | None = None) -> Path:
    """Where the profile of this (model, machine, threads, slowdown, attention kind) is cached:
    ``cache_dir`` (one shared by the nodes of a machine) or ``state_dir/profiles``."""
    key = hashlib.sha256(f"{model_id}|{machine_fingerprint()}|{threads}|{slowdown:.6g}|{attention}|"
                         f"v{PROFILE_VERSION}".encode())
    return (cache_dir or state_dir / "profiles") / f"{model_id[:16]}-{key.hexdigest()[:16]}.json"


def measure(manifest: Manifest, *, threads: int, slowdown: float = 1.0, memory_bytes: int,
            prompt_tokens: int = 32, decode_steps: int = 8, repeats: int = 2,
            progress: Callable[[int, int, str], None] | None = None, attention: str = FUSED) -> NodeProfile:
    """Measure every block of ``manifest`` on this machine (blocking; run it in an executor)."""
    cfg = manifest.config
    n = cfg.num_blocks
    rng = np.random.default_rng(0)
    prompt_tokens = max(1, min(prompt_tokens, cfg.max_position - decode_steps - 1))
    prefill: list[float] = []
    decode: list[float] = []
    rows: list[float] = []
    evict = _Evictor()
    for b in range(n):
        if progress is not None:
            progress(b, n, cfg.block_name(b))
        runner = StageRunner(manifest, b, b + 1, threads=threads, max_seqs=ROW_BATCH + 1, slowdown=slowdown,
                             one_pass=attention == PLAIN)
        best, step = _time_runner(runner, rng, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
                                  repeats=repeats, between_steps=evict)
        prefill.append(best / prompt_tokens)
        decode.append(step)
        rows.append(_per_row(_time_rows(runner, rng, prompt_tokens=prompt_tokens, steps=decode_steps,
                                        between_steps=evict), step))
        del runner
    # the context of the stages' timed decode steps: the prompt, a warm-up step, then the steps
    short_ctx = prompt_tokens + 1 + (decode_steps + 1) / 2
    long_prompt = min(LONG_CTX, cfg.max_position - decode_steps - 3)
    long_ctx = long_prompt + 1 + (decode_steps + 1) / 2
    slope = [0.0] * n
    runs = _stage_runs(manifest, memory_bytes)
    for first, end in runs:
        pre, dec, dec_long, dec_rows = _time_stage(
            manifest, first, end, threads=threads, slowdown=slowdown, attention=attention,
            prompt_tokens=prompt_tokens, decode_steps=decode_steps, repeats=repeats, rng=rng,
            long_prompt=long_prompt if long_ctx > short_ctx + 16 else 0)
        _share_out(prefill, first, end, pre / prompt_tokens)
        _share_out(decode, first, end, dec)
        _share_out(rows, first, end, _per_row(dec_rows, dec))
        if dec_long > dec:  # shared over the run's blocks by the KV they read per token of context
            kv = [manifest.costs[b].kv_bytes_per_token for b in range(first, end)]
            per_ctx = (dec_long - dec) / (long_ctx - short_ctx)
            for b, k in zip(range(first, end), kv, strict=True):
                slope[b] = per_ctx * k / sum(kv) if sum(kv) else 0.0
    (idle_s, idle_frac), (long_s, long_frac) = _time_idle(
        manifest, runs[0], threads=threads, slowdown=slowdown, attention=attention, prompt_tokens=prompt_tokens,
        decode_steps=decode_steps, rng=rng)
    if progress is not None:
        progress(n, n, "done")
    costs = manifest.costs
    flops = sum(c.flops_per_token for c in costs)
    # bytes a decode step streams: the weights as they sit in memory (float16 files run as float32)
    weight_bytes = weight_bytes_resident(manifest, 0, n)
    tflops = flops / max(sum(prefill), 1e-12) / 1e12
    mem_bw_gbs = weight_bytes / max(sum(decode), 1e-12) / 1e9
    return NodeProfile(manifest.model_id, threads, slowdown, memory_bytes, tuple(prefill), tuple(decode),
                       tflops, mem_bw_gbs, machine_fingerprint(), time.time(), tuple(slope), short_ctx,
                       idle_s, idle_frac, tuple(rows), long_s, long_frac)


def _stage_runs(manifest: Manifest, memory_bytes: int) -> list[tuple[int, int]]:
    """Contiguous runs of blocks, each the longest whose weights fit in half ``memory_bytes``
    (a block too large for that alone is a run of its own: it was measured alone already)."""
    n = manifest.config.num_blocks
    cap = memory_bytes // 2
    runs: list[tuple[int, int]] = []
    first = 0
    while first < n:
        end = first + 1
        while end < n and weight_bytes_resident(manifest, first, end + 1) <= cap:
            end += 1
        runs.append((first, end))
        first = end
    return runs


def _inputs(runner: StageRunner, rng: np.random.Generator, prompt_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs of the runner's kind: a prompt and one decode step's (token ids for the first
    block, hidden states after)."""
    cfg = runner.manifest.config
    if runner.first == 0:
        x_prompt = rng.integers(0, cfg.vocab_size, size=prompt_tokens, dtype=np.int64)  # (T,)
        x_step = rng.integers(0, cfg.vocab_size, size=1, dtype=np.int64)  # (1,)
    else:
        x_prompt = rng.standard_normal((prompt_tokens, cfg.hidden_size)).astype(np.float32)  # (T, H)
        x_step = rng.standard_normal((1, cfg.hidden_size)).astype(np.float32)  # (1, H)
    return x_prompt, x_step


def _time_runner(runner: StageRunner, rng: np.random.Generator, *, prompt_tokens: int, decode_steps: int,
                 repeats: int, between_steps: Callable[[], None] | None = None,
                 warm_step: bool = False) -> tuple[float, float]:
    """(best prefill of a ``prompt_tokens`` prompt, median decode step at batch 1), in seconds, on
    random inputs of the runner's kind (token ids for the first block, hidden states after)."""
    x_prompt, x_step = _inputs(runner, rng, prompt_tokens)
    best = float("inf")
    steps: list[float] = []
    for r in range(repeats):
        sid = ("profile", r)
        runner.alloc(sid, prompt_tokens + decode_steps + 2)
        t0 = time.perf_counter()
        runner.prefill(sid, x_prompt)
        best = min(best, time.perf_counter() - t0)
        if warm_step:  # the first step after a prompt warms the decode shapes
            runner.decode([sid], x_step)
        for _ in range(decode_steps):
            if between_steps is not None:
                between_steps()
            t0 = time.perf_counter()
            runner.decode([sid], x_step)
            steps.append(time.perf_counter() - t0)
        runner.free(sid)
    return best, float(np.median(steps))


def _time_rows(runner: StageRunner, rng: np.random.Generator, *, prompt_tokens: int, steps: int,
               between_steps: Callable[[], None] | None = None) -> float:
    """The median decode step of ``ROW_BATCH`` sequences at once, each after a prompt of its own
    length (``prompt_tokens`` + its index: rows at different positions, as a decode ring's are),
    after a warm-up step."""
    cfg = runner.manifest.config
    batch = ROW_BATCH
    prompt_tokens = max(1, min(prompt_tokens, cfg.max_position - batch - steps - 3))
    sids = [("profile-rows", i) for i in range(batch)]
    times: list[float] = []
    try:
        for i, sid in enumerate(sids):
            runner.alloc(sid, prompt_tokens + i + steps + 2)
            runner.prefill(sid, _inputs(runner, rng, prompt_tokens + i)[0])
        x_step = np.concatenate([_inputs(runner, rng, 1)[1] for _ in sids])
        runner.decode(sids, x_step)  # warms the batch's shapes
        for _ in range(steps):
            if between_steps is not None:
                between_steps()
            t0 = time.perf_counter()
            runner.decode(sids, x_step)
            times.append(time.perf_counter() - t0)
    finally:
        for sid in sids:
            with contextlib.suppress(Exception):
                runner.free(sid)
    return float(np.median(times))


def _per_row(batch_step: float, step: float) -> float:
    """What each row beyond the first adds to a decode step: from a ``ROW_BATCH``-row step and a
    one-row step (never below 0: noise can put the batch's step under the single one)."""
    return max(0.0, (batch_step - step) / (ROW_BATCH - 1))


def _time_stage(manifest: Manifest, first: int, end: int, *, threads: int, slowdown: float,
                prompt_tokens: int, decode_steps: int, repeats: int, rng: np.random.Generator,
                long_prompt: int = 0, attention: str = FUSED) -> tuple[float, float, float, float]:
    """Blocks [first, end) as one stage runs them (``_time_runner``): (prefill, decode step, decode
    step after a ``long_prompt``-token prompt, once (0 without one), decode step of ``ROW_BATCH``
    rows). No eviction between steps: the run's own weights are what passes through the caches,
    as in a stage."""
    runner = StageRunner(manifest, first, end, threads=threads, max_seqs=ROW_BATCH + 1, slowdown=slowdown,
                         one_pass=attention == PLAIN)
    try:
        pre, dec = _time_runner(runner, rng, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
                                repeats=repeats, warm_step=True)
        long = 0.0
        if long_prompt:
            _, long = _time_runner(runner, rng, prompt_tokens=long_prompt, decode_steps=decode_steps,
                                   repeats=1, warm_step=True)
        rows = _time_rows(runner, rng, prompt_tokens=prompt_tokens, steps=decode_steps)
        return pre, dec, long, rows
    finally:
        del runner


def _time_idle(manifest: Manifest, run: tuple[int, int], *, threads: int, slowdown: float, prompt_tokens: int,
               decode_steps: int, rng: np.random.Generator,
               attention: str = FUSED) -> tuple[tuple[float, float], tuple[float, float]]:
    """((idle_step_s, idle_step_frac), (idle_long_s, idle_long_frac)): what a step costs more
    after an ``IDLE_GAP_S`` pause, and after a ``LONG_IDLE_GAP_S`` one, than back to back, each
    fitted as a line in the step (``idle_fit``) over two stages, ``run`` (the first run of blocks)
    and one layer alone (``[1, 2)``). Steps back to back and steps after a short pause alternate,
    so that both see the same machine (a co-tenant's burst lands on both); medians of ``2 x
    decode_steps`` of each, then of ``LONG_IDLE_STEPS`` after a long pause."""
    points: list[tuple[float, float]] = []  # (step back to back, extra after a pause)
    long_points: list[tuple[float, float]] = []
    stages = [run] + ([(1, 2)] if run != (1, 2) and manifest.config.num_blocks > 2 else [])
    for first, end in stages:
        runner = StageRunner(manifest, first, end, threads=threads, max_seqs=2, slowdown=slowdown,
                             one_pass=attention == PLAIN)
        try:
            warm, cold, cold_long = _time_pauses(runner, rng, prompt_tokens=prompt_tokens, steps=2 * decode_steps)
        finally:
            del runner
        points.append((warm, max(0.0, cold - warm)))
        # never below the short pause's: a longer sleep cannot warm the node (a noisy median could)
        long_points.append((warm, max(0.0, cold - warm, cold_long - warm)))
    return idle_fit(points), idle_fit(long_points)


def _time_pauses(runner: StageRunner, rng: np.random.Generator, *, prompt_tokens: int,
                 steps: int) -> tuple[float, float, float]:
    """(median decode step right after the previous one, median step after an ``IDLE_GAP_S``
    pause, median step after a ``LONG_IDLE_GAP_S`` pause): ``steps`` of the first two,
    alternating, after a prompt and a warm-up step, then ``LONG_IDLE_STEPS`` of the last."""
    cfg = runner.manifest.config
    # the prompt, a warm-up step and 2 x steps steps fit in the model's context
    steps = max(1, min(steps, (cfg.max_position - 3 - LONG_IDLE_STEPS) // 2))
    prompt_tokens = max(1, min(prompt_tokens, cfg.max_position - 2 * steps - LONG_IDLE_STEPS - 2))
    x_prompt, x_step = _inputs(runner, rng, prompt_tokens)
    sid = ("profile", "idle")
    runner.alloc(sid, prompt_tokens + 2 * steps + LONG_IDLE_STEPS + 2)
    try:
        runner.prefill(sid, x_prompt)
        runner.decode([sid], x_step)  # warms the decode shapes
        warm: list[float] = []
        cold: list[float] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.decode([sid], x_step)
            warm.append(time.perf_counter() - t0)
            time.sleep(IDLE_GAP_S)
            t0 = time.perf_counter()
            runner.decode([sid], x_step)
            cold.append(time.perf_counter() - t0)
        long: list[float] = []
        for _ in range(LONG_IDLE_STEPS):
            time.sleep(LONG_IDLE_GAP_S)
            t0 = time.perf_counter()
            runner.decode([sid], x_step)
            long.append(time.perf_counter() - t0)
    finally:
        runner.free(sid)
    return float(np.median(warm)), float(np.median(cold)), float(np.median(long))


def idle_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, fraction) with extra = max(0, fixed + fraction x step) through (step, extra)
    points: the line through the shortest and the longest step's points (the fraction negative
    where the longer stage gains less, as on a slowed node whose long steps are cold already),
    with a fixed part never below 0 (else the line through 0 and the longest step's point); one
    point, or steps alike: all of it a fraction of the step."""
    pts = sorted((w, max(0.0, e)) for w, e in points if w > 0)
    if not pts:
        return 0.0, 0.0
    (w1, e1), (w2, e2) = pts[0], pts[-1]
    if w2 - w1 <= 1e-4:
        return 0.0, float(np.mean([e / w for w, e in pts]))
    frac = (e2 - e1) / (w2 - w1)
    fixed = e1 - frac * w1
    if fixed < 0:
        return 0.0, e2 / w2
    return float(fixed), float(frac)


def _share_out(per_block: list[float], first: int, end: int, total: float) -> None:
    """Scale ``per_block[first:end]`` in place so that it sums to ``total``, keeping its shape."""
    measured = sum(per_block[first:end])
    if measured <= 0 or total <= 0:
        return
    f = total / measured
    for b in range(first, end):
        per_block[b] *= f


def load_or_measure(manifest: Manifest, state_dir: Path, *, threads: int, slowdown: float,
                    memory_bytes: int, progress: Callable[[int, int, str], None] | None = None,
                    attention: str = FUSED, cache_dir: Path | None = None, **kw: Any) -> tuple[NodeProfile, bool]:
    """The cached profile when there is one for this (model, machine, threads, slowdown, attention
    kind), else a fresh measurement (written to the cache: ``cache_dir`` where given, else
    ``state_dir/profiles``). Returns (profile, from_cache)."""
    path = cache_path(state_dir, manifest.model_id, threads, slowdown, attention, cache_dir)
    if path.is_file():
        try:
            prof = NodeProfile.from_dict(json.loads(path.read_text()))
            if prof.model_id == manifest.model_id and len(prof.prefill_s_per_token) == manifest.config.num_blocks:
                return prof.with_memory(memory_bytes), True
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable profile cache %s: %s", path, e)
    prof = measure(manifest, threads=threads, slowdown=slowdown, memory_bytes=memory_bytes,
                   progress=progress, attention=attention, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # nodes sharing a cache may measure at once
    tmp.write_text(json.dumps(prof.to_dict(), indent=1))
    tmp.replace(path)
    return prof, False
