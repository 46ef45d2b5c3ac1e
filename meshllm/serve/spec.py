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

``StepCost`` is what a ring's step costs, measured at its stage 0 from the time a step takes to come
back (the core's ``now``, no clock): ``T = T1 + C * D`` for a step that carries ``D`` drafts in
all (every row's positions run in one pass; a draft adds one row to every matrix product), ``T1``
the step without drafts. The rows of a step are given drafts one after another, each the ``k``
(up to its adapted length) that maximises the step's expected tokens per second,
``(N + E + a + a^2 + ... + a^k) / (T1 + C (D + k))``: ``N`` the rows (a token each), ``E`` and
``D`` the expected kept drafts and the drafts of the rows before, ``a`` the row's measured chance
that a draft holds. A draft pays when its chance beats the step's cost per token: on one stream
where the trip or the weights' streaming dominate (``C`` small against ``T1``), not in a batch
whose compute already grows with every row (8 rows: ``a`` must beat about ``8 C / T1``).

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
    kept: float = 0.0  # decayed counts of drafts kept and of drafts reached (kept, or the first miss)
    reached: float = 0.0
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

    def hold_rate(self) -> float:
        """The chance that a draft holds, given the ones before it did (a prior of 1/2)."""
        return (self.kept + 1.0) / (self.reached + 2.0)

    def update(self, drafted: int, accepted: int) -> None:
        """The head kept ``accepted`` of ``drafted`` drafts of one step."""
        if drafted <= 0:
            return
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.kept = self.kept * 0.8 + accepted
        self.reached = self.reached * 0.8 + accepted + (1 if accepted < drafted else 0)
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


def expected_kept(k: int, hold: float) -> float:
    """Drafts expected to hold of ``k``, each holding with chance ``hold`` given the ones before."""
    return sum(hold ** j for j in range(1, k + 1))


class StepCost:
    """A ring's step time as ``T1 + C * D`` (``D``: the drafts the step carried, all rows), from
    steps measured at its stage 0; exponentially weighted, so it follows load."""

    PLAIN_EVERY = 32  # steps after which one without drafts is due (to measure ``O + C`` afresh)

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.t1: float | None = None  # a step of one position per row
        self.c: float | None = None  # each draft
        self.since_plain = 0

    def _ema(self, old: float | None, x: float) -> float:
        return x if old is None else old + self.weight * (x - old)

    def observe(self, drafts: int, seconds: float) -> None:
        """A step that carried ``drafts`` drafts (all rows) came back after ``seconds``."""
        if seconds < 0 or drafts < 0:
            return
        if drafts == 0:
            self.t1 = self._ema(self.t1, seconds)
            self.since_plain = 0
            return
        self.since_plain += 1
        if self.t1 is not None:
            self.c = self._ema(self.c, max(0.0, (seconds - self.t1) / drafts))

    def plain_due(self) -> bool:
        """No one-position step measured lately: the next step should carry no drafts."""
        return self.since_plain >= self.PLAIN_EVERY

    def best_k(self, cap: int, hold: float, tokens: float = 1.0, drafts: int = 0) -> int:
        """The draft length up to ``cap`` for a row with the most expected tokens per second for
        its step, where the rows decided so far give ``tokens`` expected tokens (one per row of
        the step, plus their expected kept drafts) with ``drafts`` drafts (``cap`` while the cost
        of a draft is not known yet)."""
        if cap <= 0:
            return 0
        if self.t1 is None or self.c is None:
            return cap
        c = max(self.c, 1e-9)
        t1 = max(self.t1, c)
        best_k, best, p = 0, tokens / (t1 + c * drafts), 1.0
        for k in range(1, cap + 1):
            p *= hold
            tokens += p
            rate = tokens / (t1 + c * (drafts + k))
            if rate > best * 1.02:  # a draft must pay clearly, not by noise
                best_k, best = k, rate
        return best_k
