"""``meshllm node``: run this device as a member of the mesh (discovery, election, planning).

Every option is in ``meshllm/settings.py``'s one table (``docs/configuration.md``): flags win over
``MESHLLM_…`` environment variables, those over ``--config FILE`` (TOML or JSON, with ``serve``,
``control`` and ``workload`` tables), that over the defaults; ``meshllm config show`` prints the
effective values and where each came from. SIGINT/SIGTERM leave gracefully: the node
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
import logging
import os
import signal
from pathlib import Path
from typing import Any

from meshllm.errors import ConfigError, UserError
from meshllm.settings import Settings, add_arguments, parse_bytes, parse_peer, resolve

__all__ = ["build_options", "parse_bytes", "parse_peer", "primary_ipv4", "register", "run"]


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
    p = sub.add_parser("node", help="run a mesh node (discovery, election, planning, HTTP API)",
                       epilog="Flags win over MESHLLM_... environment variables, those over the --config file, "
                              "that over the defaults. The file's [serve], [control] and [workload] tables (and "
                              "their variables, e.g. MESHLLM_SERVE_MAX_QUEUE) hold the rest: `meshllm config "
                              "table` lists every option, `meshllm config show` the effective values.")
    add_arguments(p)
    p.set_defaults(func=run)


def read_key(path: str | None, what: str, origin: str | None = None) -> bytes | None:
    """The key in ``--{what}-key-file`` (stripped, at least 8 bytes), or None without a file.
    ``origin`` says where the path was given (``MESHLLM_MESH_KEY_FILE=...``) for the error."""
    if not path:
        return None
    where = origin or f"--{what}-key-file {path}"
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise UserError(f"cannot read {where}: {e.strerror}") from None
    if len(key) < 8:
        raise UserError(f"the {what} key must be at least 8 bytes ({where})")
    return key


def settings(args: argparse.Namespace) -> Settings:
    """The effective options: flags, then the environment, then the config file, then defaults."""
    return resolve(args, os.environ)


def build_options(args: argparse.Namespace, conf: Settings | None = None) -> Any:
    from meshllm.control.config import ControlConfig
    from meshllm.model.paths import resolve_model_dir
    from meshllm.net.base import DEFAULT_MESH_KEY
    from meshllm.net.discovery import interface_addresses
    from meshllm.node import NodeOptions
    from meshllm.planner.types import Workload
    from meshllm.serve.config import ServeConfig
    from meshllm.state import default_state_dir

    c = conf or settings(args)
    model_dir = resolve_model_dir(c["model"])
    interfaces = c["interface"]
    addrs = interface_addresses(interfaces) if interfaces else []
    # Nothing said: listen everywhere and announce the address of the default route, so that
    # `meshllm node` alone joins the LAN's mesh.
    host = c["host"] or (addrs[0] if addrs else "0.0.0.0")
    if not addrs:
        primary = primary_ipv4()
        addrs = [host] if host != "0.0.0.0" else ([primary] if primary != "127.0.0.1" else [])
    port = c["port"]
    key = read_key(c["mesh_key_file"], "mesh", c.origins["mesh_key_file"]) or DEFAULT_MESH_KEY
    api = read_key(c["api_key_file"], "api", c.origins["api_key_file"])
    if bool(c["tls_cert"]) != bool(c["tls_key"]):
        raise UserError("--tls-cert and --tls-key go together (a certificate and its private key)")
    if c["tls_cert"]:
        from meshllm.net.base import server_ssl

        server_ssl(c["tls_cert"], c["tls_key"])  # a bad pair is an error now, not at the first client
    tables: dict[str, Any] = {}
    for name, build in (("serve", lambda kw: ServeConfig(**kw)), ("control", lambda kw: ControlConfig(**kw)),
                        ("workload", Workload.from_dict)):
        try:
            tables[name] = build(c.table(name))
        except ConfigError as e:
            where = ", ".join(c.given(name)) or "defaults"
            raise ConfigError(f"[{name}] ({where}): {e}") from None
    advertise = host if host != "0.0.0.0" else (addrs[0] if addrs else primary_ipv4())
    state_dir = Path(c["state_dir"] or default_state_dir(port))
    return NodeOptions(
        model_dir=model_dir, state_dir=state_dir, mesh_key=key, name=c["name"] or "", host=host,
        advertise_host=advertise, port=port, interfaces=tuple(addrs), peers=tuple(parse_peer(x) for x in c["peer"]),
        memory_budget=c["memory_budget"], threads=c["threads"], spin=c["spin"], slowdown=c["slowdown"], priority=c["priority"],
        control=tables["control"], workload=tables["workload"], islands=c["islands"], strategy=c["strategy"],
        serve=tables["serve"], api_key=api.decode() if api else None, objective=c["objective"],
        mdns=not c["no_mdns"], tls_cert=c["tls_cert"], tls_key=c["tls_key"], attention=c["runtime.attention"],
        profile_dir=Path(c["profile_dir"]) if c["profile_dir"] else None)


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
        "listening on %s://%s:%d: dashboard at /, OpenAI API at /v1, Ollama API at /api, /metrics "
        "(`meshllm status --node %s:%d`)", "https" if opts.tls_cert else "http", opts.advertise_host, node.port,
        opts.advertise_host, node.port)
    try:
        await stop.wait()
    finally:
        logging.getLogger("meshllm.node").info("leaving the mesh")
        await node.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    conf = settings(args)
    # what the rest of the command reads from args: the resolved values, whatever their source
    args.log_level, args.log_format = conf["log_level"], conf["log_format"]
    opts = build_options(args, conf)  # options refused before logging is touched: one error line, no handler
    from meshllm.obs.logs import setup_logging

    setup_logging(args.log_format, args.log_level)  # also quiets zeroconf and aiohttp
    try:
        import uvloop

        return uvloop.run(serve(opts))
    except ImportError:
        return asyncio.run(serve(opts))
