"""The endpoints Ollama's clients call, on the same entry as the OpenAI API (``api.py``), so tools
built for Ollama can talk to a mesh.

- ``POST /api/chat``      ``messages`` in the model's chat template
- ``POST /api/generate``  ``prompt`` with the chat template (``system`` as its system message),
  or as is with ``raw: true``; ``context`` (token ids of an earlier answer) goes first
- ``GET  /api/tags``, ``GET /api/ps``: the one model this mesh serves
- ``POST /api/show``: its details; ``GET /api/version``

Both generating endpoints stream by default (``stream: false`` for one JSON object): one JSON
object per line, each ``{"model", "created_at", "message": {"role", "content"}, "done": false}``
(``"response"`` in place of ``message`` for ``/api/generate``), then a last one without text, with
``"done": true``, ``done_reason`` (``stop`` or ``length``) and the durations in nanoseconds:
``total_duration``, ``load_duration`` (0: the blocks are loaded before the mesh serves),
``prompt_eval_duration`` (until the first token), ``eval_duration`` (the rest), with
``prompt_eval_count`` and ``eval_count``. A stream idle for ``ServeConfig.keepalive_s`` gets an
empty chunk (``content: ""``, ``done: false``), which every client reads as nothing new.

``options`` maps to the sampler: ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
``num_predict`` (-1 or -2: the rest of the context) and ``num_ctx`` (the context to fit in, at most
the model's); Ollama's other options (penalties, mirostat, threads...) are accepted and ignored.
What this mesh cannot do (``format``, ``tools``, ``images``, ``suffix``, ``template``, ``think``)
is a 400. Errors are ``{"error": "..."}``: 400 bad request, 401 no API key, 404 unknown model,
413 body too large, 503 queue full or no plan (``Retry-After``), 500 a request that failed; one that
fails mid-stream ends with an ``{"error": ...}`` line (Ollama's clients raise it).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshllm.errors import MeshError
from meshllm.serve.api import IDLE, ApiError, EventReader, _event_error, chat_messages, read_json
from meshllm.serve.entry import Event

if TYPE_CHECKING:
    from meshllm.serve.api import OpenAIApi

log = logging.getLogger("meshllm.serve.ollama")

# The Ollama API whose shapes these endpoints follow; clients read it to decide what they may send.
OLLAMA_VERSION = "0.12.0"

# option -> SamplingParams field
SAMPLING_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                    "stop": "stop"}
UNSUPPORTED = {"format": "structured output (format)", "tools": "tools", "suffix": "suffix",
               "template": "a template override", "images": "images"}


def _now() -> str:
    """RFC 3339 in UTC, as Ollama writes ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(e: ApiError) -> web.Response:
    return web.json_response({"error": e.message}, status=e.status, headers=e.headers)


class OllamaApi:
    def __init__(self, api: OpenAIApi) -> None:
        self.api = api
        self.entry = api.entry
        manifest = getattr(getattr(api.serving, "node", None), "manifest", None)
        self.manifest = manifest
        self.name = api.model if ":" in api.model else f"{api.model}:latest"

    def mount(self, app: web.Application) -> None:
        app.router.add_post("/api/chat", self._guard(self.chat))
        app.router.add_post("/api/generate", self._guard(self.generate))
        app.router.add_get("/api/tags", self._guard(self.tags))
        app.router.add_get("/api/ps", self._guard(self.ps))
        app.router.add_post("/api/show", self._guard(self.show))
        app.router.add_get("/api/version", self._guard(self.version))

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.api.authorized(request):
                self.entry.metrics.rejected("invalid_api_key")
                return web.json_response({"error": "unauthorized: send the API key as Authorization: Bearer KEY"},
                                         status=401)
            try:
                return await handler(request)
            except ApiError as e:
                if not e.counted:  # refused before the entry (bad JSON, unknown model...): it still counts
                    self.entry.metrics.rejected(e.code or "invalid")
                return _error(e)

        return guarded

    # --- requests -----------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> tuple[dict[str, Any], str]:
        """The body and the model name to answer with (the client's own spelling)."""
        body = await read_json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required")
        if not self.serves(model):
            raise ApiError(404, f"model {model!r} not found (this mesh serves {self.name!r})")
        for key, what in UNSUPPORTED.items():
            if body.get(key):
                raise ApiError(400, f"{what} is not supported by this mesh")
        if body.get("think"):
            raise ApiError(400, f"{self.name!r} does not support thinking")
        if body.get("options") is not None and not isinstance(body["options"], dict):
            raise ApiError(400, "options must be an object")
        return body, model

    def serves(self, model: str) -> bool:
        base = model.removesuffix(":latest")
        return self.api.serves(model) or self.api.serves(base) or model == self.name

    def _params(self, options: dict[str, Any], prompt_len: int) -> Any:
        """Ollama's ``options`` as sampling parameters; the answer's length from ``num_predict``
        and ``num_ctx`` (the context the prompt and the answer must fit in)."""
        ctx = self.entry.max_position
        num_ctx = options.get("num_ctx")
        if num_ctx is not None:
            if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1:
                raise ApiError(400, f"num_ctx must be a positive integer, got {num_ctx!r}")
            ctx = min(ctx, num_ctx)  # Ollama clamps a larger num_ctx to what the model was trained for
        if prompt_len >= ctx:
            raise ApiError(400, f"the prompt of {prompt_len} tokens does not fit in a context of {ctx} tokens "
                                f"(num_ctx; the model's is {self.entry.max_position})")
        left = ctx - prompt_len
        n = options.get("num_predict")
        if n is None or n in (-1, -2):
            max_tokens = left
        elif isinstance(n, int) and not isinstance(n, bool) and n > 0:
            max_tokens = min(n, left)
        else:
            raise ApiError(400, f"num_predict must be a positive integer, -1 or -2, got {n!r}")
        kw: dict[str, Any] = {"max_tokens": max_tokens}
        for opt, field in SAMPLING_OPTIONS.items():
            if options.get(opt) is not None:
                kw[field] = options[opt]
        return self.api.sampling(kw)

    def _encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            return list(self.api.tokenizer().encode_chat(messages))
        except MeshError as e:
            raise ApiError(400, f"cannot apply the chat template: {e}") from None

    # --- endpoints ----------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request)
        messages = body.get("messages")
        if messages in (None, []):  # Ollama's way to load a model: nothing to do here
            return self._loaded(model, body, chat=True)
        for m in messages if isinstance(messages, list) else ():
            if isinstance(m, dict) and (m.get("images") or m.get("tool_calls")):
                raise ApiError(400, "images and tool calls are not supported by this mesh")
        msgs = [{"role": m["role"], "content": m.get("content", "")} for m in chat_messages(messages)]
        ids = self._encode_chat(msgs)
        return await self._answer(request, body, model, ids, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request)
        prompt, system, context = body.get("prompt", ""), body.get("system"), body.get("context")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        if system is not None and not isinstance(system, str):
            raise ApiError(400, "system must be a string")
        if context is not None and not (isinstance(context, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in context)):
            raise ApiError(400, "context must be a list of token ids")
        if not prompt and not context:
            return self._loaded(model, body, chat=False)
        if body.get("raw"):
            ids = list(self.api.tokenizer().encode(prompt, add_special_tokens=not context)) if prompt else []
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = self._encode_chat(msgs)
        return await self._answer(request, body, model, list(context or []) + ids, chat=False)

    def _loaded(self, model: str, body: dict[str, Any], chat: bool) -> web.Response:
        d: dict[str, Any] = {"model": model, "created_at": _now()}
        if chat:
            d["message"] = {"role": "assistant", "content": ""}
        else:
            d["response"] = ""
        d["done_reason"] = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
        d["done"] = True
        return web.json_response(d)

    def _details(self) -> dict[str, Any]:
        cfg = self.manifest.config if self.manifest is not None else None
        family = cfg.architecture if cfg is not None else "llama"
        return {"parent_model": "", "format": "onnx", "family": family, "families": [family],
                "parameter_size": _count(self._param_count()),
                "quantization_level": cfg.weight_dtype.upper() if cfg is not None else ""}

    def _size(self) -> int:
        """Bytes of weights across the model's blocks."""
        return sum(b.cost.param_bytes for b in self.manifest.blocks) if self.manifest is not None else 0

    def _param_count(self) -> int:
        m = self.manifest
        if m is None:
            return 0
        c = m.config
        attn = c.hidden_size * c.head_dim * (c.num_heads * 2 + c.num_kv_heads * 2)
        mlp = 3 * c.hidden_size * c.intermediate_size
        embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        return c.num_layers * (attn + mlp + 2 * c.hidden_size) + embed + c.hidden_size

    def _model_entry(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": "1970-01-01T00:00:00Z", "size": self._size(),
                "digest": self.api.model_id, "details": self._details()}

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._model_entry()]})

    async def ps(self, request: web.Request) -> web.Response:
        entry = self._model_entry()
        entry.pop("modified_at")
        entry.update({"expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                      "context_length": self.entry.max_position})
        return web.json_response({"models": [entry]})

    async def show(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        model = body.get("model", body.get("name"))
        if not isinstance(model, str) or not self.serves(model):
            raise ApiError(404, f"model {model!r} not found (this mesh serves {self.name!r})")
        details = self._details()
        m = self.manifest
        info: dict[str, Any] = {"general.architecture": details["family"],
                                "general.parameter_count": self._param_count()}
        if m is not None:
            c, a = m.config, m.config.architecture
            info.update({f"{a}.block_count": c.num_layers, f"{a}.context_length": c.max_position,
                         f"{a}.embedding_length": c.hidden_size, f"{a}.feed_forward_length": c.intermediate_size,
                         f"{a}.attention.head_count": c.num_heads, f"{a}.attention.head_count_kv": c.num_kv_heads,
                         f"{a}.vocab_size": c.vocab_size})
        template = (m.chat_template or "") if m is not None else ""
        return web.json_response({"modelfile": f"# served by meshllm\nFROM {self.name}\n", "parameters": "",
                                  "template": template, "details": details, "model_info": info,
                                  "capabilities": ["completion"], "modified_at": "1970-01-01T00:00:00Z"})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION})

    # --- the answer ---------------------------------------------------------------------------------
    async def _answer(self, request: web.Request, body: dict[str, Any], model: str, ids: list[int],
                      chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        params = self._params(body.get("options") or {}, len(ids))
        return await self.api.traced(request, lambda req_id, echo: self._generate(
            request, body, model, ids, params, chat, t0, req_id, echo))

    async def _generate(self, request: web.Request, body: dict[str, Any], model: str, ids: list[int], params: Any,
                        chat: bool, t0: int, req_id: str, echo: dict[str, str]) -> web.StreamResponse:
        stream = body.get("stream", True) is not False
        try:
            events, first = await self.api.start(ids, params, self.api.keepalive_s if stream else None,
                                                 request_id=req_id)
        except ApiError as e:
            if e.status == 429:  # Ollama answers a full queue with 503 ("server busy")
                e.status = 503
            raise
        clock = _Clock(t0)

        def line(text: str) -> dict[str, Any]:
            d: dict[str, Any] = {"model": model, "created_at": _now()}
            if chat:
                d["message"] = {"role": "assistant", "content": text}
            else:
                d["response"] = text
            d["done"] = False
            return d

        def last(text: str, reason: str | None, tokens: list[int]) -> dict[str, Any]:
            d = line(text)
            d["done"] = True
            d["done_reason"] = reason or "length"
            d.update(clock.stats(len(ids), len(tokens)))
            if not chat and not body.get("raw"):
                d["context"] = ids + tokens
            return d

        tokens: list[int] = []
        if not stream:
            text: list[str] = []
            reason = None
            ev: Event | object | None = first
            async with events:
                while isinstance(ev, Event):
                    if ev.error is not None:
                        raise _event_error(ev)
                    if ev.token_id is not None:
                        tokens.append(ev.token_id)
                        clock.token()
                    text.append(ev.text)
                    if ev.finish_reason is not None:
                        reason = ev.finish_reason
                        break
                    ev = await events.next()
            return web.json_response(last("".join(text), reason, tokens))
        return await self._stream(request, events, first, line, last, tokens, clock, echo)

    async def _stream(self, request: web.Request, events: EventReader, first: Any, line: Any, last: Any,
                      tokens: list[int], clock: _Clock, echo: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **echo})
        await resp.prepare(request)

        async def send(d: dict[str, Any]) -> None:
            await resp.write(json.dumps(d).encode() + b"\n")

        async with events:
            try:
                ev = first
                while ev is not None:
                    if ev is IDLE:
                        await send(line(""))
                        self.api.keepalives += 1
                    elif ev.error is not None:
                        await send({"error": _event_error(ev).message})
                        break
                    else:
                        if ev.token_id is not None:
                            tokens.append(ev.token_id)
                            clock.token()
                        if ev.text:
                            await send(line(ev.text))
                        if ev.finish_reason is not None:  # as Ollama's: the last line brings no text
                            await send(last("", ev.finish_reason, tokens))
                            break
                    ev = await events.next(self.api.keepalive_s)
                await resp.write_eof()
            except (ConnectionResetError, ConnectionError):
                log.info("client went away; request cancelled")
        return resp


class _Clock:
    """Ollama's durations, in nanoseconds: the request's start, its first and its last token."""

    def __init__(self, t0: int) -> None:
        self.t0 = t0
        self.first: int | None = None
        self.last: int | None = None

    def token(self) -> None:
        now = time.perf_counter_ns()
        if self.first is None:
            self.first = now
        self.last = now

    def stats(self, prompt: int, generated: int) -> dict[str, int]:
        end = time.perf_counter_ns()
        first = self.first if self.first is not None else end
        return {"total_duration": end - self.t0, "load_duration": 0, "prompt_eval_count": prompt,
                "prompt_eval_duration": first - self.t0, "eval_count": generated,
                "eval_duration": (self.last or first) - first}


def _count(n: int) -> str:
    """A parameter count as Ollama writes it: ``135M``, ``7.2B``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f}{unit}".replace(".0" + unit, unit) if v < 100 else f"{v:.0f}{unit}"
    return str(n)

