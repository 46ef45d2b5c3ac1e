"""``meshllm demo``: the main job on the bundled model, for a first look.

It completes a prompt with the bundled model on this machine, streaming the text, and then
(unless ``--no-mesh``) starts a small mesh of ``meshllm node`` processes on loopback with
different speeds, waits until they have found each other, elected a leader and activated a
plan, prints the mesh, and stops them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from meshllm.errors import MeshError, UserError

DEMO_PROMPT = "class Stack:\n    def __init__(self"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the bundled model (generate, then a local mesh)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled models/tiny)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="prompt to complete")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; a 5M-parameter model repeats itself when greedy")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (the demo is reproducible)")
    p.add_argument("--nodes", type=int, default=3, help="mesh nodes to start on loopback (default %(default)s)")
    p.add_argument("--no-mesh", action="store_true", help="only generate; start no mesh")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the mesh to be ready")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return None


def _generate(args: argparse.Namespace) -> None:
    from meshllm.cli import main as cli_main

    print(f"== meshllm generate (temperature {args.temperature}, seed {args.seed}) ==\n{args.prompt}",
          end="", flush=True)
    argv = ["generate", "--temperature", str(args.temperature), "--seed", str(args.seed),
            "--max-tokens", str(args.max_tokens), args.prompt]
    if args.model:
        argv[1:1] = ["--model", args.model]
    rc = cli_main(argv)
    if rc:
        raise MeshError(f"generate failed with exit code {rc}")


def _mesh(args: argparse.Namespace) -> None:
    if args.nodes < 1:
        raise UserError("--nodes must be at least 1")
    print(f"\n== a mesh of {args.nodes} nodes on 127.0.0.1 (mDNS discovery, election, planning) ==",
          flush=True)
    ports = [_free_port() for _ in range(args.nodes)]
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="meshllm-demo-") as tmp:
        key = Path(tmp) / "mesh.key"
        key.write_text(os.urandom(16).hex())
        try:
            for i, port in enumerate(ports):
                cmd = [sys.executable, "-m", "meshllm.cli", "node", "--name", f"demo-{i}",
                       "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
                       "--mesh-key-file", str(key), "--state-dir", str(Path(tmp) / f"n{i}"),
                       # different speeds, so the planner has something to decide
                       "--slowdown", str(1 + i)]
                if args.model:
                    cmd += ["--model", args.model]
                cmd += [a for p in ports if p != port for a in ("--peer", f"127.0.0.1:{p}")]
                logs.append(open(Path(tmp) / f"n{i}.log", "wb"))  # noqa: SIM115 - closed in finally
                procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT))
            url = f"http://127.0.0.1:{ports[0]}"
            deadline = time.monotonic() + args.timeout
            mesh = None
            while time.monotonic() < deadline:
                mesh = _get_json(url + "/v1/mesh")
                if mesh and mesh.get("ready"):
                    break
                for i, p in enumerate(procs):
                    if p.poll() is not None:
                        tail = (Path(tmp) / f"n{i}.log").read_text(errors="replace")[-2000:]
                        raise MeshError(f"node demo-{i} exited with {p.returncode}:\n{tail}")
                time.sleep(0.5)
            else:
                raise MeshError(f"the mesh was not ready within {args.timeout:.0f} s")
            from meshllm.cli import main as cli_main

            cli_main(["status", "--node", url])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()


def run(args: argparse.Namespace) -> int:
    _generate(args)
    if not args.no_mesh:
        _mesh(args)
    return 0
