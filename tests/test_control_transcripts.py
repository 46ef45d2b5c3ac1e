"""Scripted transcripts of the control plane (in the manner of raft's testdata): a readable script
of steps in ``tests/transcripts/*.txt``, and after each step every output of every node, compared
line by line. ``MESHLLM_REWRITE_TRANSCRIPTS=1`` rewrites the expected sections (then read the diff).

Script commands (one per block, the expected output follows ``----``):
    config key=value ...          ControlConfig fields (before ``nodes``)
    nodes a:PRIO b:PRIO ...       create the nodes at time 0
    tick T [node ...]             advance the clock of the nodes (default: all live) to T
    deliver                       deliver every frame queued so far (through the codec)
    stabilize                     deliver until nothing is queued (the clock does not move)
    crash N | restart N:PRIO (a fresh node, state lost) | partition a b | c | heal
    profile N | loaded N EPOCH [error] | idle N EPOCH | replan N | shutdown N
    propose N ROUND node ...      the shell's planner answers: one replica over these nodes
    badplan N ROUND               the shell's planner answers with a plan the validator refuses
    observe N IN OUT COUNT        COUNT finished requests with these lengths
    islands N ROUND K             the shell answers StartPlanning with K toy GA islands
    evolve N                      the shell finishes every EvolveIsland N was asked for
    inject DST SRC TYPE k=v ...   a hand-made message from SRC (v: int, '-' for None, else str)
    raw DST SRC HEX               a raw frame
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from meshllm.control.config import ControlConfig
from meshllm.control.events import (
    Broadcast,
    EpochIdle,
    EvolveIsland,
    IslandEvolved,
    Islands,
    ObservedRequest,
    OperatorReplan,
    Output,
    PlanLoaded,
    ProfileReady,
    ProposePlan,
    Send,
    Shutdown,
)
from meshllm.control.node import ControlNode
from meshllm.control.simnet import toy_evolve, toy_plan
from meshllm.errors import PlanError
from meshllm.wire.codec import Codec
from meshllm.wire.messages import MESSAGE_TYPES, Message

HERE = Path(__file__).parent / "transcripts"
SCRIPTS = sorted(HERE.glob("*.txt"))


def validate(plan: dict) -> None:
    if plan.get("bad"):
        raise PlanError("replica 0 leaves blocks [2, 4) unplaced")


def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bytes):
        return v.hex()[:12] + ("…" if len(v) > 6 else "")
    if isinstance(v, dict):
        if "replicas" in v:
            nodes = [s["node"] for r in v["replicas"] for s in r["stages"]]
            return "plan(" + ",".join(nodes) + ")"
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    if isinstance(v, tuple):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_fields(obj) -> str:
    """Fields that differ from their defaults (required fields always)."""
    parts = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        if v != default:
            parts.append(f"{f.name}={fmt_value(v)}")
    return " ".join(parts)


class Transcript:
    def __init__(self) -> None:
        self.config = ControlConfig()
        self.codec = Codec(max_message_bytes=4096)
        self.nodes: dict[str, ControlNode] = {}
        self.queue: list[tuple[str, str, bytes]] = []
        self.crashed: set[str] = set()
        self.groups: list[set[str]] | None = None
        self.time = 0.0
        self.evolving: dict[str, list[EvolveIsland]] = {}

    def link(self, a: str, b: str) -> bool:
        if a in self.crashed or b in self.crashed:
            return False
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def perform(self, node: str, outputs: list[Output], lines: list[str]) -> None:
        for o in outputs:
            if isinstance(o, Send | Broadcast):
                to = o.to if isinstance(o, Send) else "*"
                lines.append(f"{node} -> {to} {o.msg.TYPE} {fmt_fields(o.msg)}")
                targets = [o.to] if isinstance(o, Send) else [n for n in self.nodes if n != node]
                data = self.codec.encode(o.msg)
                self.queue += [(node, t, data) for t in targets]
            else:
                if isinstance(o, EvolveIsland):
                    self.evolving.setdefault(node, []).append(o)
                lines.append(f"{node}: {type(o).__name__} {fmt_fields(o)}".rstrip())

    def deliver(self, lines: list[str]) -> None:
        batch, self.queue = self.queue, []
        for src, dst, data in batch:
            if self.link(src, dst):
                self.perform(dst, self.nodes[dst].receive_bytes(src, data), lines)

    def run(self, command: str) -> list[str]:
        words = command.split()
        cmd, args = words[0], words[1:]
        lines: list[str] = []
        if cmd == "config":
            self.config = ControlConfig(**{k: float(v) if "." in v else int(v)
                                           for k, v in (a.split("=") for a in args)})
        elif cmd in ("nodes", "restart"):
            for a in args:
                name, prio = a.split(":")
                self.crashed.discard(name)
                self.nodes[name] = ControlNode(name, rng=np.random.default_rng(7), config=self.config,
                                               priority=int(prio), now=self.time, validate_plan=validate,
                                               codec=self.codec)
        elif cmd == "tick":
            t = self.time = float(args[0])
            for n in args[1:] or [n for n in self.nodes if n not in self.crashed]:
                self.perform(n, self.nodes[n].tick(t), lines)
        elif cmd == "deliver":
            self.deliver(lines)
        elif cmd == "stabilize":
            for _ in range(50):
                if not self.queue:
                    break
                self.deliver(lines)
        elif cmd == "crash":
            self.crashed.add(args[0])
        elif cmd == "partition":
            self.groups = [set(g.split()) for g in " ".join(args).split("|")]
        elif cmd == "heal":
            self.groups = None
        elif cmd == "inject":
            dst, src, tag = args[:3]
            kwargs = {}
            for kv in args[3:]:
                k, v = kv.split("=", 1)
                if k == "plan":  # plan=bad, or plan=a,b: one replica over these nodes
                    kwargs[k] = {**toy_plan(["a"]), "bad": True} if v == "bad" else toy_plan(v.split(","))
                else:
                    kwargs[k] = None if v == "-" else int(v) if v.lstrip("-").isdigit() else v
            msg: Message = MESSAGE_TYPES[tag](**kwargs)
            self.perform(dst, self.nodes[dst].receive_bytes(src, self.codec.encode(msg)), lines)
        elif cmd == "islands":
            node, rnd, k = args[0], int(args[1]), int(args[2])
            isl = tuple(((i, i), (i + 1, i)) for i in range(k))
            self.perform(node, self.nodes[node].step(Islands(rnd, isl, {"toy": 1}, 2)), lines)
        elif cmd == "evolve":
            for work in self.evolving.pop(args[0], []):
                inds, fit = toy_evolve(work.individuals, work.generations, work.seed)
                self.perform(args[0], self.nodes[args[0]].step(
                    IslandEvolved(work.round, work.island, inds, fit)), lines)
        elif cmd == "raw":
            dst, src, hexdata = args
            data = bytes.fromhex(hexdata) if hexdata != "big" else msgpack.packb(
                {"v": 1, "t": "heartbeat", "b": {"pad": "x" * 5000}})
            self.perform(dst, self.nodes[dst].receive_bytes(src, data), lines)
        else:
            node = self.nodes[args[0]]
            ev = {
                "profile": lambda: ProfileReady({"memory": 1 << 30}),
                "loaded": lambda: PlanLoaded(int(args[1]), len(args) < 3, " ".join(args[2:])),
                "idle": lambda: EpochIdle(int(args[1])),
                "replan": lambda: OperatorReplan("operator"),
                "shutdown": lambda: Shutdown(),
                "propose": lambda: ProposePlan(int(args[1]), toy_plan(args[2:])),
                "badplan": lambda: ProposePlan(int(args[1]), {**toy_plan([args[0]]), "bad": True}),
                "observe": lambda: None,
            }[cmd]()
            if cmd == "observe":
                for _ in range(int(args[3])):
                    self.perform(args[0], node.step(ObservedRequest(int(args[1]), int(args[2]))), lines)
            else:
                self.perform(args[0], node.step(ev), lines)
        return lines


def parse(text: str) -> list[tuple[list[str], str, list[str]]]:
    """Blocks of (leading comment lines, command, expected lines)."""
    blocks, comments, lines = [], [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            if line.strip():
                comments.append(line)
            i += 1
            continue
        command = line.strip()
        assert lines[i + 1] == "----", f"line {i + 2}: expected ---- after {command!r}"
        i += 2
        expected = []
        while i < len(lines) and lines[i].strip():
            expected.append(lines[i])
            i += 1
        blocks.append((comments, command, expected))
        comments = []
    return blocks


def check_transcript(script: Path, t) -> None:
    """Run a script's commands through ``t.run`` and compare every output with the script's, or
    rewrite the expected sections when ``MESHLLM_REWRITE_TRANSCRIPTS`` is set."""
    blocks = parse(script.read_text())
    rewritten, failures = [], []
    for comments, command, expected in blocks:
        got = t.run(command) or ["(no output)"]
        rewritten += [*comments, command, "----", *got, ""]
        if got != expected:
            failures.append(f"{command}\n  expected:\n    " + "\n    ".join(expected)
                            + "\n  got:\n    " + "\n    ".join(got))
    if os.environ.get("MESHLLM_REWRITE_TRANSCRIPTS"):
        script.write_text("\n".join(rewritten).rstrip("\n") + "\n")
        return
    assert not failures, f"{script.name}: " + "\n".join(failures[:3])


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_transcript(script: Path) -> None:
    check_transcript(script, Transcript())


def test_transcripts_exist() -> None:
    assert len(SCRIPTS) >= 4
