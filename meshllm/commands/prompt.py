"""``meshllm prompt``: ask a running mesh (any node) and stream the answer.

    meshllm prompt [--node URL] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
                   [--seed S] [--stop STR ...] [--ignore-eos] [--chat] [--json] [--cacert FILE] TEXT

It talks to the node's OpenAI-compatible API (``/v1/completions``, or ``/v1/chat/completions``
with ``--chat``). The sampling defaults are ``meshllm generate``'s, and ``--json`` prints what
``meshllm generate --json`` prints, so the two can be compared token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshllm.client import DEFAULT_NODE, api_key, ask, node_url, ssl_context, stream_answer
from meshllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompt", help="ask a running mesh and stream the answer",
                       description="Send a prompt to any node of a running mesh and stream the answer.")
    p.add_argument("text", metavar="TEXT", help="the prompt")
    p.add_argument("--node", default=DEFAULT_NODE,
                   help="a node's URL (http:// or https://) or HOST:PORT (default %(default)s)")
    p.add_argument("--cacert", default=None, metavar="FILE",
                   help="CA certificate(s) to verify an https:// node with (default: the system's)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest, 0 disables")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--chat", action="store_true", help="send TEXT as a user message in the chat template")
    p.add_argument("--json", action="store_true",
                   help='print {"prompt_token_ids", "token_ids", "text", "finish_reason"} as JSON')
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    p.add_argument("--api-key-file", default=None,
                   help="file with the node's API key (default: $MESHLLM_API_KEY_FILE; none: send no key)")
    p.set_defaults(func=run)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                            "top_k": args.top_k, "seed": args.seed, "stop": args.stop or None,
                            "ignore_eos": args.ignore_eos}
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.text}]
    else:
        body["prompt"] = args.text
    return body


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    url = node_url(args.node)
    body = request_body(args)
    key = api_key(getattr(args, "api_key_file", None))
    context = ssl_context(getattr(args, "cacert", None))
    if args.json:
        with ask(url, body, chat=args.chat, stream=False, timeout=args.timeout, key=key, context=context) as r:
            doc = json.loads(r.read())
        choice = doc["choices"][0]
        text = choice["message"]["content"] if args.chat else choice["text"]
        ext = doc.get("meshllm", {})
        print(json.dumps({"prompt_token_ids": ext.get("prompt_token_ids"), "token_ids": ext.get("token_ids"),
                          "text": text, "finish_reason": choice.get("finish_reason")}, ensure_ascii=False))
        return 0
    out = sys.stdout
    stream_answer(url, body, chat=args.chat, timeout=args.timeout, key=key, out=out, context=context)
    out.write("\n")
    out.flush()
    return 0
