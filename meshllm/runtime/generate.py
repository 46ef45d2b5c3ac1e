"""The single-process generation loop over a ``StageRunner`` that holds every block.

Prefill each prompt, then decode one token per step for all live sequences together (ragged
lengths, one ``decode`` call per step), sampling each row with its own request's parameters;
token i of a request draws from ``token_rng(seed, i)`` (its base seed: ``params.seed`` or entropy
picked once at its start), so its tokens never depend on the batch it shares. A sequence ends on EOS (unless ``ignore_eos``), on a stop string (the stop text is not
returned; the token ids that produced it are), or after ``max_tokens``. Its KV slot is freed the
moment it ends, and on any error.

``iter_batch`` is the core and streams ``(index, StreamEvent)`` pairs; ``generate_stream``,
``generate`` and ``generate_batch`` are thin wrappers over it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from meshllm.errors import CapacityError, ContextLengthError, MeshError, ModelError, SamplingError, UserError
from meshllm.model.config import ModelConfig
from meshllm.model.tokenizer import StreamDecoder, Tokenizer
from meshllm.runtime.sampling import SamplingParams, request_seed, sample_one, token_rng

# The finish reasons, defined once for the whole house (OpenAI's names); the serving layer and this
# loop both decide with ``finish_reason``.
FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_tokens reached


def finish_reason(token: int, index: int, params: SamplingParams, eos: Collection[int]) -> str | None:
    """Whether generated token ``index`` (counted from 0) ends generation: EOS (unless
    ``ignore_eos``) or the last of ``max_tokens``. Stop strings are decided where the tokenizer is."""
    if token in eos and not params.ignore_eos:
        return FINISH_STOP
    if index + 1 >= params.max_tokens:
        return FINISH_LENGTH
    return None


class Runner(Protocol):
    """What the loop needs from ``meshllm.runtime.runner.StageRunner`` (all blocks)."""

    def alloc(self, seq_id: Hashable, max_len: int) -> None: ...
    def free(self, seq_id: Hashable) -> None: ...
    def prefill(self, seq_id: Hashable, x: np.ndarray, *, last_only: bool = True) -> np.ndarray: ...
    def decode(self, seq_ids: Sequence[Hashable], x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One generated token of one sequence."""

    token_id: int
    text: str  # text released by this token ("" while held back); the final event also flushes
    finish_reason: str | None = None  # None until the sequence's last event


@dataclass(frozen=True, slots=True)
class GenerationResult:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # every generated token, EOS and stop-string tokens included
    # The text that continues the prompt (decoded with the prompt as left context, so a
    # SentencePiece leading space survives), cut before the first stop string; "" without a tokenizer.
    text: str
    finish_reason: str

    def to_json(self) -> dict[str, Any]:
        return {"prompt_token_ids": list(self.prompt_token_ids), "token_ids": list(self.token_ids),
                "text": self.text, "finish_reason": self.finish_reason}


def check_context(n_prompt: int, max_tokens: int, max_position: int) -> None:
    """A request must fit the context: prompt tokens + tokens asked for <= context length."""
    if n_prompt + max_tokens > max_position:
        raise ContextLengthError(
            f"prompt of {n_prompt} tokens plus max_tokens {max_tokens} exceeds the model's context "
            f"of {max_position} tokens (shorten the prompt or lower max_tokens to "
            f"{max(max_position - n_prompt, 0)})")


def check_prompt(ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    if len(ids) == 0:
        raise UserError("the prompt is empty: need at least one token")
    out = tuple(int(i) for i in ids)
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return out


@dataclass(slots=True)
class _Seq:
    """Per-request state of the loop (mutable, private to one ``iter_batch`` call)."""

    index: int
    seq_id: Hashable
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int  # base seed: token i samples with token_rng(seed, i)
    decoder: StreamDecoder | None
    eos: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    done: bool = False

    def sample(self, logits: np.ndarray) -> int:
        """The next token from one row of logits (V,)."""
        return sample_one(logits, self.params, token_rng(self.seed, len(self.tokens)), history=self.tokens)

    def accept(self, token: int) -> StreamEvent:
        """Record a sampled token; decide whether the sequence ends with it."""
        self.tokens.append(token)
        text = self.decoder.push(token) if self.decoder is not None else ""
        stopped = self.decoder is not None and self.decoder.stopped
        reason = FINISH_STOP if stopped else finish_reason(token, len(self.tokens) - 1, self.params, self.eos)
        if reason is not None:
            self.done = True
            if self.decoder is not None:
                text += self.decoder.finish()
        return StreamEvent(token, text, reason)


def _model_config(runner: Any) -> ModelConfig:
    manifest = getattr(runner, "manifest", None)
    cfg = getattr(manifest, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ModelError("the runner exposes no model config (runner.manifest.config)")
    first, end = getattr(runner, "first", 0), getattr(runner, "end", cfg.num_blocks)
    if (first, end) != (0, cfg.num_blocks):
        raise ModelError(f"generation needs a runner over all blocks [0, {cfg.num_blocks}), "
                         f"got [{first}, {end})")
    return cfg


def iter_batch(runner: Runner, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams], *,
               tokenizer: Tokenizer | None = None,
               seeds: Sequence[int] | None = None,
               eos_token_ids: Sequence[int] | None = None,
               config: ModelConfig | None = None,
               max_batch: int | None = None) -> Iterator[tuple[int, StreamEvent]]:
    """Generate for several prompts at once; yields ``(prompt index, event)`` as tokens appear.

    ``params``: one for all prompts or one per prompt. ``seeds``: one base seed per prompt
    (default ``request_seed(params)`` each); token i of a prompt samples with
    ``token_rng(seed, i)``, so a seeded prompt samples the same tokens alone or in a batch.
    EOS ids default to the tokenizer's, else the model config's. Every KV slot this allocates
    is freed when its sequence ends, when the caller stops iterating, or on error.
    Bad input (prompt, context length, parameters) raises here, before anything is allocated.

    Prompts are admitted as room allows (continuous batching): at most ``max_batch`` decode
    together, and a prompt that finds no free KV slot waits until a running sequence ends.
    """
    if max_batch is not None and max_batch < 1:
        raise UserError(f"max_batch must be at least 1, got {max_batch}")
    cfg = config if config is not None else _model_config(runner)
    n = len(prompts)
    plist = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(plist) != n:
        raise SamplingError(f"{n} prompts need {n} sampling parameter sets, got {len(plist)}")
    if seeds is not None and len(seeds) != n:
        raise SamplingError(f"{n} prompts need {n} seeds, got {len(seeds)}")
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_token_ids if tokenizer and tokenizer.eos_token_ids else cfg.eos_token_ids
    eos = frozenset(int(i) for i in eos_token_ids)
    seqs: list[_Seq] = []
    for i, (ids, p) in enumerate(zip(prompts, plist, strict=True)):
        prompt = check_prompt(ids, cfg.vocab_size)
        check_context(len(prompt), p.max_tokens, cfg.max_position)
        if p.stop and tokenizer is None:
            raise SamplingError("stop strings need a tokenizer (this model has none)")
        decoder = tokenizer.stream(stop=p.stop, prompt_ids=prompt) if tokenizer is not None else None
        seed = int(seeds[i]) if seeds is not None else request_seed(p)
        if not 0 <= seed < 2**64:
            raise SamplingError(f"seed must be in [0, 2**64), got {seed}")
        seqs.append(_Seq(i, ("gen", id(seqs), i), prompt, p, seed, decoder, eos))

    return _run(runner, seqs, max_batch)


def _run(runner: Runner, seqs: list[_Seq], max_batch: int | None) -> Iterator[tuple[int, StreamEvent]]:
    pending = deque(seqs)
    live: list[_Seq] = []
    allocated: list[_Seq] = []

    def finish(s: _Seq) -> None:
        runner.free(s.seq_id)
        allocated.remove(s)

    try:
        while pending or live:
            # Admit waiting prompts while there is room: a KV slot (the runner says when there
            # is none) and, if given, a batch limit. A finished sequence frees room for the next.
            while pending and (max_batch is None or len(live) < max_batch):
                s = pending[0]
                try:
                    runner.alloc(s.seq_id, len(s.prompt) + s.params.max_tokens)
                except CapacityError:
                    if not live:
                        raise  # nothing will ever free room for it
                    break
                pending.popleft()
                allocated.append(s)
                logits = runner.prefill(s.seq_id, np.asarray(s.prompt, dtype=np.int64))  # (V,)
                ev = s.accept(s.sample(np.asarray(logits).reshape(-1)))
                if s.done:
                    finish(s)
                else:
                    live.append(s)
                yield s.index, ev
            if not live:
                continue
            last = np.asarray([s.tokens[-1] for s in live], dtype=np.int64)  # (B,)
            logits = np.asarray(runner.decode([s.seq_id for s in live], last))  # (B, V)
            still = []
            events = []
            for row, s in enumerate(live):
                ev = s.accept(s.sample(logits[row]))
                events.append((s.index, ev))
                if s.done:
                    finish(s)
                else:
                    still.append(s)
            live = still
            yield from events
    finally:
        for s in allocated:
            with contextlib.suppress(MeshError):  # already gone: nothing to release
                runner.free(s.seq_id)


def generate_stream(runner: Runner, prompt_ids: Sequence[int], params: SamplingParams, *,
                    tokenizer: Tokenizer | None = None, seed: int | None = None,
                    eos_token_ids: Sequence[int] | None = None,
                    config: ModelConfig | None = None) -> Iterator[StreamEvent]:
    """One prompt: yields a ``StreamEvent`` per generated token; the last has a finish_reason."""
    for _, ev in iter_batch(runner, [prompt_ids], params, tokenizer=tokenizer,
                            seeds=None if seed is None else [seed], eos_token_ids=eos_token_ids,
                            config=config):
        yield ev


def generate_batch(runner: Runner, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams], *,
                   tokenizer: Tokenizer | None = None,
                   seeds: Sequence[int] | None = None,
                   eos_token_ids: Sequence[int] | None = None,
                   config: ModelConfig | None = None,
                   max_batch: int | None = None) -> list[GenerationResult]:
    """Several prompts decoded together; results in prompt order."""
    tokens: list[list[int]] = [[] for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    reasons: list[str] = [FINISH_LENGTH] * len(prompts)
    for i, ev in iter_batch(runner, prompts, params, tokenizer=tokenizer, seeds=seeds,
                            eos_token_ids=eos_token_ids, config=config, max_batch=max_batch):
        tokens[i].append(ev.token_id)
        texts[i].append(ev.text)
        if ev.finish_reason is not None:
            reasons[i] = ev.finish_reason
    return [GenerationResult(tuple(int(x) for x in p), tuple(t), "".join(x), r)
            for p, t, x, r in zip(prompts, tokens, texts, reasons, strict=True)]


def generate(runner: Runner, prompt_ids: Sequence[int], params: SamplingParams, *,
             tokenizer: Tokenizer | None = None, seed: int | None = None,
             eos_token_ids: Sequence[int] | None = None,
             config: ModelConfig | None = None) -> GenerationResult:
    """One prompt, all at once."""
    return generate_batch(runner, [prompt_ids], params, tokenizer=tokenizer,
                          seeds=None if seed is None else [seed], eos_token_ids=eos_token_ids,
                          config=config)[0]
