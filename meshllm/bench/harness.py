"""What the runtime benchmarks share: timers, the statistic, bandwidth samplers, meshllm's own
engine, engines in child processes, and the alternation of engines in blocks of steps.

Method. Engines take turns in *blocks* of decode steps (``block`` steps of one engine, then a
block of the next, in a shuffled order, for several rounds), not step by step: a step of one
engine between two steps of another evicts the other's weights from the caches, and both then
run at about half their speed, which no user sees. Within a block each engine runs warm, as a
user's run would; over the rounds the machine's noise still falls on all of them alike.

Every engine that is not meshllm's own (llama.cpp through llama-cpp-python, onnxruntime-genai,
transformers) runs in a child process (``meshllm.bench.foreign``), timing its own steps there, so
that a crash (a native build dying with SIGILL on an instruction the VM refuses) ends that engine
and is reported, not the benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from meshllm.runtime.runner import StageRunner

BATCH = 8
BLOCK_STEPS = 64


class Engine(Protocol):
    name: str

    def start(self, prompts: np.ndarray) -> None: ...

    def steps(self, tokens: np.ndarray) -> list[float]: ...

    def prefill_s(self, ids: np.ndarray) -> float: ...

    def close(self) -> None: ...


class EngineFailed(RuntimeError):
    """A foreign engine could not start or its process died; the message says how."""


def _timed(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def stat(xs: list[float]) -> float:
    """The headline statistic: the 10th-percentile time. On a machine shared with other
    processes the fast samples are the least disturbed ones, for every engine alike; the 10th
    percentile is close to undisturbed speed without resting on a single lucky sample."""
    return float(np.percentile(np.asarray(xs), 10))


def bandwidth_samplers(nbytes: int = 1 << 28) -> dict[str, Callable[[], float]]:
    """Timers of one full read of a float32 array of ``nbytes`` by numpy, three ways (a matrix-
    vector product, a sum, a dot product of the array with itself: each element read once)."""
    a = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    mat = a.reshape(-1, 4096)  # (N, 4096)
    x = np.ones(4096, np.float32)
    tests: dict[str, Callable[[], object]] = {"matvec": functools.partial(np.matmul, mat, x),
                                              "sum": a.sum, "dot": functools.partial(np.dot, a, a)}
    out: dict[str, Callable[[], float]] = {}
    for name, f in tests.items():
        f()
        out[f"bw:{name}"] = functools.partial(_timed, f)
    return out


def sample_bandwidth(samplers: dict[str, Callable[[], float]], n: int, rng: np.random.Generator,
                     into: dict[str, list[float]]) -> None:
    """n timed reads by every sampler, in shuffled turns."""
    names = list(samplers)
    for _ in range(n):
        for j in rng.permutation(len(names)):
            into.setdefault(names[j], []).append(samplers[names[j]]())


class InProcess:
    """Adapts an object with ``start(prompts)``, ``step(tokens)`` and ``prefill_logits(ids)`` to
    the block interface, timing each step here."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    def start(self, prompts: np.ndarray) -> None:
        self.inner.start(prompts)

    def steps(self, tokens: np.ndarray) -> list[float]:
        out = []
        for t in tokens:
            t0 = time.perf_counter()
            self.inner.step(t)
            out.append(time.perf_counter() - t0)
        return out

    def prefill_s(self, ids: np.ndarray) -> float:
        return _timed(functools.partial(self.inner.prefill_logits, ids))

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class RunnerEngine:
    """meshllm's StageRunner over the whole model: fused (the blocks before the head as one
    session, the default) or one session per block; ``attention`` the kind (``runtime.attention``)."""

    def __init__(self, model_dir: Path, threads: int, max_len: int, fuse: bool = True,
                 name: str | None = None, spin: bool = False, attention: str = "fused") -> None:
        from meshllm.model.manifest import load_manifest

        m = load_manifest(model_dir)
        self.name = name or ("runner" if fuse else "runner_per_block")
        self.runner = StageRunner(m, 0, m.config.num_blocks, threads=threads, max_seqs=BATCH + 1, fuse=fuse,
                                  spin=spin, one_pass=attention == "plain")
        self.max_len = max_len
        self.seqs: list[int] = []
        self._next = 0

    def start(self, prompts: np.ndarray) -> None:
        """Free previous sequences and prefill one per row of prompts (B, T)."""
        for s in self.seqs:
            self.runner.free(s)
        self.seqs = []
        for p in prompts:
            self._next += 1
            self.runner.alloc(self._next, self.max_len)
            self.runner.prefill(self._next, p)
            self.seqs.append(self._next)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.runner.decode(self.seqs, tokens)  # (B, V)

    def prefill_logits(self, ids: np.ndarray) -> np.ndarray:
        self._next += 1
        self.runner.alloc(self._next, len(ids))
        try:
            return self.runner.prefill(self._next, ids)  # (V,)
        finally:
            self.runner.free(self._next)


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


class ForeignEngine:
    """An engine in a child process (``python -m meshllm.bench.foreign``), one JSON line per
    request and per answer. The child times its own steps, so the pipe costs nothing measured."""

    def __init__(self, kind: str, name: str, *, command: list[str] | None = None, **options: Any) -> None:
        """``options`` go to the engine's constructor in the child; ``command`` replaces the
        child's command line (tests)."""
        self.name = name
        argv = command or [sys.executable, "-m", "meshllm.bench.foreign", kind, json.dumps(options)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.info = self._call({"op": "hello"})

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.kill()
            rc = self.proc.wait()
            tail = (self.proc.stderr.read() if self.proc.stderr else "").strip().splitlines()[-3:]
            self._close_pipes()
            raise EngineFailed(f"{self.name}: the engine's process {_signal_name(rc)}"
                               + (f" ({' | '.join(tail)[:300]})" if tail else ""))
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            self.close()
            raise EngineFailed(f"{self.name}: {answer['error']}")
        return answer

    def start(self, prompts: np.ndarray) -> None:
        self._call({"op": "start", "prompts": np.asarray(prompts).tolist()})

    def steps(self, tokens: np.ndarray) -> list[float]:
        return [float(x) for x in self._call({"op": "steps", "tokens": np.asarray(tokens).tolist()})["times"]]

    def prefill_s(self, ids: np.ndarray) -> float:
        return float(self._call({"op": "prefill", "ids": np.asarray(ids).tolist()})["s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                with contextlib.suppress(OSError):
                    f.close()


def blocked_decode(engines: list[Any], prompts: np.ndarray, tokens: np.ndarray, rng: np.random.Generator,
                   block: int = BLOCK_STEPS, failed: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Per-step seconds of every engine over ``tokens`` (n, B): each engine prefills ``prompts``
    and runs one warm-up step, then the engines take turns in blocks of ``block`` consecutive
    steps, in a shuffled order each round. An engine that fails is dropped, its reason put in
    ``failed`` (and it leaves ``engines``)."""
    failed = failed if failed is not None else {}
    times: dict[str, list[float]] = {}

    def guarded(e: Any, f: Callable[[], Any]) -> bool:
        try:
            f()
            return True
        except EngineFailed as err:
            failed[e.name] = str(err)
            engines.remove(e)
            return False

    for e in list(engines):
        if guarded(e, functools.partial(e.start, prompts)):
            guarded(e, functools.partial(e.steps, tokens[:1]))  # warm
    for a in range(1, len(tokens), block):
        for e in [engines[j] for j in rng.permutation(len(engines))]:
            got: list[float] = []
            if guarded(e, functools.partial(_extend, got, e, tokens[a:a + block])):
                times.setdefault(e.name, []).extend(got)
    return times


def _extend(into: list[float], e: Any, tokens: np.ndarray) -> None:
    into.extend(e.steps(tokens))


def kernels_per_token(model_dir: Path, threads: int, context: int = 64, steps: int = 8,
                      attention: str = "fused") -> dict[str, Any]:
    """onnxruntime kernels one batch-1 decode step of the whole model runs (from its profiler),
    in all and per operator, with attention of kind ``attention``."""
    import tempfile

    from meshllm.model.manifest import load_manifest

    m = load_manifest(model_dir)
    with tempfile.TemporaryDirectory(prefix="meshllm-prof-") as tmp:
        r = StageRunner(m, 0, m.config.num_blocks, threads=threads, max_seqs=1, slot_len=context + steps + 2,
                        profile_prefix=str(Path(tmp) / "p"), one_pass=attention == "plain")
        r.alloc(0, context + steps + 1)
        r.prefill(0, np.arange(context, dtype=np.int64) % m.config.vocab_size)
        for _ in range(steps):
            r.decode([0], np.array([1]))
        total, by_op = r.kernels_per_step(steps)
    return {"attention": attention, "total": round(total, 1), "by_op": {k: round(v, 1) for k, v in by_op.items()}}


def exact_continuations(exact_dir: Path, prompts: list[list[int]], new_tokens: int,
                        threads: int, attention: str = "fused") -> tuple[StageRunner, list[list[int]]]:
    """The exact model's greedy continuation of each prompt (prompt + ``new_tokens`` ids), and its
    runner (for its own teacher-forced picks)."""
    from meshllm.model.manifest import load_manifest

    exact = load_manifest(exact_dir)
    rx = StageRunner(exact, 0, exact.config.num_blocks, threads=threads, max_seqs=1, one_pass=attention == "plain")
    seqs = []
    for i, ids in enumerate(prompts):
        seq = list(ids)
        rx.alloc(i, len(ids) + new_tokens + 1)
        logits = rx.prefill(i, np.array(ids, np.int64))
        for _ in range(new_tokens):
            seq.append(int(np.argmax(logits)))
            logits = rx.decode([i], np.array([seq[-1]]))[0]
        rx.free(i)
        seqs.append(seq)
    return rx, seqs


def runner_picks(r: StageRunner, prompts: list[list[int]], seqs: list[list[int]]) -> list[np.ndarray]:
    """Teacher-forced argmax at every continuation position: each sequence read in one prefill."""
    picks = []
    for i, (ids, seq) in enumerate(zip(prompts, seqs, strict=True)):
        r.alloc(("tf", i), len(seq))
        out = r.prefill(("tf", i), np.array(seq[:-1], np.int64), last_only=False)  # (T - 1, V)
        r.free(("tf", i))
        picks.append(np.argmax(out[len(ids) - 1:], axis=-1))
    return picks


def ortgenai_picks(model_dir: Path, prompts: list[list[int]], seqs: list[list[int]], threads: int) -> list[np.ndarray]:
    """``runner_picks`` for onnxruntime-genai's model (its ``model.onnx`` run directly by
    onnxruntime: a prompt with an empty past returns every position's logits)."""
    import json

    import onnxruntime as ort

    from meshllm.runtime.runner import session_options

    dec = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(model_dir / dec["filename"]), session_options(threads),
                                providers=["CPUExecutionProvider"])
    empty = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
    picks = []
    for ids, seq in zip(prompts, seqs, strict=True):
        feeds: dict[str, np.ndarray] = {"input_ids": np.array([seq[:-1]], np.int64),
                                        "attention_mask": np.ones((1, len(seq) - 1), np.int64)}
        feeds.update({i.name: empty for i in sess.get_inputs() if i.name.startswith("past_key_values")})
        logits = sess.run(["logits"], feeds)[0][0]  # (T - 1, V)
        picks.append(np.argmax(logits[len(ids) - 1:], axis=-1))
    return picks


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, int]:
    """(positions where the two pick the same token, positions)."""
    return sum(int((x == y).sum()) for x, y in zip(a, b, strict=True)), sum(len(x) for x in a)
