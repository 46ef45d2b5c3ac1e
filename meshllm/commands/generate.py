"""``meshllm generate``: complete a prompt with one model on this machine, streaming the text.

    meshllm generate [--model DIR] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
                     [--seed S] [--stop STR ...] [--threads N] [--no-spin] [--attention KIND] [--json]
                     [--chat] PROMPT
"""

from __future__ import annotations

import argparse
import json
import sys

from meshllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt on this machine (streams text)",
                       description="Complete a prompt with one model on this machine, streaming the text.")
    p.add_argument("prompt", metavar="PROMPT", help="the text to complete")
    p.add_argument("--model", default=None,
                   help="model directory (default: $MESHLLM_MODEL, else the bundled models/tiny)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 disables (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest, 0 disables (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when this text appears (repeatable; not included in the output)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--no-spin", action="store_true",
                   help="let onnxruntime's threads sleep between kernels (default: they wait busy, the faster "
                        "step for one process on its machine)")
    p.add_argument("--attention", choices=("auto", "fused", "plain"), default=None,
                   help="attention kind (docs/configuration.md, runtime.attention); default: the kind a `meshllm "
                        "node` started here would choose ($MESHLLM_RUNTIME_ATTENTION or the config file; auto: "
                        "plain where serve.speculate is on, else fused), so the tokens are a mesh's of that kind")
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message in the model's chat template")
    p.add_argument("--json", action="store_true",
                   help='print {"prompt_token_ids", "token_ids", "text"} as JSON instead of streaming')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshllm.model.manifest import load_manifest
    from meshllm.model.paths import resolve_model_dir
    from meshllm.model.tokenizer import Tokenizer
    from meshllm.runtime.generate import FINISH_LENGTH, check_context, generate_stream
    from meshllm.runtime.sampling import SamplingParams

    # Cheap checks first: a typo in a flag should not wait for the model to load.
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    if args.threads is not None and args.threads <= 0:
        raise UserError(f"--threads must be positive, got {args.threads}")
    manifest = load_manifest(resolve_model_dir(args.model))
    tokenizer = Tokenizer.from_manifest(manifest)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    cfg = manifest.config
    check_context(len(prompt_ids), params.max_tokens, cfg.max_position)

    import os

    from meshllm.runtime.attention import PLAIN, choose
    from meshllm.runtime.runner import StageRunner
    from meshllm.settings import attention_setting

    setting, speculate = attention_setting(os.environ)
    kind = choose(args.attention or setting, speculate)
    runner = StageRunner(manifest, 0, cfg.num_blocks, threads=args.threads, max_seqs=1, spin=not args.no_spin,
                         one_pass=kind == PLAIN)
    events = generate_stream(runner, prompt_ids, params, tokenizer=tokenizer)
    tokens: list[int] = []
    parts: list[str] = []
    out = sys.stdout
    finish = FINISH_LENGTH
    for ev in events:
        tokens.append(ev.token_id)
        parts.append(ev.text)
        if ev.finish_reason is not None:
            finish = ev.finish_reason
        if not args.json and ev.text:
            out.write(ev.text)
            out.flush()
    if args.json:
        print(json.dumps({"prompt_token_ids": prompt_ids, "token_ids": tokens, "text": "".join(parts),
                          "finish_reason": finish, "attention": kind}, ensure_ascii=False))
    else:
        out.write("\n")
        out.flush()
    return 0
