"""``meshllm replan``: ask the mesh for a new plan now (the node forwards it to the leader)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meshllm.client import DEFAULT_NODE, fetch_json, node_url
from meshllm.errors import UserError
from meshllm.net.server import REPLAN_TOKEN_HEADER
from meshllm.node import mesh_token


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replan", help="ask the leader to plan the mesh again")
    p.add_argument("--node", default=DEFAULT_NODE, help=f"a node's HTTP address (default {DEFAULT_NODE})")
    p.add_argument("--mesh-key-file", default=None,
                   help="the mesh key, needed when the node is not on this machine")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    headers = {}
    if args.mesh_key_file:
        try:
            key = Path(args.mesh_key_file).read_bytes().strip()
        except OSError as e:
            raise UserError(f"cannot read --mesh-key-file {args.mesh_key_file}: {e.strerror}") from None
        headers[REPLAN_TOKEN_HEADER] = mesh_token(key, "operator replan")
    out = fetch_json(node_url(args.node) + "/v1/replan", method="POST", headers=headers)
    print(json.dumps(out))
    return 0 if out.get("accepted") else 1
