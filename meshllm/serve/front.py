"""The HTTP front every API dialect stands on (``api.py``: OpenAI's, ``ollama.py``: Ollama's).

What is the same whatever the dialect lives here: reading and validating a body against the
endpoint's schema (``serve/schema.py``), the API key, the model names the mesh answers to, the
tokenizer and the chat template, submitting a request to the entry under a request id that the
logs carry, reading its events with keep-alives on idle streams (``EventReader``), collecting an
answer, and mapping the mesh's errors to statuses. A dialect writes only its shapes: its error
JSON (``ApiError.openai`` / ``ApiError.ollama``), its chunks and its final object. So the two
answer the same request with the same tokens, and an error is one status in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from meshllm.errors import ContextLengthError, MeshError, SamplingError, UserError
from meshllm.obs.logs import bound, client_request_id
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.entry import Event, NotReady, QueueFull
from meshllm.serve.schema import first_error

log = logging.getLogger("meshllm.serve.front")

B = TypeVar("B", bound=BaseModel)

# What the entry can compute at the head stage beyond tokens, as the entry declares it
# (``Entry.features``): a request asking for one the entry lacks is refused (400), not answered
# without it.
PENALTIES: Final = "penalties"  # presence/frequency penalties over the generated tokens
LOGPROBS: Final = "logprobs"  # Event.logprob and Event.top_logprobs
PROMPT_LOGPROBS: Final = "prompt_logprobs"  # the prompt's logprobs (completions' echo + logprobs)


class ApiError(Exception):
    """A request answered with an error status, in whichever dialect asked."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.counted = False  # the entry counted this request already (meshllm_requests_total)

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def ollama(self) -> web.Response:
        """Ollama's error JSON: ``{"error": "..."}``."""
        return web.json_response({"error": self.message}, status=self.status, headers=self.headers)


def refuse(param: str, what: str) -> ApiError:
    """A known field asking for what this mesh cannot do."""
    return ApiError(400, f"{what} is not supported by this mesh ('{param}')", code="unsupported_value", param=param)


def mesh_error(e: MeshError, retry_after: int) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(e, NotReady):
        return ApiError(503, str(e), "service_unavailable", "unavailable", headers={"Retry-After": str(retry_after)})
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), "invalid_request_error", "context_length_exceeded", "messages")
    if isinstance(e, UserError):
        return ApiError(400, str(e), "invalid_request_error", "invalid_value")
    return ApiError(500, str(e), "server_error", "internal_error")


def event_error(ev: Event) -> ApiError:
    if ev.code == "too_large":  # no decoder replica can ever hold it: the client must ask for less
        return ApiError(400, ev.error or "request too large", "invalid_request_error", "context_length_exceeded",
                        "max_tokens")
    status = 503 if ev.code in ("node_lost", "unreachable", "unavailable", "epoch_unloaded") else 500
    return ApiError(status, ev.error or "request failed", "server_error", ev.code or "request_failed")


async def read_raw(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body too large ({e.text})", code="body_too_large") from None


async def read_body(request: web.Request, schema: type[B]) -> B:
    """The request's body validated by ``schema``, or an ApiError: 413 too large, 400 not JSON, not
    an object, or a known field with a bad value (``param`` names it)."""
    raw = await read_raw(request)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        param, message, kind = first_error(e)
        code = "invalid_json" if kind in ("json_invalid", "json_type") or (kind == "model_type" and not param) \
            else "invalid_value"
        raise ApiError(400, message, code=code, param=param or None) from None


def sampling(kw: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


class _Idle:
    def __repr__(self) -> str:
        return "IDLE"


IDLE: Final = _Idle()  # what EventReader.next returns when nothing came in time
CLIENT_CHECK_S: Final = 0.5  # how often an answer that is not streamed checks that its client is still there


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


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's logprob and its likeliest alternatives (token id, logprob), as the head stage
    computed them (``runtime.sampling.logprobs_of``)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class Answer:
    """A whole answer, collected from a request's events."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    reason: str | None = None

    def add(self, ev: Event, logprobs: bool) -> None:
        if ev.token_id is not None:
            self.tokens.append(ev.token_id)
            if logprobs:
                self.logprobs.append(token_logprob(ev))
        self.text.append(ev.text)
        if ev.finish_reason is not None:
            self.reason = ev.finish_reason


def token_logprob(ev: Event) -> TokenLogprob:
    """An event's token with its logprobs; the entry promised them (``LOGPROBS``), so their
    absence is the mesh's failure, not a value to make up."""
    lp = getattr(ev, "logprob", None)
    if lp is None or ev.token_id is None:
        raise ApiError(500, f"the mesh sent token {ev.index} without the logprob asked for", "server_error",
                       "logprobs_missing")
    return TokenLogprob(ev.token_id, float(lp), tuple(getattr(ev, "top_logprobs", ()) or ()))


class Front:
    """The entry as both dialects see it: one per node, whatever dialects are mounted on it."""

    def __init__(self, serving: Any, model_name: str, model_id: str, *, api_key: str | None = None) -> None:
        self.serving = serving
        self.api_key = api_key
        self.entry = serving.entry
        self.model = model_name
        self.model_id = model_id
        self.retry_after = serving.config.retry_after_s
        self.keepalive_s = serving.config.keepalive_s
        self.keepalives = 0  # keep-alives sent on idle streams (every dialect's)

    # --- what the mesh is and does ----------------------------------------------------------------
    @property
    def features(self) -> frozenset[str]:
        """What the entry computes beyond tokens (PENALTIES, LOGPROBS, PROMPT_LOGPROBS)."""
        return frozenset(getattr(self.entry, "features", ()))

    def require(self, feature: str, param: str, what: str) -> None:
        if feature not in self.features:
            raise ApiError(400, f"{what} is not supported yet by this mesh ('{param}')", code="unsupported_value",
                           param=param)

    def authorized(self, request: web.Request) -> bool:
        """Without an API key, everyone; with one, requests that carry it (``Authorization: Bearer KEY``)."""
        if not self.api_key:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())

    def serves(self, model: Any) -> bool:
        """Whether a request's ``model`` names what this mesh serves (absent: yes)."""
        return model is None or model in (self.model, self.model_id, "meshllm", "default")

    def tokenizer(self) -> Any:
        tok = self.entry.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids")
        return tok

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            return list(self.tokenizer().encode_chat(messages))
        except MeshError as e:
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None

    def token_text(self, token_id: int) -> str:
        """One token as text (a byte-level piece may be a lone replacement character)."""
        tok = self.entry.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else ""

    def check_bias(self, bias: dict[str, float] | None, param: str = "logit_bias") -> dict[int, float]:
        out = {int(k): v for k, v in (bias or {}).items()}
        bad = [t for t in out if t >= self.entry.vocab_size]
        if bad:
            raise ApiError(400, f"{param} names token {bad[0]}, outside the vocabulary [0, {self.entry.vocab_size})",
                           code="invalid_value", param=param)
        return out

    def params(self, max_tokens: int, *, prefix: str = "", temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, ignore_eos: bool | None = None,
               presence_penalty: float | None = None, frequency_penalty: float | None = None,
               logit_bias: dict[str, float] | None = None, logprobs: int | None = None,
               speculate: bool | None = None) -> SamplingParams:
        """A request's sampling parameters from its fields (both dialects' names are OpenAI's);
        ``prefix`` is where the fields sit in the body (Ollama's ``options.``), for the errors."""
        kw: dict[str, Any] = {"max_tokens": max_tokens}
        for name, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("stop", stop), ("ignore_eos", ignore_eos), ("logprobs", logprobs), ("speculate", speculate)):
            if v is not None:
                kw[name] = v
        for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if v:
                self.require(PENALTIES, prefix + name, "a presence or frequency penalty")
                kw[name] = v
        if logit_bias:
            kw["logit_bias"] = self.check_bias(logit_bias, prefix + "logit_bias")
        return sampling(kw)

    # --- a request --------------------------------------------------------------------------------
    def guard(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
              render: Callable[[ApiError], web.Response], unauthorized: str) -> Any:
        """``handler`` behind the API key, its refusals counted and rendered in the dialect's JSON."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.authorized(request):
                self.entry.metrics.rejected("invalid_api_key")
                return render(ApiError(401, unauthorized, "invalid_request_error", "invalid_api_key"))
            try:
                return await handler(request)
            except ApiError as e:
                if not e.counted:  # refused before the entry (bad JSON, unknown model...): it still counts
                    self.entry.metrics.rejected(e.code or "invalid")
                return render(e)

        return guarded

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

    async def start(self, ids: list[int], params: SamplingParams, keepalive: float | None, *,
                    request_id: str | None = None, prompt_logprobs: bool = False,
                    client: web.Request | None = None) -> tuple[EventReader, Event | _Idle]:
        """Submit a request to the entry (every dialect goes through here): its events and the
        first one, or IDLE when a streaming answer should start before it (``keepalive`` seconds
        passed). Bad input, a full queue and no plan raise at once (an ApiError), before any byte
        of the answer."""
        kw: dict[str, Any] = {"request_id": request_id}
        if prompt_logprobs:
            kw["prompt_logprobs"] = True
        events = EventReader(self.entry.generate(ids, params, **kw))
        try:
            first = await (events.next(keepalive) if client is None
                           else self._next_while_connected(events, client, keepalive))
        except MeshError as e:
            await events.aclose()
            raise mesh_error(e, self.retry_after) from None
        except BaseException:  # the handler was cancelled (its client went away): end the request
            await events.aclose()
            raise
        if first is None:
            await events.aclose()
            raise ApiError(500, "the request ended without an answer", "server_error")
        return events, first

    @staticmethod
    async def _next_while_connected(events: EventReader, client: web.Request,
                                    idle_after: float | None = None) -> Event | _Idle | None:
        """The next event while the client is still connected, or IDLE after ``idle_after`` s. An
        answer that is not streamed writes nothing before the end, nor does a stream before its
        first event: a client that went away (a timeout, a retry) is noticed here, and its request
        ends everywhere instead of going on for nobody."""
        waited = 0.0
        while True:
            transport = client.transport
            if transport is None or transport.is_closing():
                await events.aclose()
                raise ApiError(499, "the client closed the connection", "invalid_request_error", "client_gone")
            step = CLIENT_CHECK_S if idle_after is None else min(CLIENT_CHECK_S, idle_after - waited)
            ev = await events.next(step)
            if ev is not IDLE:
                return ev
            waited += step
            if idle_after is not None and waited >= idle_after:
                return IDLE

    async def collect(self, events: EventReader, first: Event | _Idle, *, logprobs: bool = False,
                      prompt: list[int] | None = None, on_token: Callable[[], None] | None = None,
                      client: web.Request | None = None) -> Answer:
        """A whole answer (a request not streamed), with its tokens' logprobs if ``logprobs`` and
        the logprobs of ``prompt`` if given; a failure raises its ApiError."""
        out = Answer()
        ev: Event | _Idle | None = first
        async with events:
            while ev is not None:
                if isinstance(ev, Event):
                    if ev.error is not None:
                        raise event_error(ev)
                    if prompt is not None and out.prompt_logprobs is None:
                        out.prompt_logprobs = prompt_logprobs_of(ev, prompt)
                    out.add(ev, logprobs)
                    if on_token is not None and ev.token_id is not None:
                        on_token()
                    if ev.finish_reason is not None:
                        break
                ev = await (events.next() if client is None else self._next_while_connected(events, client))
        return out

    async def events(self, events: EventReader, first: Event | _Idle) -> AsyncIterator[Event | _Idle]:
        """A streamed request's events, IDLE whenever ``keepalive_s`` passes without one (the
        dialect writes its keep-alive, which this counts); ends after the last event. Closing the
        reader (``async with events``) is the caller's."""
        ev: Event | _Idle | None = first
        while ev is not None:
            if ev is IDLE:
                self.keepalives += 1
            yield ev
            if isinstance(ev, Event) and (ev.error is not None or ev.finish_reason is not None):
                return
            ev = await events.next(self.keepalive_s)


def prompt_logprobs_of(ev: Event, prompt: list[int]) -> list[TokenLogprob]:
    """The logprobs of ``prompt``, which the first event brings when they were asked for: one
    ``(logprob, top)`` per prompt token after the first (``runtime.sampling.prompt_logprobs``)."""
    got = getattr(ev, "prompt_logprobs", None)
    if got is None or len(got) != len(prompt) - 1:
        raise ApiError(500, "the mesh sent no prompt logprobs, or not one per prompt token after the first",
                       "server_error", "logprobs_missing")
    return [TokenLogprob(t, float(lp), tuple(top)) for t, (lp, top) in zip(prompt[1:], got, strict=True)]


def log_user(user: str | None) -> None:
    """OpenAI's ``user``: an end user's id, for the operator's logs."""
    if user:
        log.info("request for user %r", user[:256])
