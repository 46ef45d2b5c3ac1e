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

Each body is validated by its schema (``serve/schema.py``; unknown fields ignored, a known one
with a bad value a 400). ``options`` maps to the sampler: ``temperature``, ``top_p``, ``top_k``,
``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``, ``num_predict`` (-1 or -2: the
rest of the context) and ``num_ctx`` (the context to fit in, at most the model's); the runtime's
hints (``num_thread``, ``num_gpu``, ``use_mmap``...) change nothing in an answer and are accepted;
the samplers this mesh lacks (``repeat_penalty``, ``min_p``, ``typical_p``, ``tfs_z``,
``mirostat``) are a 400 unless at their neutral value. What this mesh cannot do (``format``,
``tools``, ``images``, ``suffix``, ``template``, ``think``, tool messages) is a 400 too. Errors are
``{"error": "..."}``: 400 bad request, 401 no API key, 404 unknown model, 413 body too large, 503
queue full or no plan (``Retry-After``), 500 a request that failed; one that fails mid-stream ends
with an ``{"error": ...}`` line (Ollama's clients raise it). This dialect and OpenAI's share one
front (``serve/front.py``): the same request gets the same tokens from both.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.entry import Event
from meshllm.serve.front import ApiError, EventReader, Front, _Idle, event_error, read_body, refuse
from meshllm.serve.schema import (
    OLLAMA_NEUTRAL,
    OllamaChatRequest,
    OllamaCommon,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
)

log = logging.getLogger("meshllm.serve.ollama")

# The Ollama API whose shapes these endpoints follow; clients read it to decide what they may send.
OLLAMA_VERSION = "0.12.0"


def _now() -> str:
    """RFC 3339 in UTC, as Ollama writes ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class OllamaApi:
    def __init__(self, front: Front) -> None:
        self.front = front
        self.entry = front.entry
        manifest = front.serving.ports.identity.manifest if hasattr(front.serving, "ports") else None
        self.manifest = manifest
        self.name = front.model if ":" in front.model else f"{front.model}:latest"

    def mount(self, app: web.Application) -> None:
        app.router.add_post("/api/chat", self._guard(self.chat))
        app.router.add_post("/api/generate", self._guard(self.generate))
        app.router.add_get("/api/tags", self._guard(self.tags))
        app.router.add_get("/api/ps", self._guard(self.ps))
        app.router.add_post("/api/show", self._guard(self.show))
        app.router.add_get("/api/version", self._guard(self.version))

    def _guard(self, handler: Any) -> Any:
        return self.front.guard(handler, ApiError.ollama,
                                "unauthorized: send the API key as Authorization: Bearer KEY")

    # --- requests -----------------------------------------------------------------------------------
    def _common(self, body: OllamaCommon) -> None:
        if not self.serves(body.model):
            raise ApiError(404, f"model {body.model!r} not found (this mesh serves {self.name!r})")
        if body.format:
            raise refuse("format", "structured output (format)")
        if body.think not in (None, False):
            raise ApiError(400, f"{self.name!r} does not support thinking", param="think")

    def serves(self, model: str) -> bool:
        base = model.removesuffix(":latest")
        return self.front.serves(model) or self.front.serves(base) or model == self.name

    def _params(self, options: OllamaOptions | None, prompt_len: int) -> SamplingParams:
        """Ollama's ``options`` as sampling parameters; the answer's length from ``num_predict``
        and ``num_ctx`` (the context the prompt and the answer must fit in)."""
        o = options or OllamaOptions()
        for name, neutral in OLLAMA_NEUTRAL.items():
            v = getattr(o, name)
            if v is not None and v != neutral:
                raise refuse(f"options.{name}", f"the {name} sampler (only {neutral} is)")
        ctx = self.entry.max_position
        if o.num_ctx is not None:
            ctx = min(ctx, o.num_ctx)  # Ollama clamps a larger num_ctx to what the model was trained for
        if prompt_len >= ctx:
            raise ApiError(400, f"the prompt of {prompt_len} tokens does not fit in a context of {ctx} tokens "
                                f"(num_ctx; the model's is {self.entry.max_position})", param="options.num_ctx")
        left = ctx - prompt_len
        n = o.num_predict
        if n is None or n in (-1, -2):
            max_tokens = left
        elif n > 0:
            max_tokens = min(n, left)
        else:
            raise ApiError(400, f"num_predict must be a positive integer, -1 or -2, got {n!r}",
                           param="options.num_predict")
        return self.front.params(max_tokens, prefix="options.", temperature=o.temperature, top_p=o.top_p,
                                 top_k=o.top_k, seed=o.seed, stop=o.stop, presence_penalty=o.presence_penalty,
                                 frequency_penalty=o.frequency_penalty)

    # --- endpoints ----------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, OllamaChatRequest)
        self._common(body)
        if body.tools:
            raise refuse("tools", "tools")
        if not body.messages:  # Ollama's way to load a model: nothing to do here
            return self._loaded(body, chat=True)
        msgs = []
        for i, m in enumerate(body.messages):
            if m.images:
                raise refuse(f"messages.[{i}].images", "images")
            if m.tool_calls or m.role == "tool":
                raise refuse(f"messages.[{i}].tool_calls", "tool calls and tool results")
            if m.thinking:
                raise refuse(f"messages.[{i}].thinking", "thinking")
            msgs.append({"role": m.role, "content": m.content})
        ids = self.front.encode_chat(msgs)
        return await self._answer(request, body, ids, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, OllamaGenerateRequest)
        self._common(body)
        for name, what in (("suffix", "suffix"), ("images", "images"), ("template", "a template override")):
            if getattr(body, name):
                raise refuse(name, what)
        prompt, context = body.prompt, body.context
        if not prompt and not context:
            return self._loaded(body, chat=False)
        if body.raw:
            ids = list(self.front.tokenizer().encode(prompt, add_special_tokens=not context)) if prompt else []
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": prompt}]
            ids = self.front.encode_chat(msgs)
        return await self._answer(request, body, list(context or []) + ids, chat=False)

    def _loaded(self, body: OllamaCommon, chat: bool) -> web.Response:
        d: dict[str, Any] = {"model": body.model, "created_at": _now()}
        if chat:
            d["message"] = {"role": "assistant", "content": ""}
        else:
            d["response"] = ""
        d["done_reason"] = "unload" if body.keep_alive in (0, "0", "0s") else "load"
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
                "digest": self.front.model_id, "details": self._details()}

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._model_entry()]})

    async def ps(self, request: web.Request) -> web.Response:
        entry = self._model_entry()
        entry.pop("modified_at")
        entry.update({"expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                      "context_length": self.entry.max_position})
        return web.json_response({"models": [entry]})

    async def show(self, request: web.Request) -> web.Response:
        body = await read_body(request, OllamaShowRequest)
        model = body.model if body.model is not None else body.name
        if model is None or not self.serves(model):
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
    async def _answer(self, request: web.Request, body: OllamaCommon, ids: list[int],
                      chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        params = self._params(body.options, len(ids))
        return await self.front.traced(request, lambda req_id, headers: self._generate(
            request, body, ids, params, chat, t0, req_id, headers))

    async def _generate(self, request: web.Request, body: OllamaCommon, ids: list[int], params: SamplingParams,
                        chat: bool, t0: int, req_id: str, headers: dict[str, str]) -> web.StreamResponse:
        stream = body.stream is not False
        try:
            events, first = await self.front.start(ids, params, self.front.keepalive_s if stream else None,
                                                   request_id=req_id, client=request)
        except ApiError as e:
            if e.status == 429:  # Ollama answers a full queue with 503 ("server busy")
                e.status = 503
            raise
        clock = _Clock(t0)
        model = body.model
        raw = isinstance(body, OllamaGenerateRequest) and bool(body.raw)

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
            if not chat and not raw:
                d["context"] = ids + tokens
            return d

        if not stream:
            got = await self.front.collect(events, first, on_token=clock.token, client=request)
            return web.json_response(last("".join(got.text), got.reason, got.tokens))
        return await self._stream(request, events, first, line, last, clock, headers)

    async def _stream(self, request: web.Request, events: EventReader, first: Event | _Idle, line: Any, last: Any,
                      clock: _Clock, headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **headers})

        async def send(d: dict[str, Any]) -> None:
            await resp.write(json.dumps(d).encode() + b"\n")

        tokens: list[int] = []
        async with events:  # however this ends (the client gone before the headers too), the request ends
            try:
                await resp.prepare(request)
                async for ev in self.front.events(events, first):
                    if not isinstance(ev, Event):
                        await send(line(""))
                    elif ev.error is not None:
                        await send({"error": event_error(ev).message})
                    else:
                        if ev.token_id is not None:
                            tokens.append(ev.token_id)
                            clock.token()
                        if ev.text:
                            await send(line(ev.text))
                        if ev.finish_reason is not None:  # as Ollama's: the last line brings no text
                            await send(last("", ev.finish_reason, tokens))
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

