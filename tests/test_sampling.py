"""Sampling: parameter validation, greedy, filters against transformers' warpers, and statistics."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.errors import SamplingError, UserError
from meshllm.runtime.sampling import (
    SamplingParams,
    adjust,
    candidates,
    filtered_probs,
    logprobs_of,
    prompt_logprobs,
    request_seed,
    sample,
    sample_one,
    token_rng,
)


@pytest.mark.parametrize("kw", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"temperature": "1"}, {"top_k": -1}, {"top_k": 1.5}, {"top_p": 0.0}, {"top_p": 1.5},
    {"max_tokens": 0}, {"max_tokens": True}, {"seed": -1}, {"seed": 1.0}, {"stop": [""]},
    {"stop": ["x"] * 17}, {"stop": 3}, {"ignore_eos": "yes"},
    {"presence_penalty": 2.5}, {"frequency_penalty": -2.01}, {"frequency_penalty": float("nan")},
    {"presence_penalty": "0"}, {"logit_bias": {"5": 1.0}}, {"logit_bias": {5: 101}}, {"logit_bias": {-1: 0}},
    {"logit_bias": [[1, 1], [1, 2]]}, {"logit_bias": 3}, {"logit_bias": {i: 1 for i in range(1025)}},
    {"logprobs": 21}, {"logprobs": -1}, {"logprobs": True},
])
def test_invalid_params_raise_a_clear_sampling_error(kw: dict) -> None:
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kw)
    assert isinstance(e.value, UserError)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("invalid sampling parameters") or "stop" in str(e.value)


def test_params_are_frozen_hashable_and_round_trip() -> None:
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3, max_tokens=8, stop=["\n\n"])
    assert p.stop == ("\n\n",)
    assert hash(p) == hash(SamplingParams.from_dict(p.to_dict()))
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams.from_dict({"stop": None}).stop == ()
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    with pytest.raises(SamplingError, match="unknown sampling parameters"):
        SamplingParams.from_dict({"temprature": 1.0})
    # the new fields travel too (the dict rides wire frames: sampling state survives failover)
    q = SamplingParams(temperature=0.5, presence_penalty=0.5, frequency_penalty=-1.0,
                       logit_bias={7: -100, 3: 2.5}, logprobs=5)
    assert q.logit_bias == ((3, 2.5), (7, -100.0))
    d = q.to_dict()
    assert d["logit_bias"] == [[3, 2.5], [7, -100.0]]
    assert SamplingParams.from_dict(d) == q and hash(SamplingParams.from_dict(d)) == hash(q)
    assert SamplingParams.from_dict({"temperature": 0.5}).logit_bias == ()  # a dict from before the fields
    assert SamplingParams(logit_bias=[(np.int64(3), np.float32(1.5))]).logit_bias == ((3, 1.5),)


def test_penalties_follow_openais_formula_on_chosen_logits() -> None:
    logits = np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32)  # (V,)
    history = [2, 2, 1]  # token 2 twice, token 1 once
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    z = adjust(logits, p, history)
    # logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
    np.testing.assert_allclose(z, [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.5 - 0.5, 0.5])
    assert z is not logits and logits[2] == 3.0  # the row itself is untouched
    assert adjust(logits, SamplingParams(), history) is logits  # nothing to apply: no copy
    np.testing.assert_array_equal(adjust(logits, p, None), logits)  # nothing generated yet


def test_penalties_and_bias_change_the_greedy_token_as_openai_says() -> None:
    logits = np.array([0.0, 2.0, 1.8, 1.0], dtype=np.float32)
    g = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0.0)
    assert sample_one(logits, greedy, g, history=[1, 1]) == 1  # no penalty: the likeliest
    # a positive presence penalty makes a repeat less likely: 2.0 - 0.5 < 1.8
    assert sample_one(logits, SamplingParams(temperature=0.0, presence_penalty=0.5), g, history=[1]) == 2
    # frequency grows with the count: 0.15 per use; once: 1.85 > 1.8, twice: 1.7 < 1.8
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.15)
    assert sample_one(logits, freq, g, history=[1]) == 1
    assert sample_one(logits, freq, g, history=[1, 1]) == 2
    # a negative penalty encourages repetition
    assert sample_one(logits, SamplingParams(temperature=0.0, presence_penalty=-1.5), g, history=[3]) == 3
    # -100 bans a token, +100 forces one, even when sampling
    assert sample_one(logits, SamplingParams(temperature=0.0, logit_bias={1: -100}), g) == 2
    hot = SamplingParams(temperature=1.0, seed=0, logit_bias={0: 100})
    assert {sample_one(logits, hot, token_rng(0, i)) for i in range(50)} == {0}
    banned = SamplingParams(temperature=1.0, seed=0, logit_bias={1: -100, 2: -100})
    assert {sample_one(logits, banned, token_rng(0, i)) for i in range(200)} == {0, 3}
    # the batch form passes each row its history
    rows = np.stack([logits, logits])
    assert sample(rows, freq, g, histories=[[1], [1, 1]]).tolist() == [1, 2]
    with pytest.raises(SamplingError, match="vocabulary"):
        sample_one(logits, SamplingParams(temperature=0.0, logit_bias={4: 1}), g)


def test_logprobs_are_of_the_adjusted_row_before_temperature() -> None:
    logits = np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32)
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    lp, top = logprobs_of(logits, SamplingParams(temperature=0.0, logprobs=2), 2)
    assert lp == pytest.approx(ref[2], abs=1e-12)
    assert [t for t, _ in top] == [2, 1] and top[1][1] == pytest.approx(ref[1], abs=1e-12)
    # temperature, top-k and top-p do not change them
    for p in (SamplingParams(temperature=0.3, top_k=1, logprobs=2), SamplingParams(temperature=2.0, top_p=0.1,
                                                                                   logprobs=2)):
        assert logprobs_of(logits, p, 2) == (lp, top)
    assert logprobs_of(logits, SamplingParams(temperature=0.0), 0) == (pytest.approx(ref[0]), ())
    # penalties and bias do: the distribution the token was chosen from
    p = SamplingParams(temperature=0.0, logit_bias={0: 5.0}, frequency_penalty=1.0, logprobs=4)
    z = np.array([6.0, 2.0, 3.0 - 2.0, 0.5])
    want = z - np.log(np.exp(z).sum())
    lp0, top0 = logprobs_of(logits, p, 0, history=[2, 2])
    assert lp0 == pytest.approx(want[0], abs=1e-12)
    assert [t for t, _ in top0] == [0, 1, 2, 3]
    np.testing.assert_allclose([v for _, v in top0], want[[0, 1, 2, 3]], atol=1e-12)
    # ties: the lower id first
    _, tied = logprobs_of(np.zeros(5, dtype=np.float32), SamplingParams(logprobs=3), 0)
    assert [t for t, _ in tied] == [0, 1, 2] and tied[0][1] == pytest.approx(-np.log(5))


def test_prompt_logprobs_score_each_next_prompt_token() -> None:
    rows = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)  # (P, V)
    prompt = [2, 1, 0]
    got = prompt_logprobs(rows[:-1], prompt[1:], 1)
    assert len(got) == 2
    r0 = rows[0] - np.log(np.exp(rows[0].astype(np.float64)).sum())
    r1 = rows[1] - np.log(np.exp(rows[1].astype(np.float64)).sum())
    assert got[0][0] == pytest.approx(r0[1]) and got[0][1] == ((2, pytest.approx(r0[2])),)
    assert got[1][0] == pytest.approx(r1[0]) and got[1][1] == ((0, pytest.approx(r1[0])),)
    assert prompt_logprobs(rows[:1], prompt[1:2], 1) == got[:1]  # a chunk at a time, the same
    with pytest.raises(SamplingError):
        prompt_logprobs(rows, [1, 2], 1)


def test_greedy_is_argmax_and_consumes_no_randomness() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32)  # (B, V)
    g = np.random.default_rng(1)
    before = g.bit_generator.state
    ids = sample(logits, SamplingParams(temperature=0.0, top_k=3, top_p=0.5), g)
    assert ids.dtype == np.int64 and ids.shape == (4,)
    np.testing.assert_array_equal(ids, logits.argmax(axis=1))
    assert g.bit_generator.state == before


def make_rng(p: SamplingParams) -> np.random.Generator:
    """One stream for the many draws a distribution test takes."""
    return np.random.default_rng(p.seed)


def test_seeded_sampling_is_deterministic_and_rows_use_their_own_generator() -> None:
    logits = np.random.default_rng(0).standard_normal((3, 100))
    p = SamplingParams(temperature=1.3, top_p=0.95, seed=42)
    a = [sample(logits, p, [token_rng(42, i) for i in range(3)]) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    # Row 1 alone, with a fresh generator of the same (seed, index), draws what it drew in the batch.
    assert sample_one(logits[1], p, token_rng(42, 1)) == a[0][1]
    seqs = [[sample_one(logits[0], p, token_rng(42, i)) for i in range(20)] for _ in range(2)]
    assert seqs[0] == seqs[1]
    other = [sample_one(logits[0], p, token_rng(43, i)) for i in range(20)]
    assert other != seqs[0]


def test_token_rng_depends_only_on_seed_and_index() -> None:
    draws = {(s, i): token_rng(s, i).random(4).tolist() for s in (0, 1, 2**64 - 1) for i in (0, 1, 2, 2**40)}
    assert len({tuple(d) for d in draws.values()}) == len(draws)  # independent streams per pair
    # the same pair gives the same stream, whatever was drawn before and in whatever order
    for (s, i), d in reversed(list(draws.items())):
        assert token_rng(s, i).random(4).tolist() == d
    with pytest.raises(SamplingError):
        token_rng(-1, 0)
    with pytest.raises(SamplingError):
        token_rng(0, 2**64)


def test_request_seed_is_the_given_seed_or_fresh_entropy() -> None:
    assert request_seed(SamplingParams(seed=7)) == 7
    fresh = {request_seed(SamplingParams()) for _ in range(4)}
    assert len(fresh) == 4 and all(0 <= x < 2**64 for x in fresh)


def test_mixed_params_per_row() -> None:
    logits = np.random.default_rng(5).standard_normal((2, 30))
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1, seed=0)
    ids = sample(logits, [greedy, hot], [make_rng(greedy), make_rng(hot)])
    np.testing.assert_array_equal(ids, logits.argmax(axis=1))  # top_k=1 is greedy too
    with pytest.raises(SamplingError):
        sample(logits, [greedy], make_rng(greedy))
    with pytest.raises(SamplingError):
        sample(logits[0], greedy, make_rng(greedy))


def _hf_support(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    x = torch.tensor(logits[None, :], dtype=torch.float64)
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.isfinite(x[0]).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.9), (0.7, 10, 1.0), (1.5, 20, 0.5), (0.5, 0, 0.3), (1.0, 40, 0.99)])
def test_filters_keep_the_same_tokens_as_transformers(temperature: float, top_k: int, top_p: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        logits = rng.standard_normal(200) * 3  # (V,)
        p = filtered_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        np.testing.assert_array_equal(p > 0, _hf_support(logits, temperature, top_k, top_p))
        assert abs(p.sum() - 1.0) < 1e-12


def test_top_k_and_top_p_never_sample_outside_their_set() -> None:
    logits = np.random.default_rng(3).standard_normal(64) * 2
    top5 = set(np.argsort(-logits)[:5].tolist())
    pk = SamplingParams(temperature=2.0, top_k=5, seed=1)
    g = make_rng(pk)
    assert {sample_one(logits, pk, g) for _ in range(500)} == top5
    pp = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    support = set(np.flatnonzero(filtered_probs(logits, pp)).tolist())
    g = make_rng(pp)
    drawn = {sample_one(logits, pp, g) for _ in range(500)}
    assert drawn <= support and len(drawn) == len(support)


def test_empirical_distribution_matches_softmax_with_temperature() -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    p = SamplingParams(temperature=0.8, seed=11)
    g = make_rng(p)
    n = 20000
    counts = np.bincount([sample_one(logits, p, g) for _ in range(n)], minlength=5)
    z = np.exp(logits / 0.8)
    want = z / z.sum()
    # 5 sigma of a binomial count: fails only if the sampler is wrong.
    sigma = np.sqrt(n * want * (1 - want))
    assert np.all(np.abs(counts - n * want) < 5 * sigma), (counts, n * want)
    # ...and the temperature matters: at 0.8 the top token is clearly likelier than at 1.
    assert want[0] > np.exp(2) / np.exp(logits).sum() + 0.03


def test_masked_logits_are_never_drawn() -> None:
    logits = np.full(10, -np.inf)
    logits[[2, 7]] = [0.0, 1.0]
    p = SamplingParams(temperature=1.0, seed=0)
    g = make_rng(p)
    assert {sample_one(logits, p, g) for _ in range(200)} == {2, 7}


@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature: float) -> None:
    """logits / T overflows for a subnormal T: its limit is the likeliest token (ties shared), not
    NaN probabilities (a numpy warning, and garbage drawn where warnings are not errors)."""
    logits = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    logits[7] = logits[123] = logits.max() + 1.0
    for p in (SamplingParams(temperature=temperature), SamplingParams(temperature=temperature, top_p=1e-300),
              SamplingParams(temperature=temperature, top_k=5, presence_penalty=5e-324)):
        ids, probs = candidates(adjust(logits, p, [1]), p)
        assert np.isfinite(probs).all() and set(ids[probs > 0].tolist()) <= {7, 123}
        assert sample_one(logits, p, np.random.default_rng(3), history=[1]) in (7, 123)
