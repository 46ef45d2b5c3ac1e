"""``meshllm status``: the mesh as one node sees it (``GET /v1/mesh``), as a table or JSON."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from meshllm.client import DEFAULT_NODE, NodeUnreachable, fetch_json, node_url, ssl_context
from meshllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the mesh: members, leader, plan, readiness")
    p.add_argument("--node", default=DEFAULT_NODE,
                   help=f"a node's URL (http:// or https://) or HOST:PORT (default {DEFAULT_NODE})")
    p.add_argument("--cacert", default=None, metavar="FILE",
                   help="CA certificate(s) to verify an https:// node with (default: the system's)")
    p.add_argument("--json", action="store_true", help="print the raw /v1/mesh JSON")
    p.add_argument("--wait-ready", type=float, default=None, metavar="SECONDS",
                   help="wait until the mesh has an active plan on live nodes; exit 1 on timeout")
    p.set_defaults(func=run)


def _ms(x: Any) -> str:
    return "-" if x is None else f"{1000 * float(x):.2f}"


def _gb(x: Any) -> str:
    return "-" if x is None else f"{int(x) / (1 << 30):.2f}G"


def format_table(view: dict[str, Any]) -> str:
    me = view.get("node", {})
    lines = []
    leader = view.get("leader")
    names = {m["id"]: m.get("name") or m["id"][:8] for m in view.get("members", [])}
    lines.append(f"node {me.get('name')} ({str(me.get('id', ''))[:8]}) at {me.get('addr')}  "
                 f"model {str(me.get('model_id', ''))[:12]}  mesh {str(me.get('mesh_id', ''))[:12]}")
    lines.append(f"term {view.get('term')}  leader {names.get(leader, leader) if leader else '(none)'}  "
                 f"epoch {view.get('epoch')}  {'READY' if view.get('ready') else 'not ready'}"
                 + (f"  ({view.get('why_not_ready')})" if not view.get("ready") and view.get("why_not_ready")
                    else ""))
    lines.append("")
    hdr = f"{'NAME':<14} {'ID':<9} {'ADDR':<21} {'STATE':<8} {'ROLE':<8} {'THR':>3} {'SLOW':>5} " \
          f"{'MEMORY':>8} {'DECODE ms/tok':>13} {'LOADED':>9}"
    lines.append(hdr)
    for m in view.get("members", []):
        prof = m.get("profile") or {}
        loaded = m.get("loaded")
        lines.append(
            f"{str(m.get('name') or '-')[:14]:<14} {m['id'][:8]:<9} {str(m.get('addr') or '-')[:21]:<21} "
            f"{m.get('state', '?'):<8} {('leader' if m['id'] == leader else '')[:8]:<8} "
            f"{prof.get('threads', '-')!s:>3} {prof.get('slowdown', '-')!s:>5} {_gb(prof.get('memory_bytes')):>8} "
            f"{_ms(prof.get('decode_s_per_token')):>13} "
            f"{(f'[{loaded[0]},{loaded[1]})' if loaded else '-'):>9}")
    plan = view.get("plan")
    lines.append("")
    if not plan:
        lines.append("no active plan")
    else:
        pred = plan.get("predicted") or {}
        figs = ", ".join(f"{k}={v:.4g}" for k, v in pred.items() if isinstance(v, int | float)
                         and not isinstance(v, bool))
        lines.append(f"plan epoch {plan.get('epoch')} ({plan.get('strategy') or 'unnamed'}): {figs or 'no predictions'}")
        for r in plan.get("replicas", []):
            stages = " -> ".join(f"{names.get(s['node'], s['node'][:8])} [{s['layers'][0]},{s['layers'][1]})"
                                 for s in r.get("stages", []))
            lines.append(f"  replica {r.get('id')} {str(r.get('role', '')).upper():<8} {stages}")
    pending = view.get("pending_epoch")
    if pending:
        lines.append(f"pending plan epoch {pending} (waiting for acknowledgements)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url = node_url(args.node) + "/v1/mesh"
    context = ssl_context(getattr(args, "cacert", None))
    if args.wait_ready is not None:
        if args.wait_ready < 0:
            raise UserError("--wait-ready must be >= 0 seconds")
        deadline = time.monotonic() + args.wait_ready
        view: dict[str, Any] = {}
        while True:
            try:
                view = fetch_json(url, timeout=2.0, context=context)
                if view.get("ready"):
                    break
            except NodeUnreachable:
                if time.monotonic() >= deadline:
                    raise
            if time.monotonic() >= deadline:
                print(json.dumps(view, indent=1) if args.json else format_table(view))
                print(f"meshllm status: not ready after {args.wait_ready:g} s")
                return 1
            time.sleep(0.5)
    else:
        view = fetch_json(url, context=context)
    print(json.dumps(view, indent=1) if args.json else format_table(view))
    return 0
