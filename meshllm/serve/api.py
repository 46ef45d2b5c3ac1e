"""The OpenAI-compatible HTTP API every node serves (it is the entry of what it accepts).

- ``GET  /v1/models``
- ``POST /v1/completions``       ``prompt`` (a string or a list of token ids), ``max_tokens`` (16),
  ``temperature`` (1), ``top_p`` (1), ``seed``, ``stop``, ``stream``; extensions ``top_k``,
  ``ignore_eos``
- ``POST /v1/chat/completions``  ``messages`` in the model's chat template, ``max_tokens`` /
  ``max_completion_tokens`` (default: the rest of the context), the same sampling fields,
  ``stream`` and ``stream_options.include_usage``

Streaming answers are server-sent events ending with ``data: [DONE]``; a request that fails after
its first byte gets an ``error`` event (the OpenAI client raises it), never a silent end. Errors
use OpenAI's JSON shape: 400 bad request or context too long (``context_length_exceeded``), 404
unknown model, 413 body too large, 429 queue full (with ``Retry-After``), 503 no active plan or
no room, 500 a request that failed on the mesh. Non-streaming answers carry an extension
``meshllm`` object with the prompt's and the answer's token ids (``meshllm prompt --json``).

A stream idle for ``ServeConfig.keepalive_s`` (a long prefill, a wait for KV room, a slow token)
gets an SSE comment ``: keep-alive`` so that proxies do not cut it; clients skip comments. Before
the first token, that starts the stream: a request that fails later gets an ``error`` event.

Ollama's endpoints (``/api/chat``, ``/api/generate``, ``/api/tags``...) share this entry, its
helpers and its API key: ``serve/ollama.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from meshllm.errors import ContextLengthError, MeshError, SamplingError, UserError
from meshllm.obs.logs import bound, client_request_id
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.entry import Event, NotReady, QueueFull

log = logging.getLogger("meshllm.serve.api")

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
IGNORED_FIELDS = ("user", "frequency_penalty", "presence_penalty", "logit_bias", "suffix", "service_tier",
                  "parallel_tool_calls", "store", "metadata")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.counted = False  # the entry counted this request already (meshllm_requests_total)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def _mesh_error(e: MeshError, retry_after: int) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(e, NotReady):
        return ApiError(503, str(e), "service_unavailable", "unavailable", headers={"Retry-After": str(retry_after)})
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), "invalid_request_error", "context_length_exceeded", "messages")
    if isinstance(e, UserError):
        return ApiError(400, str(e), "invalid_request_error", "invalid_value")
    return ApiError(500, str(e), "server_error", "internal_error")


def _event_error(ev: Event) -> ApiError:
    if ev.code == "too_large":  # the request can never fit: the client must ask for less
        return ApiError(400, ev.error or "request too large", "invalid_request_error", "context_length_exceeded",
                        "max_tokens")
    status = 503 if ev.code in ("node_lost", "unreachable", "unavailable", "epoch_unloaded") else 500
    return ApiError(status, ev.error or "request failed", "server_error", ev.code or "request_failed")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object, or an ApiError (413 too large, 400 not a JSON object)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body too large ({e.text})", code="body_too_large") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages checked for the template: each a role and a content string (OpenAI's content
    parts reduced to their text)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content", ""), str | list):
            raise ApiError(400, "each message needs a role and a content string", param="messages")
        if isinstance(m.get("content"), list):  # content parts: the text ones
            m["content"] = "".join(p.get("text", "") for p in m["content"]
                                   if isinstance(p, dict) and p.get("type") == "text")
    return messages


class _Idle:
    def __repr__(self) -> str:
        return "IDLE"


IDLE: Final = _Idle()  # what EventReader.next returns when nothing came in time


class EventReader:
    """A request's events read with a deadline: ``next(idle_after)`` returns the next event, ``None``
    at the end, or ``IDLE`` when ``idle_after`` seconds pass first. The read stays pending across an
    ``IDLE``, so nothing is lost: the caller sends a keep-alive and reads again. The generator's
    own exceptions (bad input, a full queue, no plan) come out of ``next``."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self.events = events
        self._pending: asyncio.Future[Event | None] | None = None
        self._answered = False  # something went out: a refusal now is an error event, not a raise

    async def next(self, idle_after: float | None = None) -> Event | _Idle | None:
        try:
            ev = await self._next(idle_after)
        except MeshError as e:
            if not self._answered:
                raise
            return Event(None, "", 0, error=str(e), code="unavailable" if isinstance(e, NotReady) else "")
        self._answered = True
        return ev

    async def _next(self, idle_after: float | None) -> Event | _Idle | None:
        if self._pending is None:
            if idle_after is None:
                return await anext(self.events, None)
            self._pending = asyncio.ensure_future(anext(self.events, None))
        done, _ = await asyncio.wait({self._pending}, timeout=idle_after)
        if not done:
            return IDLE
        task, self._pending = self._pending, None
        return task.result()

    async def aclose(self) -> None:
        """Cancel the request if it has not ended (a pending read first: a generator cannot be
        closed while it runs)."""
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pending
            self._pending = None
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> EventReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class OpenAIApi:
    def __init__(self, serving: Any, model_name: str, model_id: str, *, api_key: str | None = None) -> None:
        self.serving = serving
        self.api_key = api_key
        self.entry = serving.entry
        self.model = model_name
        self.model_id = model_id
        self.retry_after = serving.config.retry_after_s
        self.keepalive_s = serving.config.keepalive_s
        self.keepalives = 0  # keep-alives sent on idle streams (this API's and Ollama's)

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._guard(self.models))
        app.router.add_post("/v1/completions", self._guard(self.completions))
        app.router.add_post("/v1/chat/completions", self._guard(self.chat))
        from meshllm.serve.ollama import OllamaApi  # it builds on this module

        OllamaApi(self).mount(app)

    def authorized(self, request: web.Request) -> bool:
        """Without an API key, everyone; with one, requests that carry it (``Authorization: Bearer KEY``)."""
        if not self.api_key:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())

    def serves(self, model: Any) -> bool:
        """Whether a request's ``model`` names what this mesh serves (absent: yes)."""
        return model is None or model in (self.model, self.model_id, "meshllm", "default")

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.authorized(request):
                self.entry.metrics.rejected("invalid_api_key")
                return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                "invalid_request_error", "invalid_api_key").response()
            return await handler(request)

        return guarded

    # --- helpers ----------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = await read_json(request)
        model = body.get("model")
        if not self.serves(model):
            raise ApiError(404, f"model {model!r} is not served here (this mesh serves {self.model!r})",
                           code="model_not_found", param="model")
        n = body.get("n", 1)
        if n not in (1, None):
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.get("echo"):
            raise ApiError(400, "echo is not supported", param="echo")
        if body.get("logprobs") not in (None, False):
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        return body

    def _params(self, body: dict[str, Any], max_tokens: int) -> SamplingParams:
        kw: dict[str, Any] = {"max_tokens": max_tokens}
        for f in SAMPLING_FIELDS:
            if body.get(f) is not None:
                kw[f] = body[f]
        return self.sampling(kw)

    @staticmethod
    def sampling(kw: dict[str, Any]) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except SamplingError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    def _max_tokens(self, body: dict[str, Any], default: int | None, prompt_len: int) -> int:
        v = body.get("max_completion_tokens", body.get("max_tokens"))
        if v is None:
            left = self.entry.max_position - prompt_len
            return max(1, left if default is None else min(default, left))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ApiError(400, f"max_tokens must be an integer >= 1, got {v!r}", param="max_tokens")
        return v

    def tokenizer(self) -> Any:
        tok = self.entry.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids")
        return tok

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --- endpoints ----------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "meshllm", "meshllm_id": self.model_id}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.tokenizer().encode(prompt)
            elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
                ids = list(prompt)
            else:
                raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
            params = self._params(body, self._max_tokens(body, 16, len(ids)))
            return await self._serve(request, body, ids, params, chat=False)
        except ApiError as e:
            return self._refused(e)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            messages = chat_messages(body.get("messages"))
            try:
                ids = self.tokenizer().encode_chat(messages)
            except MeshError as e:
                raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
            params = self._params(body, self._max_tokens(body, None, len(ids)))
            return await self._serve(request, body, ids, params, chat=True)
        except ApiError as e:
            return self._refused(e)

    def _refused(self, e: ApiError) -> web.Response:
        """A request refused before it reached the entry (bad JSON, unknown model...) still counts."""
        if not e.counted:
            self.entry.metrics.rejected(e.code or "invalid")
        return e.response()

    # --- the answer ---------------------------------------------------------------------------------
    async def _serve(self, request: web.Request, body: dict[str, Any], ids: list[int], params: SamplingParams,
                     chat: bool) -> web.StreamResponse:
        return await self.traced(request, lambda req_id, echo: self._answer(request, body, ids, params, chat,
                                                                            req_id, echo))

    async def traced(self, request: web.Request,
                     answer: Callable[[str, dict[str, str]], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Answer under a request id that every node's log lines about the request carry; the
        response echoes the client's ``X-Request-Id`` (or gives the mesh's id when it sent none).
        ``answer(request_id, headers)`` submits the request (``start``) and writes the response."""
        client = client_request_id(request.headers.get("X-Request-Id"))
        req_id = self.entry.new_request_id(client)
        echo = {"X-Request-Id": client or req_id}
        with bound(node=self.entry.name, request_id=req_id):
            try:
                resp = await answer(req_id, echo)
            except ApiError as e:
                e.headers.update(echo)
                e.counted = True  # the entry counted it: refused by it, or failed after acceptance
                raise
        if not resp.prepared:
            resp.headers.update(echo)
        return resp

    async def _answer(self, request: web.Request, body: dict[str, Any], ids: list[int], params: SamplingParams,
                      chat: bool, req_id: str, echo: dict[str, str]) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        events, first = await self.start(ids, params, self.keepalive_s if stream else None, request_id=req_id)
        rid = ("chatcmpl-" if chat else "cmpl-") + req_id
        created = int(time.time())
        if stream:
            return await self._stream(request, body, events, first, rid, created, len(ids), chat, echo)
        text, tokens, reason, err = [], [], None, None
        ev: Event | _Idle | None = first
        async with events:
            while isinstance(ev, Event):
                if ev.error is not None:
                    err = ev
                    break
                if ev.token_id is not None:
                    tokens.append(ev.token_id)
                text.append(ev.text)
                if ev.finish_reason is not None:
                    reason = ev.finish_reason
                    break
                ev = await events.next()
        if err is not None:
            raise _event_error(err)
        out = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason or "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out}
        else:
            choice["text"] = out
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.model, "choices": [choice], "usage": self._usage(len(ids), len(tokens)),
            "meshllm": {"prompt_token_ids": ids, "token_ids": tokens}})

    async def start(self, ids: list[int], params: SamplingParams, keepalive: float | None, *,
                    request_id: str | None = None) -> tuple[EventReader, Event | _Idle]:
        """Submit a request to the entry (both APIs go through here): its events and the first one,
        or IDLE when a streaming answer should start before it (``keepalive`` seconds passed). Bad
        input, a full queue and no plan raise at once (an ApiError), before any byte of the answer."""
        events = EventReader(self.entry.generate(ids, params, request_id=request_id))
        try:
            first = await events.next(keepalive)
        except MeshError as e:
            await events.aclose()
            raise _mesh_error(e, self.retry_after) from None
        if first is None:
            raise ApiError(500, "the request ended without an answer", "server_error")
        return events, first

    async def _stream(self, request: web.Request, body: dict[str, Any], events: EventReader, first: Event | _Idle,
                      rid: str, created: int, prompt_len: int, chat: bool,
                      echo: dict[str, str] | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **(echo or {})})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
            body.get("stream_options"), dict) else False
        n = 0

        def chunk(text: str | None, reason: str | None, role: bool = False, token: int | None = None) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": self.model,
                                 "choices": [choice]}
            if token is not None:
                d["meshllm"] = {"token_ids": [token]}
            if usage:
                d["usage"] = None
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        async with events:
            try:
                if chat:
                    await resp.write(chunk("", None, role=True))
                ev: Event | _Idle | None = first
                while ev is not None:
                    if ev is IDLE:
                        await resp.write(b": keep-alive\n\n")
                        self.keepalives += 1
                        ev = await events.next(self.keepalive_s)
                        continue
                    assert isinstance(ev, Event)
                    if ev.error is not None:
                        err = _event_error(ev)
                        await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                        await resp.write_eof()
                        return resp
                    if ev.token_id is not None:
                        n += 1
                    await resp.write(chunk(ev.text, ev.finish_reason, token=ev.token_id))
                    if ev.finish_reason is not None:
                        break
                    ev = await events.next(self.keepalive_s)
                if usage:
                    d = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [],
                         "usage": self._usage(prompt_len, n)}
                    await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionResetError, ConnectionError):
                log.info("client went away; request cancelled")
        return resp
