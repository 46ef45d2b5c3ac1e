"""``meshllm demo``: the main job, end to end, on one machine.

1. It answers a prompt in one process (``meshllm generate``), streaming the text.
2. It starts a mesh of ``meshllm node`` processes on loopback (``meshllm up``) whose memory
   budgets leave the planner no room for a whole replica on every node: one node holds a full
   replica, two others hold one between them. It tells the planner to expect a stream of chat
   requests, short prompts and longer answers (``DEMO_WORKLOAD``). The nodes find each other by mDNS, elect a
   leader, measure themselves, and the leader's GA groups them into replicas and gives them
   roles: for that stream a PREFILL and a DECODER replica wait less than BOTH replicas
   (docs/planner.md, "The demo's mesh"), and nothing forces them.
3. It sends the same prompt to the mesh: the prompt is prefilled on one replica, its KV cache
   handed layer by layer to the other, decoded there and streamed back. It prints which
   replica prefilled, which decoded and the KV bytes handed over (the nodes' ``/metrics``
   counters), and checks that the mesh answered exactly what the single process did (same
   seed, same tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshllm.errors import MeshError, UserError

if TYPE_CHECKING:
    from meshllm.planner.types import Workload

DEMO_PROMPT = "class Stack:\n    def __init__(self"
# a question SmolLM2 answers the same in every int4 mode (its exact answer to "What is the capital
# of France?" hangs on a 0.08-logit near-tie in the first token: docs/models.md)
DEMO_QUESTION = "What is the capital city of Japan?"
# What the planner is told to expect: a stream of chat requests (0.4 a second, Poisson) with short
# prompts (32 tokens) and longer answers (96), well inside what three nodes sharing one machine can
# serve. A BOTH replica's prompts wait behind its decode micro-batches; a PREFILL replica's never
# do. With the BOTH replicas pooled as the router pools them, the planner finds a PREFILL and a
# DECODER replica wait less from 0.05 to 0.6 requests/s with SmolLM2 profiles measured on a 2-core
# machine, and the simulator agrees from 0.3 to 0.5 (docs/planner.md, "The demo's mesh"). For long
# prompts two BOTH replicas wait less: there the planner does not split. Nothing forces the roles.
DEMO_WORKLOAD = {"arrival_rate": 0.4, "input_len": 32, "output_len": 96}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="answer a prompt in one process, then through a local mesh, and compare")
    p.add_argument("--model", default=None, help="model directory (default: $MESHLLM_MODEL or the bundled one)")
    p.add_argument("--prompt", default=None, help="prompt (default: a chat question for an instruct model, "
                                                  "else code to complete)")
    p.add_argument("--chat", action="store_true", default=None, help="use the model's chat template")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0.7 for the bundled 5M model, which loops when "
                        "greedy; 0 for others)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (the demo is reproducible)")
    p.add_argument("--nodes", type=int, default=3, help="mesh nodes to start on loopback (default %(default)s)")
    p.add_argument("--no-mesh", action="store_true", help="only generate; start no mesh")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the mesh to be ready")
    p.set_defaults(func=run)


def demo_workload() -> Workload:
    """The workload the demo tells its planner to expect: a steady stream of chat requests whose
    answers are three times as long as their prompts (see ``DEMO_WORKLOAD``)."""
    from meshllm.planner.types import LengthDist, Workload

    return Workload(DEMO_WORKLOAD["arrival_rate"], LengthDist.fixed(int(DEMO_WORKLOAD["input_len"])),
                    LengthDist.fixed(int(DEMO_WORKLOAD["output_len"])))


def demo_budgets(model_dir: Path, nodes: int) -> list[int]:
    """Node 0 holds a whole replica; the others together hold one more (each about 60% of one)."""
    from meshllm.model.manifest import load_manifest
    from meshllm.runtime.runner import weight_bytes_resident

    m = load_manifest(model_dir, verify=False)
    weights = weight_bytes_resident(m, 0, m.config.num_blocks)
    wl = demo_workload()
    kv = sum(c.kv_bytes_per_token for c in m.costs) * wl.target_len * wl.max_batch
    full = int(weights + 2 * kv + (16 << 20))
    part = int(0.6 * weights + kv + (2 << 20))
    return [full] + [part] * (nodes - 1)


def _generate(model: str | None, prompt: str, chat: bool, args: argparse.Namespace, temperature: float) -> dict:
    import contextlib
    import io

    from meshllm.cli import main as cli_main

    argv = ["generate", "--temperature", str(temperature), "--seed", str(args.seed), "--top-p", "1.0",
            "--max-tokens", str(args.max_tokens), "--attention", args.attention_kind, "--json", prompt]
    if chat:
        argv.insert(1, "--chat")
    if model:
        argv[1:1] = ["--model", model]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(argv)
    if rc:
        raise MeshError(f"generate failed with exit code {rc}")
    return dict(json.loads(buf.getvalue()))


def run(args: argparse.Namespace) -> int:
    from meshllm.commands.up import LocalMesh, get_json, plan_lines
    from meshllm.model.manifest import load_manifest
    from meshllm.model.paths import BUNDLED_MODEL, resolve_model_dir
    from meshllm.runtime.attention import choose
    from meshllm.settings import attention_setting

    if args.nodes < 1:
        raise UserError("--nodes must be at least 1")
    model_dir = resolve_model_dir(args.model)
    manifest = load_manifest(model_dir, verify=False)
    bundled = model_dir.resolve() == BUNDLED_MODEL.resolve()
    # the bundled model completes code; an imported instruct model answers in its chat template
    chat = args.chat if args.chat is not None else (bool(manifest.chat_template) and not bundled)
    prompt = args.prompt or (DEMO_QUESTION if chat else DEMO_PROMPT)
    temperature = args.temperature if args.temperature is not None else (0.7 if bundled else 0.0)
    # the attention kind of the mesh below (its nodes read this environment), pinned on both sides
    args.attention_kind = choose(*attention_setting(os.environ))
    print(f"== {manifest.name}: one process (meshllm generate, temperature {temperature}, seed {args.seed}, "
          f"{args.attention_kind} attention) ==")
    print(f"> {prompt}", flush=True)
    single = _generate(str(model_dir), prompt, chat, args, temperature)
    print(single["text"], flush=True)
    if args.no_mesh:
        return 0
    budgets = demo_budgets(model_dir, args.nodes)
    wl = DEMO_WORKLOAD
    print(f"\n== the same prompt through a mesh of {args.nodes} nodes on 127.0.0.1 "
          f"(budgets {', '.join(f'{b / (1 << 20):.0f} MiB' for b in budgets)}) ==", flush=True)
    print(f"the planner is told to expect a stream of {wl['arrival_rate']:g} requests/s, prompts of "
          f"{wl['input_len']} tokens and answers of {wl['output_len']}", flush=True)
    conf = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="meshllm-demo-", delete=False)  # noqa: SIM115
    with conf:
        conf.write(f'[runtime]\nattention = "{args.attention_kind}"\n'
                   "[workload]\n" + "".join(f"{k} = {v}\n" for k, v in wl.items()))
    try:
        with LocalMesh(args.nodes, model=str(model_dir), budgets=",".join(str(b) for b in budgets),
                       extra=["--config", conf.name]) as mesh:
            view = mesh.wait_ready(args.timeout)
            print("\n".join(plan_lines(view)), flush=True)
            print(predicted_line(view), flush=True)
            before = [node_counters(u) for u in mesh.urls]
            print(f"> {prompt}", flush=True)
            answer = _stream_from_mesh(mesh.urls[-1], prompt, chat, args, temperature)
            after = [node_counters(u) for u in mesh.urls]
            ids = [((get_json(u + "/v1/mesh") or {}).get("node") or {}).get("id") for u in mesh.urls]
    finally:
        os.unlink(conf.name)
    print("\n" + "\n".join(served_lines(view, ids, before, after)), flush=True)
    same = answer["token_ids"] == single["token_ids"]
    print("\n" + ("the mesh answered token for token what one process answered"
                  if same else "MISMATCH: the mesh answered differently from one process"), flush=True)
    return 0 if same else 1


# counters each node's /metrics exposes (docs/observability.md): prompt tokens its stages
# prefilled, decode steps it ran as a decoder's stage 0, KV bytes it sent and received
PREFILL_TOKENS = "meshllm_stage_prefill_tokens_total"
DECODE_STEPS = "meshllm_stage_decode_steps_total"
KV_OUT = "meshllm_kv_transfer_bytes_total{direction=out}"
KV_IN = "meshllm_kv_transfer_bytes_total{direction=in}"


def node_counters(url: str) -> dict[str, float]:
    """A node's counters from ``GET /metrics`` as ``name{label=value}`` -> value ({} if it does
    not answer)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5.0) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[smp.name + (f"{{{labels}}}" if labels else "")] = float(smp.value)
    return out


def predicted_line(view: dict[str, Any]) -> str:
    """What the planner predicted for the plan it chose, under the stated workload."""
    pr = (view.get("plan") or {}).get("predicted") or {}
    wait, ttft = pr.get("mean_wait_s"), pr.get("mean_ttft_s")
    if wait is None or ttft is None:
        return "  (the plan carries no predicted figures)"
    return f"  predicted for that stream: mean wait {wait * 1e3:.2f} ms, mean time to first token {ttft * 1e3:.0f} ms"


def served_lines(view: dict[str, Any], ids: list[str | None], before: list[dict[str, float]],
                 after: list[dict[str, float]]) -> list[str]:
    """Which replica prefilled the prompt, which decoded it, and the KV bytes handed over: the
    nodes' counters after the request minus before (the demo's mesh serves nothing else)."""
    names = {m["id"]: m.get("name") or m["id"][:8] for m in view.get("members", [])}
    delta = {nid: {k: v - b.get(k, 0.0) for k, v in a.items()}
             for nid, b, a in zip(ids, before, after, strict=True) if nid}
    missing = [k for k in (PREFILL_TOKENS, DECODE_STEPS, KV_OUT) if not any(k in d for d in delta.values())]
    lines = ["how the mesh served it (each node's /metrics, after the answer minus before):"]
    for r in (view.get("plan") or {}).get("replicas", []):
        nodes = [s["node"] for s in r["stages"]]
        d = [delta.get(n, {}) for n in nodes]
        pre = max((x.get(PREFILL_TOKENS, 0.0) for x in d), default=0.0)
        dec = delta.get(nodes[0], {}).get(DECODE_STEPS, 0.0) if nodes else 0.0
        kv_out = sum(x.get(KV_OUT, 0.0) for x in d)
        kv_in = sum(x.get(KV_IN, 0.0) for x in d)
        did = ([f"prefilled the prompt ({pre:.0f} tokens)"] if pre else []) + \
              ([f"decoded ({dec:.0f} steps)"] if dec else []) + \
              ([f"sent {kv_out / 1024:.1f} KiB of KV"] if kv_out else []) + \
              ([f"received {kv_in / 1024:.1f} KiB of KV"] if kv_in else [])
        who = ", ".join(names.get(n, n[:8]) for n in nodes)
        lines.append(f"  replica {r['id']} {r['role'].upper():8s} ({who}): {'; '.join(did) or 'idle'}")
    if missing:
        lines.append(f"  (the nodes' /metrics lack {', '.join(missing)}: the lines above are incomplete)")
    return lines


def _stream_from_mesh(url: str, prompt: str, chat: bool, args: argparse.Namespace, temperature: float) -> dict:
    """Stream the answer to stdout; return its token ids."""
    from meshllm.client import stream_answer

    body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": temperature, "top_p": 1.0,
                            "seed": args.seed}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return {"token_ids": stream_answer(url, body, chat=chat, timeout=300.0, out=sys.stdout)}
