"""Token sampling: greedy, temperature, top-k, top-p, OpenAI's penalties and logit bias, and the
logprobs of what was chosen — pure numpy, no global state.

Randomness is a function of (seed, token index), never a stateful stream: a request has one
base seed (``request_seed(params)``: its ``seed``, or fresh entropy picked once when it starts)
and samples its token i with ``token_rng(seed, i)``. So a batch may mix requests with different
parameters, a seeded request draws the same tokens whichever batch it shares a step with, and a
request resumed on another node at token i draws tokens i, i+1, ... exactly as it would have.
Each sampled (non-greedy) token consumes exactly one uniform draw from its generator.

One row of logits goes through, in this order: ``adjust`` (presence and frequency penalties over
the tokens generated so far, then ``logit_bias``; OpenAI's formula), then greedy argmax or
temperature, top-k and top-p (``candidates``). Logprobs (``logprobs_of``) are the log-softmax of
the *adjusted* row: after penalties and bias, before temperature, top-k and top-p. So they are
the model's distribution as this request shaped it, the same whatever the temperature (a greedy
request's logprobs are not the degenerate 0 / -inf of argmax), and with no penalties and no bias
they are the model's own. Prompt logprobs (``prompt_logprobs``) are the model's own distribution
at each prompt position (penalties count generated tokens only, and bias shapes what is generated).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm.errors import SamplingError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's chat limit)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request, and when to stop.

    ``temperature == 0`` means greedy (argmax; top-k/top-p then have no effect). ``top_k == 0``
    and ``top_p == 1`` disable those filters. ``max_tokens`` counts generated tokens (EOS
    included). ``stop`` strings end generation; the stop text itself is not returned.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    # speculative decoding on a decoder ring: None follows the node's default; it never changes
    # the tokens, only how many a decode step may yield
    speculate: bool | None = None

    def __post_init__(self) -> None:
        # Accept a list (JSON) or a single string for `stop`, store a tuple so the object hashes.
        stop = self.stop
        if stop is None:  # JSON requests send null for "no stop strings"
            stop = ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (tuple, list)):
            raise SamplingError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        problems = _problems(self)
        if problems:
            raise SamplingError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts(self) -> bool:
        """Whether ``adjust`` changes a row (penalties or bias set)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """From ``to_dict`` or a request body (unknown keys are an error, so typos do not pass
        silently; keys left out take their defaults, so a dict from before a field existed loads)."""
        if not isinstance(d, dict):
            raise SamplingError("sampling parameters must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise SamplingError(f"unknown sampling parameters: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = self._dict()
        if self.speculate is None:  # the default: frames stay as they were before the field existed
            del d["speculate"]
        return d

    def _dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "seed": self.seed, "max_tokens": self.max_tokens, "stop": list(self.stop),
                "ignore_eos": self.ignore_eos, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "logit_bias": [[t, b] for t, b in self.logit_bias], "logprobs": self.logprobs,
                "speculate": self.speculate}


def _bias_pairs(bias: Any) -> Any:
    """``logit_bias`` as sorted (token id, bias) pairs; what cannot be read so is left for
    ``_problems`` to name."""
    if bias is None:
        return ()
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, (tuple, list)):
        items = list(bias)
    else:
        return bias
    pairs = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not _is_int(item[0]) or not _is_real(item[1]):
            return bias
        pairs.append((int(item[0]), float(item[1])))
    pairs.sort()
    if len({t for t, _ in pairs}) != len(pairs):
        return bias
    return tuple(pairs)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _problems(p: SamplingParams) -> list[str]:
    out = []
    if not _is_real(p.temperature) or not math.isfinite(p.temperature) or p.temperature < 0:
        out.append(f"temperature must be a finite number >= 0, got {p.temperature!r}")
    if not _is_int(p.top_k) or p.top_k < 0:
        out.append(f"top_k must be an integer >= 0 (0 disables it), got {p.top_k!r}")
    if not _is_real(p.top_p) or not (0.0 < p.top_p <= 1.0):
        out.append(f"top_p must be in (0, 1], got {p.top_p!r}")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed < 2**64):
        out.append(f"seed must be an integer in [0, 2**64) or null, got {p.seed!r}")
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        out.append(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
    if not isinstance(p.ignore_eos, bool):
        out.append(f"ignore_eos must be true or false, got {p.ignore_eos!r}")
    if p.speculate is not None and not isinstance(p.speculate, bool):
        out.append(f"speculate must be true, false or null, got {p.speculate!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not _is_real(v) or not math.isfinite(v) or not -2.0 <= v <= 2.0:
            out.append(f"{name} must be a number in [-2, 2], got {v!r}")
    if not isinstance(p.logit_bias, tuple):
        out.append("logit_bias must map distinct token ids (integers) to biases (numbers)")
    else:
        if len(p.logit_bias) > MAX_LOGIT_BIAS:
            out.append(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(p.logit_bias)}")
        for t, b in p.logit_bias:
            if t < 0 or not math.isfinite(b) or not -100.0 <= b <= 100.0:
                out.append(f"logit_bias maps token ids >= 0 to biases in [-100, 100], got {t}: {b!r}")
                break
    if p.logprobs is not None and (not _is_int(p.logprobs) or not 0 <= p.logprobs <= MAX_LOGPROBS):
        out.append(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {p.logprobs!r}")
    if len(p.stop) > MAX_STOP_STRINGS:
        out.append(f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
    for s in p.stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            out.append(f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} "
                       f"characters, got {s!r}")
            break
    return out


def request_seed(params: SamplingParams) -> int:
    """The base seed of one request: its own seed, or fresh entropy (pick it once, when the
    request starts, and carry it along with the request)."""
    if params.seed is not None:
        return int(params.seed)
    return secrets.randbits(64)


def token_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for token ``index`` (0 = the first generated token) of a request with base
    seed ``seed``: an independent stream per pair (Philox keyed by the seed, the index as its
    counter's high word: distinct pairs never share a block of the stream). Making one and
    drawing once measured 16 us, a SeedSequence of the pair 17 us: either is small beside a
    decode step."""
    if not 0 <= seed < 2**64 or not 0 <= index < 2**64:
        raise SamplingError(f"token_rng: seed and index must be in [0, 2**64), got {seed}, {index}")
    return np.random.Generator(np.random.Philox(counter=[0, 0, 0, index], key=seed))


def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a non-greedy ``params`` may draw from one row of logits, with their probabilities.

    logits: (V,) -> (ids (n,), probs (n,) float64 summing to 1). Temperature, then top-k, then
    top-p, in transformers' order. Top-p sorts only as many of the likeliest tokens as it needs
    (a full sort of a 32k vocabulary costs more than a small model's decode step).
    """
    if params.temperature <= 0:
        raise SamplingError("candidates() is for temperature > 0")
    x = logits.astype(np.float64)  # (V,)
    with np.errstate(over="ignore"):
        z = x / params.temperature  # (V,)
    if np.isposinf(z).any() or (np.isneginf(z) & np.isfinite(x)).any():
        # a temperature so small (a subnormal, say) that logits / T overflow: its limit, every
        # token but the likeliest (and their ties) at -inf; dividing the distances to the largest
        # keeps the likeliest at 0 where x / T - max(x / T) would be inf - inf = nan
        with np.errstate(over="ignore", invalid="ignore"):
            z = (x - np.max(x)) / params.temperature
    v = z.shape[0]
    ids: np.ndarray | None = None
    if params.top_k and params.top_k < v:
        # Exactly k survive; among ties at the k-th value argpartition decides, as torch.topk does.
        ids = np.argpartition(-z, params.top_k - 1)[: params.top_k]  # (k,)
        z = z[ids]
    e = np.exp(z - np.max(z))  # (n,) unnormalised probabilities
    total = float(e.sum())
    if params.top_p >= 1.0:
        return (np.arange(v) if ids is None else ids), e / total
    # Smallest most-probable-first prefix whose mass reaches top_p; the token that crosses the
    # line stays in. Look at the top m first and widen only if they do not reach it.
    n = e.shape[0]
    want = params.top_p * total
    m = min(n, 64)
    while True:
        part = np.argpartition(-e, m - 1)[:m] if m < n else np.arange(n)
        order = part[np.argsort(-e[part], kind="stable")]  # (m,) most probable first
        cum = np.cumsum(e[order])
        if cum[-1] >= want or m >= n:
            keep = order[: min(int(np.searchsorted(cum, want, side="left")) + 1, m)]
            break
        m = min(n, m * 8)
    probs = e[keep] / e[keep].sum()
    return (keep if ids is None else ids[keep]), probs


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """``candidates`` as a dense (V,) distribution, zero outside the kept set."""
    ids, probs = candidates(logits, params)
    out = np.zeros(logits.shape[0], dtype=np.float64)
    out[ids] = probs
    return out


def adjust(logits: np.ndarray, params: SamplingParams, history: Sequence[int] | None = None) -> np.ndarray:
    """One row of logits with ``params``' penalties and bias applied, as OpenAI documents them:
    ``logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty``, where ``c[j]`` counts
    token j in ``history`` (the tokens generated so far, not the prompt), then
    ``logits[j] += logit_bias[j]``.

    logits: (V,) -> (V,) float64, a new array; the row itself when nothing applies.
    """
    if not params.adjusts:
        return logits
    v = logits.shape[0]
    z = logits.astype(np.float64)  # (V,) a copy
    if history is not None and len(history) and (params.presence_penalty or params.frequency_penalty):
        ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)  # (u,), (u,)
        if ids[0] < 0 or ids[-1] >= v:
            raise SamplingError(f"history holds token ids outside the vocabulary [0, {v})")
        z[ids] -= counts * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        ids = np.fromiter((t for t, _ in params.logit_bias), dtype=np.int64, count=len(params.logit_bias))
        if ids[-1] >= v:
            raise SamplingError(f"logit_bias names token {int(ids[-1])}, outside the vocabulary [0, {v})")
        z[ids] += np.fromiter((b for _, b in params.logit_bias), dtype=np.float64, count=len(params.logit_bias))
    return z


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) -> (..., V) float64 log-probabilities."""
    z = logits.astype(np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def top_logprobs(logp: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` likeliest tokens of one row of log-probabilities (V,), likeliest first; among
    equal ones the lower id first."""
    if n <= 0:
        return ()
    n = min(n, logp.shape[0])
    part = np.argpartition(-logp, n - 1)[:n] if n < logp.shape[0] else np.arange(logp.shape[0])
    order = part[np.lexsort((part, -logp[part]))]  # (n,) by logprob desc, then id asc
    return tuple((int(i), float(logp[i])) for i in order)


def logprobs_of(logits: np.ndarray, params: SamplingParams, token: int, history: Sequence[int] | None = None,
                ) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The logprob of ``token`` and the ``params.logprobs`` likeliest tokens' (0 if None), from one
    row of logits (V,) as ``sample_one`` saw it with the same ``history``: the log-softmax of the
    row after penalties and bias (``adjust``), before temperature, top-k and top-p."""
    if logits.ndim != 1:
        raise SamplingError(f"logprobs_of wants logits of shape (V,), got {logits.shape}")
    logp = log_softmax(adjust(logits, params, history))  # (V,)
    return float(logp[token]), top_logprobs(logp, params.logprobs or 0)


def prompt_logprobs(logits: np.ndarray, targets: Sequence[int], n: int = 0,
                    ) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """The logprob of each target token and the ``n`` likeliest tokens there, from the model's own
    distribution: logits (T, V), row i the prediction for ``targets[i]`` -> T entries.

    For a whole prompt: ``prompt_logprobs(logits[:-1], prompt[1:], n)`` (row i of the prompt's
    logits predicts token i + 1; the first token has none). For a prefill chunk ``[a, b)``: its rows
    against ``prompt[a + 1 : b + 1]`` (the last chunk's last row predicts no prompt token).
    """
    if logits.ndim != 2 or logits.shape[0] != len(targets):
        raise SamplingError(f"prompt_logprobs wants logits of shape ({len(targets)}, V), got {logits.shape}")
    logp = log_softmax(logits)  # (T, V)
    nxt = np.asarray(targets, dtype=np.int64)  # (T,)
    chosen = logp[np.arange(nxt.shape[0]), nxt]  # (T,)
    return [(float(chosen[i]), top_logprobs(logp[i], n)) for i in range(nxt.shape[0])]


def sample_one(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, *,
               history: Sequence[int] | None = None) -> int:
    """logits: (V,) -> one token id. ``history``: the tokens this request generated so far, for
    the penalties (None: none yet)."""
    if logits.ndim != 1:
        raise SamplingError(f"sample_one wants logits of shape (V,), got {logits.shape}")
    logits = adjust(logits, params, history)
    if params.greedy:
        return int(np.argmax(logits))
    ids, probs = candidates(logits, params)  # (n,), (n,)
    cdf = np.cumsum(probs)
    # Scale u by cdf[-1] (1 +- rounding) so it never falls past the last kept token; side="right"
    # never lands on a zero-probability entry (cdf is flat there).
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(idx, ids.shape[0] - 1)])


def sample(logits: np.ndarray, params: SamplingParams | Sequence[SamplingParams],
           rng: np.random.Generator | Sequence[np.random.Generator], *,
           histories: Sequence[Sequence[int] | None] | None = None) -> np.ndarray:
    """logits: (B, V) -> (B,) int64 token ids.

    ``params`` and ``rng`` are either one for the whole batch or one per row (requests sharing
    a decode step). Row b draws only from its own generator; ``histories[b]`` is row b's tokens
    generated so far (the penalties').
    """
    if logits.ndim != 2:
        raise SamplingError(f"sample wants logits of shape (B, V), got {logits.shape}")
    b = logits.shape[0]
    ps = [params] * b if isinstance(params, SamplingParams) else list(params)
    rs = [rng] * b if isinstance(rng, np.random.Generator) else list(rng)
    if len(ps) != b or len(rs) != b:
        raise SamplingError(f"batch of {b} rows needs {b} params and generators, "
                            f"got {len(ps)} and {len(rs)}")
    out = np.empty(b, dtype=np.int64)  # (B,)
    for i in range(b):
        out[i] = sample_one(logits[i], ps[i], rs[i], history=None if histories is None else histories[i])
    return out
