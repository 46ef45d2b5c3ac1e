"""Draft-free speculation, pure: what a decoder ring's stage 0 proposes to feed after a token.

A decode step may carry, after the token it feeds, up to ``k`` *draft* tokens per row: guesses of
what the head will sample next. Every stage computes all of them in the same step, the head
samples each position from the target distribution (``token_rng(seed, index)``, as without
speculation) and keeps drafts only while each equals the token it sampled there, so the tokens
are those of non-speculative decoding; a step gains one token per accepted draft.

``PromptLookup`` proposes by n-gram lookup over the request's prompt and the tokens generated so
far (llama.cpp's prompt lookup decoding): the longest recent suffix (``max_ngram`` down to
``min_ngram`` tokens) that occurred before, continued as it continued then. Answers that echo
their prompt (rewrite, summarise, edit code) draft long runs; free text drafts little.

``DraftLength`` adapts ``k`` per request to its acceptance: up by one after a step whose drafts
all held, down to the accepted count after a miss, and to 0 after ``patience`` drafted steps in
a row that kept none; then it tries one draft again after ``backoff`` steps (text turns
repetitive later, e.g. a list).

A second proposer (a small draft model running beside stage 0) fits the same shape: anything with
``propose(k) -> tuple[int, ...]`` and ``extend(tokens)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class Proposer(Protocol):
    def extend(self, tokens: Iterable[int]) -> None: ...
    def propose(self, k: int) -> tuple[int, ...]: ...


class PromptLookup:
    """n-gram lookup over a growing context; O(max_ngram) per token."""

    def __init__(self, context: Iterable[int] = (), *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.tokens: list[int] = []
        # n-gram -> where its most recent continuation starts (only n-grams that have one)
        self._index: dict[tuple[int, ...], int] = {}
        self.extend(context)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            p = len(self.tokens)  # the new token's position: it continues the n-grams ending at p - 1
            for n in range(self.min_ngram, self.max_ngram + 1):
                if p >= n:
                    self._index[tuple(self.tokens[p - n:p])] = p
            self.tokens.append(int(t))

    def propose(self, k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens that followed the longest earlier occurrence of the context's suffix."""
        if k <= 0:
            return ()
        toks = self.tokens
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            at = self._index.get(tuple(toks[len(toks) - n:]))
            if at is not None:
                return tuple(toks[at:at + k])
        return ()


@dataclass(slots=True)
class DraftLength:
    """A request's draft length ``k``, adapted to how many of its drafts the head accepts."""

    max_k: int
    k: int = 0
    patience: int = 3  # drafted steps in a row with nothing accepted before k drops to 0
    backoff: int = 16  # steps at k = 0 before one draft is tried again
    misses: int = 0
    idle: int = 0
    drafted: int = 0  # totals, for the figures
    accepted: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        self.k = self.max_k if self.k == 0 else self.k

    def want(self) -> int:
        """How many drafts the next step may carry."""
        if self.k == 0:
            self.idle += 1
            if self.idle >= self.backoff:
                self.idle = 0
                self.k = 1 if self.max_k else 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """The head kept ``accepted`` of ``drafted`` drafts of one step."""
        if drafted <= 0:
            return
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if accepted == 0:
            self.misses += 1
            if self.misses >= self.patience:
                self.k = 0
                self.idle = 0
                return
        else:
            self.misses = 0
        if accepted >= drafted:
            self.k = min(self.max_k, max(self.k, drafted) + 1)
        else:
            self.k = max(1, accepted)
