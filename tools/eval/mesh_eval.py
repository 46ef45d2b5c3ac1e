"""lm-evaluation-harness against a mesh of node processes on loopback, start to finish.

Starts ``--nodes`` node processes (``meshllm up``'s ``LocalMesh``), waits for an active plan,
runs ``lm_eval --model local-completions`` on ``--tasks`` (default: the local multiple-choice
task in this directory) against the first node, recomputes every logged log-likelihood in one
process (``check_samples.py``), then checks that every node holds nothing (``/v1/mesh``) and
logged no error, and stops the nodes. Prints lm-eval's table, then one JSON object; exits 1 when
a check fails. Needs the ``eval`` extra (``pip install -e '.[eval]'``). Run from the repository
root:

    python tools/eval/mesh_eval.py --nodes 2 --budgets 140MiB,140MiB --model "$(meshllm fetch smollm2 --quiet)"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the source tree's meshllm, when run as a script

from meshllm.commands.up import LocalMesh, get_json, plan_lines  # noqa: E402
from meshllm.model.manifest import load_manifest  # noqa: E402
from meshllm.model.paths import resolve_model_dir  # noqa: E402

LOG_LEVEL = re.compile(r"^\S+ \S+ ([A-Z]) ")  # the nodes' text log: date, time, level letter


def held(url: str) -> dict[str, Any]:
    """What a node's serving view says it holds for requests (all 0 when idle)."""
    s = (get_json(url + "/v1/mesh") or {}).get("serving") or {}
    entry, stage = s.get("entry") or {}, s.get("stage") or {}
    return {"requests": entry.get("requests"), "held": stage.get("held"), "stage_requests": stage.get("requests"),
            "queued_prefill_tokens": stage.get("queued_prefill_tokens"), "queued_jobs": stage.get("queued_jobs")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    ap.add_argument("--budgets", default=None, help="memory budget per node, as `meshllm up --budgets`")
    ap.add_argument("--tasks", default="meshllm_mc")
    ap.add_argument("--num-concurrent", type=int, default=1)
    ap.add_argument("--out", default=None, help="lm-eval's output directory (default: a temporary one)")
    args = ap.parse_args(argv)
    model = resolve_model_dir(args.model)
    name = load_manifest(model, verify=False).name
    out = Path(args.out or tempfile.mkdtemp(prefix="meshllm-eval-"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with LocalMesh(args.nodes, model=str(model), budgets=args.budgets, extra=["--log-format", "text"]) as mesh:
        view = mesh.wait_ready(180)
        print("\n".join(plan_lines(view)), flush=True)
        model_args = (f"model={name},base_url={mesh.urls[0]}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={model},num_concurrent={args.num_concurrent}")
        t0 = time.monotonic()
        lm = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                             model_args, "--tasks", args.tasks, "--include_path", str(HERE), "--output_path",
                             str(out), "--log_samples"], env=env, capture_output=True, text=True)
        eval_s = time.monotonic() - t0
        table = [ln for ln in lm.stdout.splitlines() if ln.startswith(("|", "local-completions"))]
        print("\n".join(table) or lm.stdout[-3000:] + lm.stderr[-3000:], flush=True)
        samples = sorted(str(p) for p in out.glob("*/samples_*.jsonl"))
        check = subprocess.run([sys.executable, str(HERE / "check_samples.py"), "--model", str(model), *samples],
                               capture_output=True, text=True) if samples else None
        idle = [held(u) for u in mesh.urls]
        mesh.check_alive()
        errors = [ln for i in range(args.nodes)
                  for ln in (mesh.dir / f"node-{i}.log").read_text(errors="replace").splitlines()
                  if "Traceback" in ln or ((m := LOG_LEVEL.match(ln)) and m.group(1) in ("E", "C"))]
    results: dict[str, Any] = {}
    for p in out.glob("*/results_*.json"):
        results.update(json.loads(p.read_text())["results"])
    one_process = json.loads(check.stdout) if check is not None and check.returncode in (0, 1) else None
    report = {"lm_eval_rc": lm.returncode, "eval_s": round(eval_s, 1), "results": results,
              "one_process": one_process, "held_after": idle, "log_errors": errors[:5], "out": str(out)}
    print(json.dumps(report))
    ok = (lm.returncode == 0 and one_process is not None and one_process["ok"] and not errors
          and all(v == 0 for h in idle for v in h.values()))  # None: the node did not answer
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
