"""Scripted transcripts of the serving cores (``tests/transcripts/serve/*.txt``): frames, requests
and time in, every output out, compared line by line — the stage's scheduler and the entry's
request state machine driven with no network, no thread and no model (a stage's runners are fakes
that count positions; their "logits" make token = 7 × (positions so far) mod 16).
``MESHLLM_REWRITE_TRANSCRIPTS=1`` rewrites the expected sections (then read the diff).

Script commands (one per block; the expected output follows ``----``):
    config key=value ...            ServeConfig fields (before ``stage``/``entry``)
    stage NODE [capacity=N]         the core under test: a StageCore on NODE (runners hold N positions)
    entry NODE [prefill_ms=A,B,...] or an EntryCore on NODE (its router's prefill estimate: ms a
                                    prompt token on replica 0, 1, ...; none without it)
    plan EPOCH ROLE:node[a,b)+node[b,c) ...   a plan, replicas in order (blocks: 0 embed, 1-2 layers, 3 head)
    frame FROM TYPE k=v ...         a frame (v: int, a,b,c for a tuple, '-' for None; ids=1,2,3 and
                                    hidden=N make tensors; sampling=greedy:N is greedy with max_tokens N)
    run                             (stage) schedule one iteration, run its ops on the fakes, feed the results back
    submit ID prompt=1,2,3 max_tokens=N    (entry) a request, greedy
    cancel ID | linkdown PEER | tick T | unload EPOCH
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_control_transcripts import check_transcript

from meshllm.errors import CapacityError
from meshllm.planner.types import Plan, Replica, Role, Stage
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.entrycore import Emit, Ended, EntryCore, FirstToken, Waited
from meshllm.serve.router import Router
from meshllm.serve.routes import Routes
from meshllm.serve.stagecore import (
    AllocOp,
    Begin,
    DecodeOp,
    End,
    FreeOp,
    ImportOp,
    PrefillOp,
    Send,
    StageCore,
    run_op,
)
from meshllm.wire.messages import MESSAGE_TYPES, Message
from meshllm.wire.tensor import Tensor

HERE = Path(__file__).parent / "transcripts" / "serve"
SCRIPTS = sorted(HERE.glob("*.txt"))
LAYERS, VOCAB, HIDDEN = 2, 16, 4


TRUNCATED: list[str] = []  # what the fake runners dropped during a `run` (speculation's rejected drafts)


class FakeRunner:
    """Counts positions per sequence like a StageRunner; no arithmetic."""

    def __init__(self, first: int, end: int, capacity: int) -> None:
        self.first, self.end = first, end
        self.head = end == LAYERS + 2
        self.embed = first == 0
        self.len: dict[str, int] = {}
        self.max: dict[str, int] = {}
        self.kv = SimpleNamespace(budget=capacity, bytes_per_token=1, reserved=0, slot_len=capacity)

    def alloc(self, seq: str, n: int, group: Any = None) -> None:
        if seq in self.len:
            raise CapacityError(f"sequence {seq} already holds a slot")
        if self.kv.reserved + n > self.kv.budget:
            raise CapacityError(f"KV budget exhausted: {self.kv.reserved + n} of {self.kv.budget}")
        self.len[seq], self.max[seq] = 0, n
        self.kv.reserved += n

    def has_seq(self, seq: str) -> bool:
        return seq in self.len

    def seq_len(self, seq: str) -> int:
        return self.len[seq]

    def truncate(self, seq: str, length: int) -> None:
        TRUNCATED.append(f"truncate {seq} {self.len[seq]}->{length}")
        self.len[seq] = length

    def free(self, seq: str) -> None:
        self.kv.reserved -= self.max.pop(seq)
        del self.len[seq]

    def _out(self, length: int, rows: int) -> np.ndarray:
        if self.head:
            out = np.zeros((rows, VOCAB), np.float32)
            out[:, (7 * length) % VOCAB] = 1.0
            return out
        return np.full((rows, HIDDEN), float(length), np.float32)

    def prefill(self, seq: str, x: np.ndarray, last_only: bool = True) -> np.ndarray:
        self.len[seq] += len(x)
        return self._out(self.len[seq], 1)[0] if self.head else self._out(self.len[seq], len(x))

    def kv_export(self, seq: str, block: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((b - a, 1, 2), np.float32), np.zeros((b - a, 1, 2), np.float32)

    def kv_import(self, seq: str, block: int, k: np.ndarray, v: np.ndarray, start: int = 0) -> None:
        if seq not in self.len:
            raise CapacityError(f"unknown sequence {seq}")
        self.len[seq] = max(self.len[seq], start + len(k))

    def decode_rows(self, seqs: list[str], x: np.ndarray) -> tuple[np.ndarray, list[int], dict[str, Any]]:
        ok, errors, outs = [], {}, []
        for i, s in enumerate(seqs):
            if s not in self.len:
                errors[s] = CapacityError(f"unknown sequence {s}")
                continue
            self.len[s] += 1
            ok.append(i)
            outs.append(self._out(self.len[s], 1)[0])
        return np.array(outs, np.float32).reshape(len(ok), -1), ok, errors


class Runners:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.by: dict[int, dict[int, FakeRunner]] = {}

    def load(self, epoch: int, ranges: list[tuple[int, int]]) -> None:
        self.by[epoch] = {a: FakeRunner(a, b, self.capacity) for a, b in ranges}

    def has_epoch(self, epoch: int) -> bool:
        return epoch in self.by

    def runner(self, epoch: int, first: int) -> Any:
        return self.by.get(epoch, {}).get(first)

    def capacity_tokens(self, runner: Any) -> int | None:
        return int(runner.kv.budget)

    def free_tokens(self, runner: Any) -> int | None:
        return int(runner.kv.budget - runner.kv.reserved)


def parse_plan(epoch: int, specs: list[str]) -> Plan:
    reps = []
    for i, spec in enumerate(specs):
        role, stages = spec.split(":", 1)
        st = []
        for part in stages.split("+"):
            node, rng = part.split("[")
            a, b = rng.rstrip(")").split(",")
            st.append(Stage(node, (int(a), int(b))))
        reps.append(Replica(i, Role(role), tuple(st)))
    return Plan(epoch, tuple(reps), strategy="test")


def make_message(tag: str, kv: dict[str, str]) -> Message:
    cls = MESSAGE_TYPES[tag]
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    args: dict[str, Any] = {}
    for k, v in kv.items():
        tp = types[k]
        if k == "ids":
            args[k] = Tensor.from_array(np.array([int(x) for x in v.split(",")], np.int64))
        elif k == "hidden":
            args[k] = Tensor.from_array(np.zeros((int(v), HIDDEN), np.float32))
        elif k in ("k", "v"):
            args[k] = Tensor.from_array(np.zeros((int(v), 1, 2), np.float32))
        elif k == "sampling":
            kind, n = v.split(":")
            assert kind == "greedy"
            args[k] = SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True).to_dict()
        elif v == "-":
            args[k] = None
        elif tp.startswith("tuple[tuple"):  # rows split by "|": drafts=5,6|7
            args[k] = tuple(tuple(int(x) for x in row.split(",") if x) for row in v.split("|"))
        elif tp.startswith("tuple"):
            items = [x for x in v.split(",") if x]
            args[k] = tuple(int(x) if "int" in tp else x in ("1", "true") if "bool" in tp else x for x in items)
        elif tp == "bool":
            args[k] = v in ("1", "true")
        elif tp == "int":
            args[k] = int(v)
        elif tp == "float":
            args[k] = float(v)
        elif tp.startswith("dict"):
            args[k] = json.loads(v)
        else:
            args[k] = v
    return cls(**args)


def fmt_msg(m: Message) -> str:
    parts = [m.TYPE]
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        if f.default is not dataclasses.MISSING and v == f.default and f.name != "attempt":
            continue
        if isinstance(v, Tensor):
            v = "(" + ",".join(str(d) for d in v.array().shape) + ")"
        elif isinstance(v, dict):
            v = "{…}"
        elif isinstance(v, tuple) and v and isinstance(v[0], tuple):
            v = "|".join(",".join(str(x) for x in row) for row in v)
        elif isinstance(v, tuple):
            v = ",".join(str(int(x)) if isinstance(x, bool) else str(x) for x in v) or "()"
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{f.name}={v}")
    return " ".join(parts)


def fmt_op(op: Any) -> str:
    if isinstance(op, AllocOp):
        return f"alloc {op.hold.req}@{op.hold.attempt} n={op.tokens}"
    if isinstance(op, FreeOp):
        return f"free {op.seq}"
    if isinstance(op, ImportOp):
        return f"import {op.hold.req}@{op.hold.attempt} block={op.block} [{op.start},{op.start + len(op.k)})"
    if isinstance(op, PrefillOp):
        c = op.chunk
        return f"prefill {op.hold.req}@{op.hold.attempt} [{c.offset},{c.offset + len(c.x)})"
    assert isinstance(op, DecodeOp)
    kind = f"ring micro={op.micro} step={op.step}" if op.ring is not None else "fwd"
    counts = op.counts or [1] * len(op.holds)
    return f"decode {kind} " + ",".join(f"{h.req}@{h.attempt}" + (f"+{c - 1}" if c > 1 else "")
                                        for h, c in zip(op.holds, counts, strict=True))


class Transcript:
    def __init__(self) -> None:
        self.cfg: dict[str, Any] = {}
        self.now = 0.0
        self.stage: StageCore | None = None
        self.entry: EntryCore | None = None
        self.node = ""
        self.plans: dict[int, Routes] = {}
        self.runners: Runners | None = None
        self.active = 0

    def routes_for(self, epoch: int) -> Routes | None:
        return self.plans.get(epoch)

    def out(self, outs: list[Any]) -> list[str]:
        lines = []
        for o in outs:
            if isinstance(o, Send):
                lane = " [data]" if o.lane == "data" else ""
                lines.append(f"-> {o.to}{lane} {fmt_msg(o.msg)}")
            elif isinstance(o, Begin):
                lines.append(f"begin epoch={o.epoch} {o.req}")
            elif isinstance(o, End):
                lines.append(f"end epoch={o.epoch} {o.req}")
            elif isinstance(o, Emit):
                e = o.event
                extra = (f" finish={e.finish_reason}" if e.finish_reason else "") + \
                        (f" error={e.code}: {e.error}" if e.error else "")
                lines.append(f"emit {o.req} token={e.token_id} index={e.index}{extra}")
            elif isinstance(o, Waited):
                lines.append(f"waited {o.req} {o.seconds:g}s")
            elif isinstance(o, FirstToken):
                lines.append(f"first-token {o.req} {o.seconds:g}s")
            elif isinstance(o, Ended):
                f = o.finished
                lines.append(f"ended {o.request.id} {f.outcome} tokens={f.tokens} attempts={o.request.attempt}")
        return lines

    def run(self, command: str) -> list[str]:
        words = command.split()
        cmd, args = words[0], words[1:]
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        if cmd == "config":
            def value(k: str, v: str) -> Any:
                kind = type(getattr(ServeConfig(), k))
                return v in ("1", "true", "True") if kind is bool else kind(v)

            self.cfg.update({k: value(k, v) for k, v in kv.items()})
            return []
        if cmd == "stage":
            self.node = args[0]
            self.runners = Runners(int(kv.get("capacity", 1000)))
            self.stage = StageCore(self.node, self.runners, self.routes_for, ServeConfig(**self.cfg),
                                   num_layers=LAYERS, eos_ids=(), hidden_size=HIDDEN)
            return []
        if cmd == "entry":
            self.node = args[0]
            est = None
            if "prefill_ms" in kv:  # per replica, ms a prompt token
                per = [float(x) / 1000 for x in kv["prefill_ms"].split(",")]
                est = lambda routes, rid, n: per[rid] * n  # noqa: E731
            router = Router(self.routes_for, prefill_estimate=est)
            self.entry = EntryCore(self.node, ServeConfig(**self.cfg), vocab_size=VOCAB, max_position=1000,
                                   eos_ids=(), router=router,
                                   active=lambda: (self.active, self.plans[self.active]) if self.active else None)
            return []
        if cmd == "plan":
            epoch = int(args[0])
            plan = parse_plan(epoch, args[1:])
            self.plans[epoch] = Routes(epoch, plan)
            self.active = epoch
            if self.runners is not None:
                self.runners.load(epoch, [s.layers for r in plan.replicas for s in r.stages if s.node == self.node])
            return []
        if cmd == "tick":
            self.now = float(args[0])
            core = self.stage or self.entry
            assert core is not None
            return self.out(core.tick(self.now))
        if cmd == "frame":
            msg = make_message(args[1], {k: v for k, v in kv.items()})
            core = self.stage or self.entry
            assert core is not None
            return self.out(core.step(args[0], msg, self.now))
        if cmd == "linkdown":
            core = self.stage or self.entry
            assert core is not None
            return self.out(core.link_down(args[0], self.now))
        if cmd == "unload":
            assert self.stage is not None
            return self.out(self.stage.epoch_unloaded(int(args[0]), self.now))
        if cmd == "run":
            assert self.stage is not None
            it = self.stage.schedule(self.now)
            if it is None:
                return ["(nothing to run)"]
            TRUNCATED.clear()
            results = [run_op(op, {"decode_compute_s": 0.0, "decode_calls": 0}, lambda: 0.0) for op in it.ops]
            lines = ["ops: " + " | ".join(fmt_op(op) for op in it.ops)] + [f"   {t}" for t in TRUNCATED]
            for op, res in zip(it.ops, results, strict=True):
                if res.error is not None:
                    lines.append(f"   {fmt_op(op).split()[0]} failed ({res.kind}): {res.error}")
            return lines + self.out(self.stage.update_from_output(it, results, self.now))
        if cmd == "submit":
            assert self.entry is not None
            prompt = tuple(int(x) for x in kv["prompt"].split(","))
            params = SamplingParams(temperature=0.0, max_tokens=int(kv.get("max_tokens", 4)), ignore_eos=True)
            try:
                return self.out(self.entry.submit(args[0], prompt, params, 0, None, self.now))
            except Exception as e:
                return [f"refused: {type(e).__name__}: {e}"]
        if cmd == "cancel":
            assert self.entry is not None
            return self.out(self.entry.cancel(args[0], self.now))
        if cmd == "stats":  # the stage's counters named
            assert self.stage is not None
            return [" ".join(f"{k}={self.stage.stats[k]}" for k in args)]
        if cmd == "status":
            assert self.entry is not None
            r = self.entry.requests.get(args[0])
            return [f"{args[0]}: " + ("gone" if r is None else f"{r.status.value} attempt={r.attempt} "
                                      f"migrations={r.migrations} tokens={r.tokens}")]
        raise AssertionError(f"unknown command {command!r}")


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_serve_transcript(script: Path) -> None:
    check_transcript(script, Transcript())


def test_every_finding_has_a_transcript() -> None:
    assert len(SCRIPTS) >= 8
