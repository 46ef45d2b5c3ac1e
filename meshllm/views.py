"""What a node says about itself over HTTP: ``GET /v1/profile`` and ``GET /v1/mesh``.

Read-only snapshots of a running ``Node`` as JSON-able dicts; nothing here changes the node.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from meshllm.errors import PlanError
from meshllm.net.base import DEFAULT_MESH_KEY, PROTOCOL_VERSION
from meshllm.planner.types import Plan

if TYPE_CHECKING:
    from meshllm.node import Node


def member_names(node: Node) -> dict[str, str]:
    """Node id -> display name, for every member this node knows a name of (itself included)."""
    names: dict[str, str] = {node.node_id: node.name}
    if node.control is not None:
        for nid, m in node.control.membership.members.items():
            if m.name:
                names[nid] = m.name
    return names


def profile_view(node: Node) -> dict[str, Any]:
    """``GET /v1/profile``: who the node is, its measured profile and its link measurements."""
    return {"node_id": node.node_id, "name": node.name, "model_id": node.manifest.model_id,
            "model": node.manifest.name, "mesh_id": node.mesh_id, "proto": PROTOCOL_VERSION,
            "addr": f"{node.opts.advertise_host}:{node.port}",
            "profile": node.profile.to_dict() if node.profile else None,
            "profile_progress": node.profile_progress, "links": dict(node.link_stats),
            "peers": node.dialer.linked_addresses()}


def mesh_view(node: Node) -> dict[str, Any]:
    """``GET /v1/mesh``::

        {"node": {id, name, addr, model, model_id, mesh_id, proto, role},
         "term", "leader", "leader_name", "epoch",            # epoch: the active plan's (0: none)
         "plan": Plan.to_dict() + {"workload"} | null,        # replicas, roles, [first, end), predicted
         "members": [{id, name, addr, state (alive|suspect|dead|left), priority, epoch, self, leader,
                      linked, loaded: [first, end] | null, link: {mbps, rtt_ms} | null,
                      profile: {threads, slowdown, memory_bytes, tflops, mem_bw_gbs,
                                prefill_s_per_token[], decode_s_per_step[], decode_s_per_token} | null}],
         "pending_epoch", "planning", "loaded_epochs", "draining",
         "ready", "why_not_ready",                            # ready: a leader, an active plan, its nodes alive
         "security": {mesh: "open" | "keyed", api_key_required},
         "stats": {bad_frames, handler_errors, rejected_plans, links, refused_links},
         "serving": {...} | null}                             # the serving layer's view (node.serving_view)
    """
    c = node.control
    if c is None:
        return {"node": {"id": node.node_id, "name": node.name}, "ready": False,
                "why_not_ready": "starting"}
    st = c.status()
    names = member_names(node)
    members = []
    plan = c.active_plan
    if plan is not None:
        plan = {**plan, "epoch": st["active_epoch"]}  # the planner leaves numbering to the leader
    plan_ranges: dict[str, list[int]] = {}
    if plan:
        with contextlib.suppress(PlanError):
            for r in Plan.from_dict(plan).replicas:
                for s in r.stages:
                    plan_ranges[s.node] = [s.first, s.end]
    for m in st["members"]:
        nid = m["node"]
        info = node.peers.get(nid)
        addr: str | None
        if nid == node.node_id:
            prof = node.profile.to_dict() if node.profile else None
            addr = f"{node.opts.advertise_host}:{node.port}"
        else:
            prof = (info.profile or {}).get("profile") if info else None
            prof = prof or c.profiles.get(nid)
            addr = f"{info.addr[0]}:{info.addr[1]}" if info and info.addr else None
        summary = None
        if prof:
            summary = {k: prof.get(k) for k in ("threads", "slowdown", "memory_bytes", "tflops",
                                                "mem_bw_gbs", "prefill_s_per_token", "decode_s_per_step")}
            summary["decode_s_per_token"] = float(sum(prof.get("decode_s_per_step") or []))
        members.append({"id": nid, "name": names.get(nid, m.get("name") or ""), "addr": addr,
                        "state": m["state"], "priority": m["priority"], "epoch": m["epoch"],
                        "self": m["self"], "leader": nid == c.leader,
                        "linked": nid == node.node_id or (node.transport is not None
                                                          and nid in node.transport.peers()),
                        "loaded": plan_ranges.get(nid), "profile": summary,
                        "link": node.link_stats.get(nid)})
    alive = {m["id"] for m in members if m["state"] == "alive"}
    why = ""
    if c.leader is None:
        why = "no leader yet"
    elif not plan:
        why = "no active plan yet" + ("" if node.profile else f" (profiling: {node.profile_progress})")
    elif not set(plan_ranges) <= alive:
        why = "a node of the active plan is not alive"
    serving = node.serving_view() if node.serving_view is not None else None
    return {
        "node": {"id": node.node_id, "name": node.name, "addr": f"{node.opts.advertise_host}:{node.port}",
                 "model": node.manifest.name, "model_id": node.manifest.model_id, "mesh_id": node.mesh_id,
                 "proto": PROTOCOL_VERSION, "role": st["role"]},
        "term": st["term"], "leader": st["leader"], "leader_name": names.get(st["leader"] or ""),
        "epoch": st["active_epoch"], "plan": plan, "members": members,
        "pending_epoch": st["planning"]["pending_epoch"], "planning": st["planning"],
        "loaded_epochs": node.stages.epochs(), "draining": st["draining"],
        "ready": not why, "why_not_ready": why or None,
        "security": {"mesh": "open" if node.opts.mesh_key == DEFAULT_MESH_KEY else "keyed",
                     "api_key_required": bool(node.opts.api_key)},
        "stats": {"bad_frames": node.bad_frames, "handler_errors": node.handler_errors,
                  "rejected_plans": node.rejected_plans,
                  "links": len(node.transport.peers()) if node.transport else 0,
                  "refused_links": getattr(node.transport, "rejected", 0)},
        "serving": serving,
    }
