"""``meshllm demo``: the main job, end to end, on one machine.

1. It answers a prompt in one process (``meshllm generate``), streaming the text.
2. It starts a mesh of ``meshllm node`` processes on loopback (``meshllm up``) whose memory
   budgets leave the planner no room for a whole replica on every node: one node holds a full
   replica, two others hold one between them. The nodes find each other by mDNS, elect a leader,
   measure themselves, and the leader's GA gives the replicas roles (a PREFILL and a DECODER
   replica) and splits the layers of the shared one.
3. It sends the same prompt to the mesh: the prompt is prefilled on one replica, its KV cache
   handed layer by layer to the other, decoded there and streamed back — and it checks that the
   mesh answered exactly what the single process did (same seed, same tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError, UserError

DEMO_PROMPT = "class Stack:\n    def __init__(self"


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


def demo_budgets(model_dir: Path, nodes: int) -> list[int]:
    """Node 0 holds a whole replica; the others together hold one more (each about 60% of one)."""
    from meshllm.model.manifest import load_manifest
    from meshllm.planner.types import Workload
    from meshllm.runtime.runner import weight_bytes_resident

    m = load_manifest(model_dir, verify=False)
    weights = weight_bytes_resident(m, 0, m.config.num_blocks)
    wl = Workload()
    kv = sum(c.kv_bytes_per_token for c in m.costs) * wl.target_len * wl.max_batch
    full = int(weights + 2 * kv + (16 << 20))
    part = int(0.6 * weights + kv + (2 << 20))
    return [full] + [part] * (nodes - 1)


def _generate(model: str | None, prompt: str, chat: bool, args: argparse.Namespace, temperature: float) -> dict:
    import contextlib
    import io

    from meshllm.cli import main as cli_main

    argv = ["generate", "--temperature", str(temperature), "--seed", str(args.seed), "--top-p", "1.0",
            "--max-tokens", str(args.max_tokens), "--json", prompt]
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
    from meshllm.commands.up import LocalMesh, plan_lines
    from meshllm.model.manifest import load_manifest
    from meshllm.model.paths import BUNDLED_MODEL, resolve_model_dir

    if args.nodes < 1:
        raise UserError("--nodes must be at least 1")
    model_dir = resolve_model_dir(args.model)
    manifest = load_manifest(model_dir, verify=False)
    bundled = model_dir.resolve() == BUNDLED_MODEL.resolve()
    # the bundled model completes code; an imported instruct model answers in its chat template
    chat = args.chat if args.chat is not None else (bool(manifest.chat_template) and not bundled)
    prompt = args.prompt or ("What is the capital of France?" if chat else DEMO_PROMPT)
    temperature = args.temperature if args.temperature is not None else (0.7 if bundled else 0.0)
    print(f"== {manifest.name}: one process (meshllm generate, temperature {temperature}, seed {args.seed}) ==")
    print(f"> {prompt}", flush=True)
    single = _generate(str(model_dir), prompt, chat, args, temperature)
    print(single["text"], flush=True)
    if args.no_mesh:
        return 0
    budgets = demo_budgets(model_dir, args.nodes)
    print(f"\n== the same prompt through a mesh of {args.nodes} nodes on 127.0.0.1 "
          f"(budgets {', '.join(f'{b / (1 << 20):.0f} MiB' for b in budgets)}) ==", flush=True)
    # the planner is told to expect 4 requests/s, so it wants more than one replica
    conf = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="meshllm-demo-", delete=False)  # noqa: SIM115
    with conf:
        conf.write("[workload]\narrival_rate = 4.0\n")
    try:
        with LocalMesh(args.nodes, model=str(model_dir), budgets=",".join(str(b) for b in budgets),
                       extra=["--config", conf.name]) as mesh:
            view = mesh.wait_ready(args.timeout)
            print("\n".join(plan_lines(view)), flush=True)
            print(f"> {prompt}", flush=True)
            answer = _stream_from_mesh(mesh.urls[-1], prompt, chat, args, temperature)
    finally:
        os.unlink(conf.name)
    same = answer["token_ids"] == single["token_ids"]
    print("\n" + ("the mesh answered token for token what one process answered"
                  if same else "MISMATCH: the mesh answered differently from one process"), flush=True)
    return 0 if same else 1


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
