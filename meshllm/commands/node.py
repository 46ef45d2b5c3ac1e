"""``meshllm node``: run this device as a member of the mesh (discovery, election, planning).

Options come from the command line, then ``--config FILE`` (TOML or JSON with the same names, plus
``control`` and ``workload`` tables), then defaults. SIGINT/SIGTERM leave gracefully: the node
announces it is leaving, withdraws its mDNS advert and closes its links.

A mesh by hand on one machine (three shells; the same key file everywhere)::

    head -c 32 /dev/urandom | base64 > /tmp/mesh.key
    meshllm node --name a --host 127.0.0.1 --port 7101 --state-dir /tmp/a --mesh-key-file /tmp/mesh.key
    meshllm node --name b --host 127.0.0.1 --port 7102 --state-dir /tmp/b --mesh-key-file /tmp/mesh.key
    meshllm node --name c --host 127.0.0.1 --port 7103 --state-dir /tmp/c --mesh-key-file /tmp/mesh.key \
        --slowdown 3 --memory-budget 64MiB
    meshllm status --node 127.0.0.1:7101 --wait-ready 60
    meshllm replan --node 127.0.0.1:7102

On a LAN, ``meshllm node --mesh-key-file KEY`` on each device is enough; add ``--peer HOST:PORT``
where multicast does not pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import tomllib
from pathlib import Path
from typing import Any

from meshllm.errors import ConfigError, UserError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``1073741824``, ``8GB`` (10^9), ``8GiB`` / ``8G`` (2^30), ``512MB``..."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise UserError(f"--memory-budget: cannot read {text!r} (use bytes or e.g. 8GB, 512MiB)")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise UserError("--memory-budget must be positive")
    return n


def parse_peer(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--peer {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def primary_ipv4() -> str:
    """The IPv4 address of the interface holding the default route (127.0.0.1 without one).
    A UDP connect sends nothing; it only asks the kernel which source address it would use."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # TEST-NET-3: routed like any remote address
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run a mesh node (discovery, election, planning, HTTP API)")
    p.add_argument("--model", default=None, help="model directory (default: $MESHLLM_MODEL or the bundled one)")
    p.add_argument("--name", default=None, help="a human name for this node (default: its id)")
    p.add_argument("--host", default=None, help="address to listen on and advertise (default: the first "
                                                "--interface address, else listen on all and advertise the "
                                                "default route's address)")
    p.add_argument("--port", type=int, default=None, help="HTTP port for API and links (default 7070; 0: any)")
    p.add_argument("--interface", action="append", default=None, metavar="IFACE",
                   help="interface name or IPv4 address for mDNS (repeatable; default: the --host address)")
    p.add_argument("--peer", action="append", default=None, metavar="HOST:PORT",
                   help="a static peer to connect to (repeatable; for networks without multicast)")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS (static peers only)")
    p.add_argument("--mesh-key-file", default=None,
                   help="file holding the shared mesh key (default: $MESHLLM_MESH_KEY_FILE; without one the "
                        "mesh is open, and the node says so)")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the key clients of the OpenAI API must send as `Authorization: Bearer KEY` "
                        "(default: $MESHLLM_API_KEY_FILE; none: the API is open)")
    p.add_argument("--memory-budget", default=None, metavar="BYTES|GB", help="memory this node may use")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default 1)")
    p.add_argument("--slowdown", type=float, default=None, metavar="F",
                   help="make compute F times slower (F >= 1), to try heterogeneous meshes on one machine")
    p.add_argument("--strategy", default=None,
                   help="placement strategy the leader uses (default e2llm: the GA as islands on the members; "
                        "see `meshllm plan --help` for the others)")
    p.add_argument("--objective", default=None, help="latency | throughput | waiting (default waiting)")
    p.add_argument("--priority", type=int, default=None, help="leader preference (higher wins)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests this node holds as an entry before answering 429 (default 64)")
    p.add_argument("--kv-wire-dtype", default=None, choices=["float32", "float16"],
                   help="dtype of the KV a prefill replica hands to a decoder (default float32: exact)")
    p.add_argument("--config", default=None, metavar="FILE", help="TOML or JSON file with these options")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the node id and profile cache live (default ~/.local/state/meshllm/node-PORT)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="text, or JSON lines (one object a line)")
    p.set_defaults(func=run)


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of options")
    return {k.replace("-", "_"): v for k, v in data.items()}


def read_key(path: str | None, what: str) -> bytes | None:
    """The key in ``--{what}-key-file`` (stripped, at least 8 bytes), or None without a file."""
    if not path:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise UserError(f"cannot read --{what}-key-file {path}: {e.strerror}") from None
    if len(key) < 8:
        raise UserError(f"the {what} key must be at least 8 bytes")
    return key


def build_options(args: argparse.Namespace) -> Any:
    from meshllm.control.config import ControlConfig
    from meshllm.model.paths import resolve_model_dir
    from meshllm.net.discovery import interface_addresses
    from meshllm.node import DEFAULT_PORT, NodeOptions, default_state_dir
    from meshllm.planner.types import Workload

    cfg = load_config(args.config)
    known = {"model", "name", "host", "port", "interface", "peer", "mesh_key_file", "api_key_file", "memory_budget",
             "threads",
             "slowdown", "priority", "state_dir", "control", "workload", "no_mdns", "islands", "strategy",
             "objective", "max_queue", "kv_wire_dtype", "serve"}
    unknown = set(cfg) - known
    if unknown:
        raise ConfigError(f"--config: unknown options {sorted(unknown)}")

    def opt(name: str, default: Any = None) -> Any:
        v = getattr(args, name, None)
        # `is`, not `in`: 0 == False, and `--threads 0` must reach the range check
        return v if v is not None and v is not False else cfg.get(name, default)

    model_dir = resolve_model_dir(opt("model"))
    interfaces = opt("interface", [])
    interfaces = [interfaces] if isinstance(interfaces, str) else list(interfaces)
    addrs = interface_addresses(interfaces) if interfaces else []
    # Nothing said: listen everywhere and announce the address of the default route, so that
    # `meshllm node` alone joins the LAN's mesh.
    host = opt("host") or (addrs[0] if addrs else "0.0.0.0")
    if not addrs:
        primary = primary_ipv4()
        addrs = [host] if host != "0.0.0.0" else ([primary] if primary != "127.0.0.1" else [])
    port = int(opt("port", DEFAULT_PORT))
    if not 0 <= port < 65536:
        raise UserError(f"--port {port} out of range")
    peers = opt("peer", [])
    peers = [peers] if isinstance(peers, str) else list(peers)
    threads = int(opt("threads", 1))
    if threads < 1:
        raise UserError("--threads must be >= 1")
    slowdown = float(opt("slowdown", 1.0))
    if not slowdown >= 1.0:
        raise UserError("--slowdown must be >= 1")
    from meshllm.net.base import DEFAULT_MESH_KEY

    key = read_key(opt("mesh_key_file") or os.environ.get("MESHLLM_MESH_KEY_FILE"), "mesh") or DEFAULT_MESH_KEY
    api = read_key(opt("api_key_file") or os.environ.get("MESHLLM_API_KEY_FILE"), "api")
    api_key = api.decode() if api else None
    mem = opt("memory_budget")
    from meshllm.planner.strategies import OBJECTIVES, STRATEGIES

    strategy, objective = str(opt("strategy", "e2llm")), str(opt("objective", "waiting"))
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: known strategies are {', '.join(STRATEGIES)}")
    if objective not in OBJECTIVES:
        raise UserError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    from meshllm.serve.config import ServeConfig

    try:
        serve_kw = dict(cfg.get("serve", {}))
        for name in ("max_queue", "kv_wire_dtype"):
            if opt(name) is not None:
                serve_kw[name] = opt(name)
        serve = ServeConfig(**serve_kw)
        control = ControlConfig(**cfg.get("control", {}))
        workload = Workload.from_dict(cfg["workload"]) if "workload" in cfg else Workload()
    except TypeError as e:
        raise ConfigError(f"--config: {e}") from None
    advertise = host if host != "0.0.0.0" else (addrs[0] if addrs else primary_ipv4())
    state_dir = Path(opt("state_dir") or default_state_dir(port))
    return NodeOptions(
        model_dir=model_dir, state_dir=state_dir, mesh_key=key, name=opt("name") or "", host=host,
        advertise_host=advertise, port=port, interfaces=tuple(addrs), peers=tuple(parse_peer(x) for x in peers),
        memory_budget=parse_bytes(mem) if mem is not None else None, threads=threads, slowdown=slowdown,
        priority=int(opt("priority", 0)), control=control, workload=workload,
        islands=int(cfg.get("islands", 0)), strategy=strategy, serve=serve, api_key=api_key, objective=objective, mdns=not (args.no_mdns or cfg.get("no_mdns", False)))


async def serve(opts: Any) -> int:
    from meshllm.node import Node

    node = Node.real(opts)
    from meshllm.obs.logs import set_default_node

    set_default_node(node.name)  # one node in this process: every line is about it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await node.start()
    logging.getLogger("meshllm.node").info(
        "listening on http://%s:%d (GET /v1/mesh; `meshllm status --node %s:%d`)",
        opts.advertise_host, node.port, opts.advertise_host, node.port)
    try:
        await stop.wait()
    finally:
        logging.getLogger("meshllm.node").info("leaving the mesh")
        await node.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    from meshllm.obs.logs import setup_logging

    setup_logging(getattr(args, "log_format", "text"), args.log_level)  # also quiets zeroconf and aiohttp
    opts = build_options(args)
    try:
        import uvloop

        return uvloop.run(serve(opts))
    except ImportError:
        return asyncio.run(serve(opts))
