"""What a node says about itself over HTTP: ``GET /v1/profile`` and ``GET /v1/mesh``.

Read-only snapshots of a running node as JSON-able dicts, read through its ports
(``meshllm.ports.NodePorts``); nothing here changes the node.
"""

from __future__ import annotations

import contextlib
from typing import Any

from meshllm.errors import PlanError
from meshllm.net.base import PROTOCOL_VERSION
from meshllm.planner.types import Plan
from meshllm.ports import NodePorts


def member_names(ports: NodePorts) -> dict[str, str]:
    """Node id -> display name, for every member this node knows a name of (itself included)."""
    me = ports.identity
    names: dict[str, str] = {me.node_id: me.name}
    control = ports.plans.control()
    if control is not None:
        for nid, m in control.membership.members.items():
            if m.name:
                names[nid] = m.name
    return names


def profile_view(ports: NodePorts) -> dict[str, Any]:
    """``GET /v1/profile``: who the node is, its measured profile and its link measurements."""
    me = ports.identity
    return {"node_id": me.node_id, "name": me.name, "model_id": me.manifest.model_id,
            "model": me.manifest.name, "mesh_id": me.mesh_id, "proto": PROTOCOL_VERSION,
            "addr": me.addr(), "profile": ports.profiles.own(),
            "profile_progress": ports.profiles.progress(), "links": dict(ports.peers.link_stats()),
            "peers": ports.peers.linked_addresses()}


def mesh_view(ports: NodePorts) -> dict[str, Any]:
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
         "serving": {...} | null}                             # the serving layer's view (ports.serving_view)
    """
    me = ports.identity
    c = ports.plans.control()
    if c is None:
        return {"node": {"id": me.node_id, "name": me.name}, "ready": False,
                "why_not_ready": "starting"}
    st = c.status()
    names = member_names(ports)
    own_profile = ports.profiles.own()
    known = ports.peers.known()
    link_stats = ports.peers.link_stats()
    transport = ports.peers.transport()
    linked = set(transport.peers()) if transport is not None else set()
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
        info = known.get(nid)
        addr: str | None
        if nid == me.node_id:
            prof = own_profile
            addr = me.addr()
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
                        "linked": nid == me.node_id or nid in linked,
                        "loaded": plan_ranges.get(nid), "profile": summary,
                        "link": link_stats.get(nid)})
    alive = {m["id"] for m in members if m["state"] == "alive"}
    why = ""
    if c.leader is None:
        why = "no leader yet"
    elif not plan:
        why = "no active plan yet" + ("" if own_profile else f" (profiling: {ports.profiles.progress()})")
    elif not set(plan_ranges) <= alive:
        why = "a node of the active plan is not alive"
    stats = ports.stats()
    return {
        "node": {"id": me.node_id, "name": me.name, "addr": me.addr(),
                 "model": me.manifest.name, "model_id": me.manifest.model_id, "mesh_id": me.mesh_id,
                 "proto": PROTOCOL_VERSION, "role": st["role"]},
        "term": st["term"], "leader": st["leader"], "leader_name": names.get(st["leader"] or ""),
        "epoch": st["active_epoch"], "plan": plan, "members": members,
        "pending_epoch": st["planning"]["pending_epoch"], "planning": st["planning"],
        "loaded_epochs": ports.stages.epochs(), "draining": st["draining"],
        "ready": not why, "why_not_ready": why or None,
        "security": {"mesh": "keyed" if me.mesh_keyed else "open", "api_key_required": me.api_key_required},
        "stats": {"bad_frames": stats.bad_frames, "handler_errors": stats.handler_errors,
                  "rejected_plans": stats.rejected_plans, "links": len(linked),
                  "refused_links": getattr(transport, "rejected", 0)},
        "serving": ports.serving_view(),
    }
