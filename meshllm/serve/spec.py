"""Draft-free speculation, pure: what a decoder ring's stage 0 proposes to feed after a token.

A decode step may carry, after the token it feeds, up to ``k`` *draft* tokens per row: guesses of
what the head will sample next. Every stage computes all of them in the same step, the head
samples each position from the target distribution (``token_rng(seed, index)``, as without
speculation) and keeps drafts only while each equals the token it sampled there, so the tokens
are those of non-speculative decoding; a step gains one token per accepted draft.

``PromptLookup`` proposes by n-gram lookup over the request's prompt and the tokens generated so
far (llama.cpp's prompt lookup decoding): the longest recent suffix (``max_ngram`` down to
``min_ngram`` tokens) that occurred before, continued as it continued then. Of that n-gram's last
``candidates`` occurrences it continues the one whose match reaches furthest back (the most recent
among equals), so a long copy keeps following its source rather than a later, shorter echo of a
few of its tokens; ``matched`` is how far that match reaches (up to ``max_match`` tokens). Answers
that echo their prompt (rewrite, summarise, edit code) draft long runs; free text drafts little.

``DraftLength`` keeps, per request, the chance that a draft holds given the ones before it did,
by how long the match behind it is (``hold_rate(matched)``: a suffix of 1, 2, 3-4, 5-8 or 9 and
more tokens that occurred before, each class from a prior that a longer match holds more often,
``L / (L + 1)`` worth two drafts, then its decayed counts): a draft that continues a copy of
many tokens holds far more often than one that continues a single token, and a request's copy
runs and free stretches alternate. Its length ``k`` (what a node drafts when it does not weigh
the step's cost) adapts to acceptance: up by one after a step whose drafts all held, down to the
accepted count after a miss, and to 0 after ``patience`` drafted steps in a row that kept none;
then it tries one draft again after ``backoff`` steps (text turns repetitive later, e.g. a list).

``StepCost`` is what a ring's step costs, measured at its stage 0 from the time a step takes to come
back (the core's ``now``, no clock): ``T = T1 + F + C * D`` for a step that carries ``D > 0``
drafts in all (every row's positions run in one pass; a draft adds one row to every matrix
product; ``F`` what carrying drafts at all costs), ``T1`` the step without drafts. The rows of
a step are given drafts one after another, each the ``k`` (up to ``max_k``) that maximises the
step's expected tokens per second, ``(N + E + a + a^2 + ... + a^k) / (T1 + F + C (D + k))``: ``N``
the rows (a token each), ``E`` and ``D`` the expected kept drafts and the drafts of the rows
before, ``a`` the row's measured chance that a draft holds for the match its proposal continues.
A draft pays when its chance beats the step's cost per token: on one stream where the trip or
the weights' streaming dominate (``F + C`` small against ``T1``), not in a batch whose compute
already grows with every row (8 rows: ``a`` must beat about ``8 C / T1``).

A second proposer (a small draft model running beside stage 0) fits the same shape: anything with
``propose(k) -> tuple[int, ...]``, ``extend(tokens)`` and ``matched`` (the class its confidence
falls in).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class Proposer(Protocol):
    matched: int  # how strongly the last proposal is backed: the length of the match it continues

    def extend(self, tokens: Iterable[int]) -> None: ...
    def propose(self, k: int) -> tuple[int, ...]: ...


class PromptLookup:
    """n-gram lookup over a growing context; O(max_ngram) per token, O(candidates * max_match) per
    proposal."""

    def __init__(self, context: Iterable[int] = (), *, max_ngram: int = 3, min_ngram: int = 1,
                 candidates: int = 8, max_match: int = 64) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        if candidates < 1 or max_match < max_ngram:
            raise ValueError(f"need candidates >= 1 and max_match >= max_ngram, got {candidates}, {max_match}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.candidates = candidates
        self.max_match = max_match
        self.tokens: list[int] = []
        self.matched = 0  # how many tokens of the context's suffix the last proposal's match covers
        # n-gram -> where its continuations start, oldest first (only n-grams that have one)
        self._index: dict[tuple[int, ...], list[int]] = {}
        self.extend(context)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            p = len(self.tokens)  # the new token's position: it continues the n-grams ending at p - 1
            for n in range(self.min_ngram, self.max_ngram + 1):
                if p >= n:
                    self._index.setdefault(tuple(self.tokens[p - n:p]), []).append(p)
            self.tokens.append(int(t))

    def _reach(self, at: int, n: int) -> int:
        """How many tokens before ``at`` equal the context's last ones (``n`` known to)."""
        toks, end = self.tokens, len(self.tokens)
        m = n
        while m < self.max_match and at - m > 0 and toks[at - m - 1] == toks[end - m - 1]:
            m += 1
        return m

    def propose(self, k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens that followed the earlier occurrence of the context's longest known
        suffix whose match reaches furthest back."""
        self.matched = 0
        if k <= 0:
            return ()
        toks = self.tokens
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            found = self._index.get(tuple(toks[len(toks) - n:]))
            if not found:
                continue
            best, reach = found[-1], -1
            for at in reversed(found[-self.candidates:]):
                m = self._reach(at, n)
                if m > reach:
                    best, reach = at, m
            self.matched = reach
            return tuple(toks[best:best + k])
        return ()


# The classes of match length a draft's hold rate is kept for: each the match length it stands for
# in its prior (1; 2; 3-4; 5-8; 9 and more tokens).
MATCH_CLASSES = (1, 2, 3, 6, 12)
PRIOR_WEIGHT = 2.0
DECAY = 0.8


def match_class(matched: int) -> int:
    """The class of a match of ``matched`` tokens (a match of 0 or 1 is the first)."""
    return 0 if matched <= 1 else 1 if matched == 2 else 2 if matched <= 4 else 3 if matched <= 8 else 4


@dataclass(slots=True)
class DraftLength:
    """A request's chance that a draft holds, per class of the match behind it, and its draft
    length ``k`` (for a node that does not weigh the cost), adapted to how many of its drafts the
    head accepts."""

    max_k: int
    k: int = 0
    patience: int = 3  # drafted steps in a row with nothing accepted before k drops to 0
    backoff: int = 16  # steps at k = 0 before one draft is tried again
    misses: int = 0
    idle: int = 0
    # per class of match (``match_class``): decayed counts of drafts kept and of drafts reached
    # (kept, or the first miss)
    kept: list[float] = field(default_factory=lambda: [0.0] * len(MATCH_CLASSES))
    reached: list[float] = field(default_factory=lambda: [0.0] * len(MATCH_CLASSES))
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

    def hold_rate(self, matched: int = 1) -> float:
        """The chance that a draft continuing a match of ``matched`` tokens holds, given the ones
        before it did (a prior of ``L / (L + 1)`` for its class, worth ``PRIOR_WEIGHT`` drafts)."""
        c = match_class(matched)
        prior = MATCH_CLASSES[c] / (MATCH_CLASSES[c] + 1.0)
        return (self.kept[c] + prior * PRIOR_WEIGHT) / (self.reached[c] + PRIOR_WEIGHT)

    def update(self, drafted: int, accepted: int, matched: int = 1) -> None:
        """The head kept ``accepted`` of ``drafted`` drafts of one step, drafts that continued a
        match of ``matched`` tokens."""
        if drafted <= 0:
            return
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        c = match_class(matched)
        self.kept[c] = self.kept[c] * DECAY + accepted
        self.reached[c] = self.reached[c] * DECAY + accepted + (1 if accepted < drafted else 0)
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
    """A ring's step time as ``T1 + F + C * D`` for a step that carries ``D > 0`` drafts (all rows),
    ``T1`` without drafts, from steps measured at its stage 0; exponentially weighted, so it follows
    load. ``F`` is what carrying drafts at all costs (positions as rows through every stage, larger
    frames, a token sent per kept draft), ``C`` each draft: a line through the extra time measured
    at each draft count, weighted by how often each was seen (``F`` 0 while one count was seen)."""

    PLAIN_EVERY = 32  # steps after which one without drafts is due (to measure ``T1`` afresh)
    SEEN_CAP = 8.0  # a draft count's weight in the line: steps seen, up to this,
    FADE = 0.97  # and fading with every step of another count

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.t1: float | None = None  # a step of one position per row
        self.c: float | None = None  # each draft
        self.f = 0.0  # a step that carries drafts at all
        self.since_plain = 0
        self._extra: dict[int, float] = {}  # draft count -> its steps' time beyond T1
        self._seen: dict[int, float] = {}

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
        if self.t1 is None:
            return
        self._extra[drafts] = self._ema(self._extra.get(drafts), max(0.0, seconds - self.t1))
        for d in self._seen:  # counts not seen lately fade from the line
            self._seen[d] *= self.FADE
        self._seen[drafts] = min(self.SEEN_CAP, self._seen.get(drafts, 0.0) + 1.0)
        self._fit()

    def _fit(self) -> None:
        w = sum(self._seen.values())
        md = sum(n * d for d, n in self._seen.items()) / w
        me = sum(n * self._extra[d] for d, n in self._seen.items()) / w
        var = sum(n * (d - md) ** 2 for d, n in self._seen.items())
        c = sum(n * (d - md) * (self._extra[d] - me) for d, n in self._seen.items()) / var if var > 0 else -1.0
        f = me - c * md
        if c < 0 or f < 0:  # one count seen, or a line that does not fit the model: C alone
            c, f = me / md, 0.0
        self.c, self.f = c, f

    def cost(self, drafts: int) -> float:
        """A step's expected time with ``drafts`` drafts (``T1`` and ``C`` measured)."""
        assert self.t1 is not None and self.c is not None
        return self.t1 + (self.f + self.c * drafts if drafts > 0 else 0.0)

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
        best_k, best, p = 0, tokens / max(self.cost(drafts), 1e-9), 1.0
        for k in range(1, cap + 1):
            p *= hold
            tokens += p
            rate = tokens / max(self.cost(drafts + k), 1e-9)
            if rate > best * 1.02:  # a draft must pay clearly, not by noise
                best_k, best = k, rate
        return best_k
