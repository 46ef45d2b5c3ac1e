"""The request bodies both HTTP dialects accept, one schema per endpoint (pydantic v2).

Each schema states every field the endpoint knows: its type, its range, its enum. A known field
with a bad value is a 400 naming the field (``invalid_field``); a field no schema knows is
ignored, as OpenAI's API does. What a field asks for that the mesh cannot do (``n > 1``, tools,
structured output...) is refused by the dialect after validation, with the field named too: no
known field is dropped silently. Validation is strict (``"1"`` is not a number, ``true`` is not
an integer) and parses the raw body itself (pydantic's JSON parser: nesting past its limit is a
validation error like any other, never a RecursionError).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# -- common ---------------------------------------------------------------------------------------

Int64 = Annotated[int, Field(ge=0, lt=2**64)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopStrings = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=16)]
Stop = Annotated[str, Field(min_length=1, max_length=256)] | StopStrings
TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # logit_bias's keys: token ids as JSON strings


class Body(BaseModel):
    """Strict types, unknown fields ignored, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


# -- OpenAI ---------------------------------------------------------------------------------------

class ContentPart(Body):
    """One part of a message's content. Only text (and an assistant's refusal) can be served."""

    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: str | None = None
    refusal: str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None


class StreamOptions(Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ResponseFormat(Body):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    type: Literal["text", "json_object", "json_schema"]


class OpenAICommon(Body):
    """The fields chat and completions share."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Int64 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[TokenKey, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # extensions (vLLM's spelling)
    top_k: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    speculate: bool | None = None  # meshllm: speculative decoding for this request (None: the node's default)


class ChatRequest(OpenAICommon):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(OpenAICommon):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (one prompt: a list
    of one string or one list of ids is that prompt; more than one is refused)."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    suffix: str | None = None


# -- Ollama ---------------------------------------------------------------------------------------

class OllamaOptions(Body):
    """``options``: the sampler's (honoured), the runtime's hints (no effect on the answer:
    accepted), and the samplers this mesh does not have (refused unless at their neutral value)."""

    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: Int64 | None = None
    stop: Stop | None = None
    num_predict: Annotated[int, Field(ge=-2)] | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # samplers not built: refused unless neutral (value -> its neutral value in OLLAMA_NEUTRAL)
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    # runtime hints: how llama.cpp runs, not what it answers
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    vocab_only: bool | None = None
    numa: bool | None = None
    logits_all: bool | None = None
    embedding_only: bool | None = None


# option -> the value at which it changes nothing (what Ollama's sampler does with it then)
OLLAMA_NEUTRAL: dict[str, Any] = {"repeat_penalty": 1.0, "min_p": 0.0, "typical_p": 1.0, "tfs_z": 1.0,
                                  "mirostat": 0}
# options that only tune a sampler named in OLLAMA_NEUTRAL (harmless while that one is neutral)
OLLAMA_TUNING = ("repeat_last_n", "mirostat_tau", "mirostat_eta", "penalize_newline")


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None
    tool_name: str | None = None


class OllamaCommon(Body):
    model: Annotated[str, Field(min_length=1)]
    options: OllamaOptions | None = None
    stream: bool | None = None
    keep_alive: str | int | float | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None


class OllamaChatRequest(OllamaCommon):
    """``POST /api/chat``; no messages (or none) loads the model."""

    messages: list[OllamaMessage] | None = None
    tools: list[Any] | None = None


class OllamaGenerateRequest(OllamaCommon):
    """``POST /api/generate``; no prompt and no context loads the model."""

    prompt: str = ""
    suffix: str | None = None
    images: list[Any] | None = None
    system: str | None = None
    template: str | None = None
    context: list[TokenId] | None = None
    raw: bool | None = None


class OllamaShowRequest(Body):
    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


# -- errors ---------------------------------------------------------------------------------------

_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _is_field(part: object) -> bool:
    """Whether a pydantic location part names a field or an index (not a union arm's tag such as
    ``str`` or ``list[ContentPart]``)."""
    if isinstance(part, int):
        return True
    s = str(part)
    return s not in _TYPE_NAMES and s[:1].islower() and all(c.isalnum() or c == "_" for c in s)


def field_path(loc: tuple[int | str, ...]) -> str:
    """A location as OpenAI writes ``param``: ``messages.[0].content``."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if _is_field(p)]
    return ".".join(parts)[:200]


def first_error(e: ValidationError) -> tuple[str, str, str]:
    """The error to report of a failed validation: (param, message, pydantic's type). Of a union's
    arms it reports the one that got furthest into the value (a list of parts with one bad part
    is about that part, not about the value not being a string)."""
    errors = e.errors(include_url=False, include_input=False)
    best = max(errors, key=lambda d: len([p for p in d["loc"] if _is_field(p)]))
    param = field_path(tuple(best["loc"]))
    msg = str(best["msg"])[:300]
    kind = str(best["type"])
    if kind == "json_invalid":
        return "", f"the body is not valid JSON: {msg}", kind
    if kind == "model_type" and not param:
        return "", "the body must be a JSON object", kind
    return param, (f"invalid '{param}': {msg}" if param else msg), kind
