"""``meshllm up``: a whole mesh on this machine — N ``meshllm node`` processes on loopback.

    meshllm up --nodes N [--model DIR] [--base-port P] [--budgets B1,B2,...] [--slowdowns F1,F2,...]
               [--prompt TEXT [--chat] [--max-tokens N] [--temperature T] [--seed S]] [--json]

The nodes find each other by mDNS on 127.0.0.1 (each also gets the others as static peers, in case
multicast is unavailable), elect a leader, measure themselves and activate a plan. ``up`` waits for
that, prints the plan, and then serves until Ctrl-C (every node's OpenAI-compatible API is on its
port) — or, with ``--prompt``, streams one answer through the mesh and shuts everything down.
Budgets (``--memory-budget`` per node) and slowdowns make a heterogeneous mesh on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from meshllm.client import get_json
from meshllm.errors import MeshError, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a mesh of N nodes on this machine (and optionally ask it once)")
    p.add_argument("--nodes", type=int, default=3, help="node processes to start (default %(default)s)")
    p.add_argument("--model", default=None, help="model directory (default: $MESHLLM_MODEL or the bundled one)")
    p.add_argument("--base-port", type=int, default=0,
                   help="node i listens on P + i (default 0: free ports)")
    p.add_argument("--budgets", default=None, metavar="B1,B2,...",
                   help="memory budget per node, e.g. 64MiB,24MiB,24MiB (the last one repeats)")
    p.add_argument("--slowdowns", default=None, metavar="F1,F2,...",
                   help="compute slowdown per node, e.g. 1,2,2 (the last one repeats)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per node (default 1)")
    p.add_argument("--strategy", default=None, help="placement strategy (default: the node's, e2llm)")
    p.add_argument("--mesh-key-file", default=None, help="mesh key file (default: a fresh key)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a `meshllm node --config` file every node reads (control timings, workload)")
    p.add_argument("--prompt", default=None, help="ask the mesh this, stream the answer, then stop")
    p.add_argument("--chat", action="store_true", help="send --prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default %(default)s)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for an active plan")
    p.add_argument("--log-dir", default=None, help="keep the nodes' logs here (default: a temporary dir)")
    p.add_argument("--json", action="store_true", help="print the plan and the answer as JSON")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="the nodes' log format")
    p.set_defaults(func=run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def per_node(text: str | None, n: int, what: str) -> list[str | None]:
    if not text:
        return [None] * n
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what}: empty list")
    if len(items) > n:
        raise UserError(f"--{what}: {len(items)} values for {n} nodes")
    out: list[str | None] = [*items, *[items[-1]] * (n - len(items))]
    return out


def premeasure_states(model: str | None, states: list[Path], slowdowns: list[float], threads: int) -> None:
    """Profile each node (its state directory ``states[i]``, its ``slowdowns[i]``) here, one after
    another, before the nodes start: nodes that measured themselves at once on one machine would
    share its cores and memory bandwidth and all look slower than they are (on real devices each
    measures alone). Nodes of one slowdown share one measurement; each node finds its profile in
    its state directory's cache, or in the ``profile_dir`` the environment gives them all."""
    from meshllm.model.manifest import load_manifest
    from meshllm.model.paths import resolve_model_dir
    from meshllm.runtime.attention import choose
    from meshllm.runtime.profile import available_memory_bytes, load_or_measure
    from meshllm.settings import attention_setting, profile_dir_setting

    manifest = load_manifest(resolve_model_dir(model), verify=False)
    attention = choose(*attention_setting(os.environ))  # what the nodes (this environment) profile with
    shared = profile_dir_setting(os.environ)
    done: dict[float, tuple[Path, Path]] = {}
    for state, slowdown in zip(states, slowdowns, strict=True):
        if shared is None and slowdown in done:  # (one shared cache finds its own measurement)
            first, src = done[slowdown]
            dst = state / src.relative_to(first)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            continue
        # the memory decides which runs of blocks are timed as stages (the whole model where it
        # fits, as a node measures itself); the budget itself is not part of the cached profile
        load_or_measure(manifest, state, threads=threads, slowdown=slowdown, memory_bytes=available_memory_bytes(),
                        attention=attention, cache_dir=shared)
        if shared is None:
            done[slowdown] = (state, next((state / "profiles").glob("*.json")))


class LocalMesh:
    """N node processes on loopback; a context manager that always stops them."""

    def __init__(self, n: int, *, model: str | None = None, base_port: int = 0, budgets: str | None = None,
                 slowdowns: str | None = None, threads: int = 1, strategy: str | None = None,
                 key_file: str | None = None, log_dir: str | None = None, extra: list[str] | None = None,
                 measure_first: bool = True) -> None:
        if n < 1:
            raise UserError("--nodes must be at least 1")
        if not 0 <= base_port < 65536 - n:
            raise UserError(f"--base-port {base_port} out of range")
        if threads < 1:
            raise UserError("--threads must be at least 1")
        self.n = n
        self.model = model
        self.ports = [base_port + i for i in range(n)] if base_port else [free_port() for _ in range(n)]
        self.budgets = per_node(budgets, n, "budgets")
        self.slowdowns = per_node(slowdowns, n, "slowdowns")
        self.threads = threads
        self.strategy = strategy
        self.key_file = key_file
        self.extra = extra or []
        self.measure_first = measure_first
        self._tmp = tempfile.TemporaryDirectory(prefix="meshllm-up-")
        self.dir = Path(log_dir) if log_dir else Path(self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def state_dir(self, i: int) -> Path:
        """Node ``i``'s state directory (its profile cache is under it)."""
        return Path(self._tmp.name) / f"state-{i}"

    def premeasure(self) -> None:
        """Profile each node here, one after another, before the nodes start (see
        ``premeasure_states``)."""
        premeasure_states(self.model, [self.state_dir(i) for i in range(self.n)],
                          [float(s or 1.0) for s in self.slowdowns], self.threads)

    def __enter__(self) -> LocalMesh:
        if self.measure_first:
            self.premeasure()
        key = self.key_file
        if key is None:
            path = Path(self._tmp.name) / "mesh.key"
            path.write_text(os.urandom(16).hex())
            key = str(path)
        try:
            for i, port in enumerate(self.ports):
                cmd = [sys.executable, "-m", "meshllm.cli", "node", "--name", f"node-{i}", "--host", "127.0.0.1",
                       "--port", str(port), "--threads", str(self.threads), "--mesh-key-file", key,
                       "--state-dir", str(self.state_dir(i))]
                if self.model:
                    cmd += ["--model", self.model]
                if self.budgets[i]:
                    cmd += ["--memory-budget", str(self.budgets[i])]
                if self.slowdowns[i]:
                    cmd += ["--slowdown", str(self.slowdowns[i])]
                if self.strategy:
                    cmd += ["--strategy", self.strategy]
                cmd += [a for p in self.ports if p != port for a in ("--peer", f"127.0.0.1:{p}")]
                cmd += self.extra
                self._logs.append(open(self.dir / f"node-{i}.log", "wb"))
                self.procs.append(subprocess.Popen(cmd, stdout=self._logs[-1], stderr=subprocess.STDOUT))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """The node processes' ids, in node order."""
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise MeshError(f"node-{i} exited with {p.returncode}:\n{self.log_tail(i)}")

    def log_tail(self, i: int, n: int = 3000) -> str:
        try:
            return (self.dir / f"node-{i}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The first node's mesh view once every node is in it and a plan is active."""
        deadline = time.monotonic() + timeout
        view: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            view = get_json(self.urls[0] + "/v1/mesh")
            if (view and view.get("ready") and len([m for m in view.get("members", []) if m.get("state") == "alive"])
                    == self.n):
                views = [get_json(u + "/v1/mesh") for u in self.urls]
                if all(v and v.get("ready") and v.get("epoch") == view["epoch"] for v in views):
                    return dict(view)
            time.sleep(0.25)
        why = (view or {}).get("why_not_ready") or "no answer"
        raise MeshError(f"the mesh was not ready within {timeout:.0f} s ({why})")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        for f in self._logs:
            f.close()
        self._logs = []
        with contextlib.suppress(OSError):
            self._tmp.cleanup()


def plan_lines(view: dict[str, Any]) -> list[str]:
    names = {m["id"]: m.get("name") or m["id"][:8] for m in view.get("members", [])}
    plan = view.get("plan") or {}
    out = [f"plan epoch {view.get('epoch')} ({plan.get('strategy', '?')}), leader "
           f"{names.get(view.get('leader') or '', view.get('leader'))}:"]
    for r in plan.get("replicas", []):
        stages = " -> ".join(f"{names.get(s['node'], s['node'][:8])}[{s['layers'][0]},{s['layers'][1]})"
                             for s in r["stages"])
        out.append(f"  replica {r['id']} {r['role'].upper():8s} {stages}")
    return out


def run(args: argparse.Namespace) -> int:
    from meshllm.commands import prompt as prompt_cmd
    from meshllm.settings import resolve

    # the nodes read the file and this environment: a bad value is one error here, not N dead nodes
    resolve(argparse.Namespace(config=args.config), os.environ)

    with LocalMesh(args.nodes, model=args.model, base_port=args.base_port, budgets=args.budgets,
                   slowdowns=args.slowdowns, threads=args.threads, strategy=args.strategy,
                   key_file=args.mesh_key_file, log_dir=args.log_dir,
                   extra=(["--config", args.config] if args.config else []) + ["--log-format", args.log_format]) as mesh:
        if not args.json:
            print(f"starting {args.nodes} nodes on 127.0.0.1 (ports {', '.join(map(str, mesh.ports))}); "
                  f"logs in {mesh.dir}", flush=True)
        view = mesh.wait_ready(args.timeout)
        if not args.json:
            print("\n".join(plan_lines(view)), flush=True)
        if args.prompt is None:
            if args.json:
                print(json.dumps({"urls": mesh.urls, "plan": view.get("plan")}), flush=True)
            else:
                print(f"dashboard: {mesh.urls[0]}/ (any node)\n"
                      f"serving: OpenAI API at {mesh.urls[0]}/v1, Ollama API at {mesh.urls[0]}/api (any node); "
                      f"try `meshllm prompt --node {mesh.urls[0]} \"...\"`. Ctrl-C stops.", flush=True)
            stop = False

            def on_signal(*_: object) -> None:
                nonlocal stop
                stop = True

            signal.signal(signal.SIGTERM, on_signal)
            try:
                while not stop:
                    mesh.check_alive()
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            return 0
        pargs = argparse.Namespace(text=args.prompt, node=mesh.urls[-1], max_tokens=args.max_tokens,
                                   temperature=args.temperature, top_p=1.0, top_k=0, seed=args.seed, stop=[],
                                   ignore_eos=False, chat=args.chat, json=args.json, timeout=300.0)
        if not args.json:
            print(f"\n> {args.prompt}", flush=True)
        return int(prompt_cmd.run(pargs))
