"""Talking to a running node over its HTTP API: what ``meshllm prompt``, ``meshllm status``, ``meshllm
up`` and the benchmarks share.

Blocking helpers on ``urllib`` (the CLI's), and one asyncio streaming call on aiohttp (the load
benchmark's, which keeps many requests open at once). ``https://`` URLs are verified against the
CA file given (``--cacert``), or the system's CAs without one.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from meshllm.errors import MeshError, UserError

DEFAULT_NODE = "http://127.0.0.1:7070"


class NodeUnreachable(MeshError):
    """The node's HTTP API did not answer."""


def node_url(text: str) -> str:
    """A node's base URL from a URL or HOST:PORT (``http://`` unless a scheme is given)."""
    t = text.strip().rstrip("/")
    if not t:
        raise UserError("--node is empty")
    if "://" not in t:
        return f"http://{t}"
    scheme = t.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise UserError(f"--node {text!r}: the scheme must be http or https")
    return t


def ssl_context(cacert: str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """The context that verifies a node's certificate: against ``cacert`` when given, else ``None``
    (urllib and aiohttp then verify against the system's CAs)."""
    if cacert is None:
        return None
    path = Path(cacert)
    try:
        return ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise UserError(f"--cacert {path}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as e:
        raise UserError(f"--cacert {path}: not a CA certificate file ({e})") from None


def api_key(path: str | None) -> str | None:
    """The API key from ``path``, else from ``$MESHLLM_API_KEY_FILE``; ``None`` sends no key."""
    path = path or os.environ.get("MESHLLM_API_KEY_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read --api-key-file {path}: {e.strerror}") from None


def _error_of(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", e)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"{reason.verify_message or reason} (give the node's CA with --cacert FILE)"
    return str(reason)


def get_json(url: str, timeout: float = 2.0, *, context: ssl.SSLContext | None = None) -> Any:
    """``GET url`` as JSON, or ``None`` when the node does not answer (for polling)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return json.loads(r.read())
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return None


def get_text(url: str, timeout: float = 2.0, *, context: ssl.SSLContext | None = None) -> str | None:
    """``GET url`` as text (``/metrics``), or ``None`` when the node does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return str(r.read().decode())
    except (OSError, urllib.error.URLError, UnicodeDecodeError):
        return None


def fetch_json(url: str, *, method: str = "GET", timeout: float = 5.0, headers: dict[str, str] | None = None,
               context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """``url`` as JSON; an HTTP error or no answer raises ``NodeUnreachable`` with the reason."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise NodeUnreachable(f"{url}: HTTP {e.code} {detail}".rstrip()) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise NodeUnreachable(f"cannot reach {url}: {_reason(e)} (is `meshllm node` running there?)") from None


def ask(url: str, body: dict[str, Any], *, chat: bool, stream: bool, timeout: float, key: str | None = None,
        context: ssl.SSLContext | None = None) -> Any:
    """POST a completion (``/v1/completions``, or ``/v1/chat/completions`` with ``chat``); the open
    response. An HTTP error or no answer raises ``MeshError`` with the node's reason."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": stream}).encode(),
                                 headers=headers, method="POST")
    try:
        return urllib.request.urlopen(req, timeout=timeout, context=context)
    except urllib.error.HTTPError as e:
        raise MeshError(f"{url} answered {e.code}: {_error_of(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MeshError(f"cannot reach {url}: {_reason(e)} (is a node running? `meshllm up` starts a mesh)") from None


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
                  out: IO[str] | None = None, context: ssl.SSLContext | None = None) -> list[int]:
    """Stream one answer, writing its text to ``out`` as it comes; return its token ids. An error
    event, or a stream cut short, raises ``MeshError``."""
    ids: list[int] = []
    with ask(url, body, chat=chat, stream=True, timeout=timeout, key=key, context=context) as r:
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


def metric_values(text: str) -> dict[str, float]:
    """A Prometheus text exposition as ``{"name{labels}": value}`` (samples without labels under
    their bare name)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


# --- timed streaming (asyncio) -----------------------------------------------------------------

@dataclass
class Timed:
    """One streamed request as a client saw it: when it was sent, when each token arrived
    (``time.perf_counter``), and how it ended: ``ok``, ``429`` (refused for load), ``error``."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    outcome: str = "ok"
    detail: str = ""
    status: int = 200

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


async def stream_timed(session: Any, url: str, body: dict[str, Any], *, limit_s: float, key: str | None = None,
                       context: ssl.SSLContext | None = None) -> Timed:
    """POST ``body`` to ``url``'s ``/v1/completions`` as a stream on an ``aiohttp.ClientSession``
    and time its tokens, giving up after ``limit_s``. Never raises for the request's own failure: the outcome says it."""
    import asyncio

    import aiohttp

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    res = Timed(time.perf_counter())
    try:
        async with asyncio.timeout(limit_s):
            async with session.post(url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                                    ssl=context if context is not None else True) as r:
                res.status = r.status
                if r.status != 200:
                    res.outcome = "429" if r.status == 429 else "error"
                    res.detail = _error_of(await r.read())
                    return res
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return res
                    ev = json.loads(data)
                    if "error" in ev:
                        res.outcome, res.detail = "error", str(ev["error"].get("message"))
                        return res
                    now = time.perf_counter()
                    res.token_times += [now] * len((ev.get("meshllm") or {}).get("token_ids") or [])
                res.outcome, res.detail = "error", "the stream ended without [DONE]"
    except TimeoutError:
        res.outcome, res.detail = "error", f"no answer within {limit_s:g} s"
    except (aiohttp.ClientError, OSError, ValueError) as e:
        res.outcome, res.detail = "error", f"{type(e).__name__}: {e}"
    return res
