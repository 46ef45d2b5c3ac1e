"""The OpenAI-compatible HTTP API every node serves (it is the entry of what it accepts), one
dialect over the shared front (``serve/front.py``); ``mount`` puts Ollama's (``serve/ollama.py``)
on the same front.

- ``GET  /v1/models``
- ``POST /v1/completions``       ``prompt`` (a string or a list of token ids), ``max_tokens`` (16),
  ``echo``, ``logprobs`` (0..5)
- ``POST /v1/chat/completions``  ``messages`` in the model's chat template, ``max_tokens`` /
  ``max_completion_tokens`` (default: the rest of the context), ``logprobs`` and ``top_logprobs``

Both take ``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, ``stream`` and ``stream_options.include_usage`` (a last
chunk with the usage), ``user`` (logged); extensions ``top_k``, ``ignore_eos``, ``speculate``. Each body is
validated by its schema (``serve/schema.py``): a known field with a bad value is a 400 whose
``param`` names it; unknown fields are ignored, as OpenAI does. What the mesh cannot do is
refused with a 400 naming the field, never ignored: ``n`` or ``best_of`` > 1, ``tools``,
``tool_choice``, ``functions``, a ``response_format`` other than text, ``suffix``, audio,
``prediction``, ``reasoning_effort``, ``store: true``, tool messages and non-text content parts.

Streaming answers are server-sent events ending with ``data: [DONE]``; a request that fails after
its first byte gets an ``error`` event (the OpenAI client raises it), never a silent end. Errors
use OpenAI's JSON shape: 400 bad request or context too long (``context_length_exceeded``), 404
unknown model, 413 body too large, 429 queue full (with ``Retry-After``), 503 no active plan or
no room, 500 a request that failed on the mesh. Non-streaming answers carry an extension
``meshllm`` object with the prompt's and the answer's token ids (``meshllm prompt --json``).

A stream idle for ``ServeConfig.keepalive_s`` (a long prefill, a wait for KV room, a slow token)
gets an SSE comment ``: keep-alive`` so that proxies do not cut it; clients skip comments. Before
the first token, that starts the stream: a request that fails later gets an ``error`` event.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web

from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.entry import Event
from meshllm.serve.front import (
    LOGPROBS,
    PROMPT_LOGPROBS,
    ApiError,
    EventReader,
    Front,
    TokenLogprob,
    _Idle,
    event_error,
    log_user,
    prompt_logprobs_of,
    read_body,
    refuse,
    token_logprob,
)
from meshllm.serve.ollama import OllamaApi
from meshllm.serve.schema import ChatMessage, ChatRequest, CompletionRequest, OpenAICommon

log = logging.getLogger("meshllm.serve.api")


class OpenAIApi:
    def __init__(self, serving: Any, model_name: str, model_id: str, *, api_key: str | None = None) -> None:
        self.front = Front(serving, model_name, model_id, api_key=api_key)
        self.entry = self.front.entry
        self.model = model_name

    @property
    def keepalives(self) -> int:
        """Keep-alives sent on idle streams (this API's and Ollama's)."""
        return self.front.keepalives

    def mount(self, app: web.Application) -> None:
        """This dialect's endpoints and Ollama's, on one front."""
        app.router.add_get("/v1/models", self._guard(self.models))
        app.router.add_post("/v1/completions", self._guard(self.completions))
        app.router.add_post("/v1/chat/completions", self._guard(self.chat))
        OllamaApi(self.front).mount(app)

    def _guard(self, handler: Any) -> Any:
        return self.front.guard(handler, ApiError.response,
                                "a valid API key is required (Authorization: Bearer KEY)")

    # --- requests -----------------------------------------------------------------------------------
    def _common(self, body: OpenAICommon) -> None:
        """What chat and completions check alike: the model, the one choice, stream options."""
        if not self.front.serves(body.model):
            raise ApiError(404, f"model {body.model!r} is not served here (this mesh serves {self.model!r})",
                           code="model_not_found", param="model")
        if body.n is not None and body.n > 1:
            raise refuse("n", "more than one choice (n > 1)")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        log_user(body.user)

    def _max_tokens(self, v: int | None, default: int | None, prompt_len: int) -> int:
        if v is None:
            left = self.entry.max_position - prompt_len
            return max(1, left if default is None else min(default, left))
        return v

    def _params(self, body: OpenAICommon, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return self.front.params(
            max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
            stop=body.stop, ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias, logprobs=logprobs,
            speculate=body.speculate)

    @staticmethod
    def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """Messages for the chat template: a role and a content string each (``developer`` is the
        system; text parts joined)."""
        out = []
        for i, m in enumerate(messages):
            at = f"messages.[{i}]"
            if m.role in ("tool", "function"):
                raise refuse(f"{at}.role", "tool results (tools)")
            if m.tool_calls or m.function_call:
                raise refuse(f"{at}.tool_calls", "tool calls")
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type == "text" and part.text is not None:
                        texts.append(part.text)
                    elif part.type == "refusal" and m.role == "assistant" and part.refusal is not None:
                        texts.append(part.refusal)
                    elif part.type in ("text", "refusal"):
                        raise ApiError(400, f"a {part.type} part needs its {part.type} (a string)",
                                       param=f"{at}.content.[{j}].{part.type}", code="invalid_value")
                    else:
                        raise refuse(f"{at}.content.[{j}].type", f"{part.type} content")
                content = "".join(texts)
            if content is None:
                if m.role != "assistant":
                    raise ApiError(400, f"a {m.role} message needs content", param=f"{at}.content",
                                   code="invalid_value")
                content = m.refusal or ""
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out

    # --- endpoints ----------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "meshllm",
             "meshllm_id": self.front.model_id}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, CompletionRequest)
        self._common(body)
        if body.best_of is not None and body.best_of > 1:
            raise refuse("best_of", "more than one candidate (best_of > 1)")
        if body.suffix:
            raise refuse("suffix", "a suffix (insertion)")
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise refuse("prompt", "more than one prompt in a request")
            prompt = prompt[0]
        ids = list(self.front.tokenizer().encode(prompt)) if isinstance(prompt, str) else [int(i) for i in prompt]
        if body.logprobs is not None:
            self.front.require(LOGPROBS, "logprobs", "logprobs")
            if body.echo:
                self.front.require(PROMPT_LOGPROBS, "echo", "the prompt's logprobs (echo with logprobs)")
        params = self._params(body, self._max_tokens(body.max_tokens, 16, len(ids)), body.logprobs)
        echo = None
        if body.echo:
            echo = prompt if isinstance(prompt, str) else self.front.tokenizer().decode(ids, skip_special_tokens=False)
        return await self._serve(request, body, ids, params, chat=False, echo=echo)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ChatRequest)
        self._common(body)
        if body.tools:
            raise refuse("tools", "tools")
        if body.functions:
            raise refuse("functions", "functions")
        if body.tool_choice not in (None, "none"):
            raise refuse("tool_choice", "tool choice")
        if body.function_call not in (None, "none"):
            raise refuse("function_call", "function calls")
        if body.response_format is not None and body.response_format.type != "text":
            raise refuse("response_format", f"structured output ({body.response_format.type})")
        if body.modalities not in (None, ["text"]):
            raise refuse("modalities", "output other than text")
        if body.audio is not None:
            raise refuse("audio", "audio output")
        if body.prediction is not None:
            raise refuse("prediction", "predicted outputs")
        if body.reasoning_effort is not None:
            raise refuse("reasoning_effort", "reasoning")
        if body.store:
            raise refuse("store", "storing completions")
        top: int | None = None
        if body.logprobs:
            self.front.require(LOGPROBS, "logprobs", "logprobs")
            top = body.top_logprobs or 0
        elif body.top_logprobs is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        ids = self.front.encode_chat(self._messages(body.messages))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._params(body, self._max_tokens(max_tokens, None, len(ids)), top)
        return await self._serve(request, body, ids, params, chat=True)

    # --- the answer ---------------------------------------------------------------------------------
    async def _serve(self, request: web.Request, body: OpenAICommon, ids: list[int], params: SamplingParams,
                     chat: bool, echo: str | None = None) -> web.StreamResponse:
        return await self.front.traced(request, lambda req_id, headers: self._answer(
            request, body, ids, params, chat, echo, req_id, headers))

    async def _answer(self, request: web.Request, body: OpenAICommon, ids: list[int], params: SamplingParams,
                      chat: bool, echo: str | None, req_id: str, headers: dict[str, str]) -> web.StreamResponse:
        stream = bool(body.stream)
        logprobs = params.logprobs is not None
        scored = echo is not None and logprobs  # the prompt's logprobs too
        events, first = await self.front.start(ids, params, self.front.keepalive_s if stream else None,
                                               request_id=req_id, prompt_logprobs=scored, client=request)
        rid = ("chatcmpl-" if chat else "cmpl-") + req_id
        created = int(time.time())
        if stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(request, events, first, rid, created, ids, chat, usage, echo, logprobs,
                                      scored, headers)
        got = await self.front.collect(events, first, logprobs=logprobs, prompt=ids if scored else None,
                                       client=request)
        out = "".join(got.text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": got.reason or "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out, "refusal": None}
            if logprobs:
                choice["logprobs"] = {"content": [self._chat_logprob(lp) for lp in got.logprobs], "refusal": None}
        else:
            choice["text"] = (echo or "") + out
            if logprobs:
                prompt = (self._prompt_entries(ids, got.prompt_logprobs or []) if echo is not None else [])
                choice["logprobs"] = self._completion_logprobs(prompt + got.logprobs, 0)
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.model, "choices": [choice], "usage": _usage(len(ids), len(got.tokens)),
            "meshllm": {"prompt_token_ids": ids, "token_ids": got.tokens}})

    # --- logprobs in OpenAI's shapes ------------------------------------------------------------------
    def _chat_logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        def one(t: int, v: float | None) -> dict[str, Any]:
            s = self.front.token_text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {**one(lp.token_id, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}

    @staticmethod
    def _prompt_entries(ids: list[int], scored: list[TokenLogprob]) -> list[TokenLogprob]:
        """The prompt's tokens for ``echo``: the first has no logprob (nothing came before it)."""
        return [TokenLogprob(ids[0], None), *scored] if ids else []

    def _completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """The completions shape: parallel lists, ``top_logprobs`` a token -> logprob object per
        token (None for the first prompt token), ``text_offset`` where each token starts in the text."""
        tokens, values, tops, offsets = [], [], [], []
        for lp in entries:
            s = self.front.token_text(lp.token_id)
            tokens.append(s)
            values.append(lp.logprob)
            tops.append(None if lp.logprob is None else {self.front.token_text(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def _stream(self, request: web.Request, events: EventReader, first: Event | _Idle, rid: str, created: int,
                      ids: list[int], chat: bool, usage: bool, echo: str | None, logprobs: bool, scored: bool,
                      headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **headers})
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = 0
        offset = 0
        echoed = echo is None  # the prompt goes out before the first token's chunk

        def chunk(text: str | None, reason: str | None, role: bool = False, token: int | None = None,
                  logprobs: dict[str, Any] | None = None) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
            d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": self.model,
                                 "choices": [choice]}
            if token is not None:
                d["meshllm"] = {"token_ids": [token]}
            if usage:
                d["usage"] = None
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        async with events:  # however this ends (the client gone before the headers too), the request ends
            try:
                await resp.prepare(request)
                if chat:
                    await resp.write(chunk("", None, role=True))
                async for ev in self.front.events(events, first):
                    if not isinstance(ev, Event):
                        await resp.write(b": keep-alive\n\n")
                        continue
                    if ev.error is not None:
                        await resp.write(b"data: " + json.dumps(event_error(ev).body()).encode() + b"\n\n")
                        await resp.write_eof()
                        return resp
                    try:
                        if not echoed and echo is not None:
                            echoed = True
                            lps = None
                            if scored:
                                entries = self._prompt_entries(ids, prompt_logprobs_of(ev, ids))
                                lps = self._completion_logprobs(entries, 0)
                            await resp.write(chunk(echo, None, logprobs=lps))
                            offset = len(echo)
                        lp_doc = None
                        if ev.token_id is not None:
                            n += 1
                            if logprobs:
                                lp = token_logprob(ev)
                                lp_doc = ({"content": [self._chat_logprob(lp)], "refusal": None} if chat
                                          else self._completion_logprobs([lp], offset))
                    except ApiError as e:  # the mesh left out what it promised: the stream ends in an error
                        await resp.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
                        await resp.write_eof()
                        return resp
                    await resp.write(chunk(ev.text, ev.finish_reason, token=ev.token_id, logprobs=lp_doc))
                    offset += len(ev.text)
                if usage:
                    d = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [],
                         "usage": _usage(len(ids), n)}
                    await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionResetError, ConnectionError):
                log.info("client went away; request cancelled")
        return resp


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
