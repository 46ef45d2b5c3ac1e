"""``meshllm prompt``: ask a running mesh (any node) and stream the answer.

    meshllm prompt [--node URL] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
                   [--seed S] [--stop STR ...] [--ignore-eos] [--chat] [--json] TEXT

It talks to the node's OpenAI-compatible API (``/v1/completions``, or ``/v1/chat/completions``
with ``--chat``). The sampling defaults are ``meshllm generate``'s, and ``--json`` prints what
``meshllm generate --json`` prints, so the two can be compared token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from meshllm.errors import MeshError, UserError

DEFAULT_NODE = "http://127.0.0.1:7070"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompt", help="ask a running mesh and stream the answer",
                       description="Send a prompt to any node of a running mesh and stream the answer.")
    p.add_argument("text", metavar="TEXT", help="the prompt")
    p.add_argument("--node", default=DEFAULT_NODE, help="a node's URL or HOST:PORT (default %(default)s)")
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


def node_url(text: str) -> str:
    t = text.strip().rstrip("/")
    if not t:
        raise UserError("--node is empty")
    return t if "://" in t else f"http://{t}"


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                            "top_k": args.top_k, "seed": args.seed, "stop": args.stop or None,
                            "ignore_eos": args.ignore_eos}
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.text}]
    else:
        body["prompt"] = args.text
    return body


def _error_of(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


def api_key(path: str | None) -> str | None:
    path = path or os.environ.get("MESHLLM_API_KEY_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read --api-key-file {path}: {e.strerror}") from None


def ask(url: str, body: dict[str, Any], *, chat: bool, stream: bool, timeout: float, key: str | None = None) -> Any:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": stream}).encode(),
                                 headers=headers, method="POST")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise MeshError(f"{url} answered {e.code}: {_error_of(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MeshError(f"cannot reach {url}: {reason} (is a node running? `meshllm up` starts a mesh)") from None


def sse_events(resp: Any) -> Iterator[dict[str, Any]]:
    """The ``data:`` events of a streamed answer, parsed, up to ``data: [DONE]``. A stream that ends
    without ``[DONE]`` raises ``ConnectionError`` (the node went away mid-answer)."""
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
    raise ConnectionError("the answer's stream ended without [DONE]")


def stream_answer(url: str, body: dict[str, Any], *, chat: bool, timeout: float, key: str | None = None,
                  out: IO[str] | None = None) -> list[int]:
    """Stream one answer, writing its text to ``out`` as it comes; return its token ids. An error
    event, or a stream cut short, raises ``MeshError``."""
    ids: list[int] = []
    with ask(url, body, chat=chat, stream=True, timeout=timeout, key=key) as r:
        try:
            for ev in sse_events(r):
                if "error" in ev:
                    if out is not None:
                        out.write("\n")
                    raise MeshError(f"the mesh failed the request: {ev['error'].get('message')}")
                for c in ev.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if piece and out is not None:
                        out.write(piece)
                        out.flush()
                ids += (ev.get("meshllm") or {}).get("token_ids") or []
        except ConnectionError as e:
            raise MeshError(f"{url}: {e}") from None
    return ids


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    url = node_url(args.node)
    body = request_body(args)
    key = api_key(getattr(args, "api_key_file", None))
    if args.json:
        with ask(url, body, chat=args.chat, stream=False, timeout=args.timeout, key=key) as r:
            doc = json.loads(r.read())
        choice = doc["choices"][0]
        text = choice["message"]["content"] if args.chat else choice["text"]
        ext = doc.get("meshllm", {})
        print(json.dumps({"prompt_token_ids": ext.get("prompt_token_ids"), "token_ids": ext.get("token_ids"),
                          "text": text, "finish_reason": choice.get("finish_reason")}, ensure_ascii=False))
        return 0
    out = sys.stdout
    stream_answer(url, body, chat=args.chat, timeout=args.timeout, key=key, out=out)
    out.write("\n")
    out.flush()
    return 0
