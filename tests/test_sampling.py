"""Sampling: parameter validation, greedy, filters against transformers' warpers, and statistics."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.errors import SamplingError, UserError
from meshllm.runtime.sampling import (
    SamplingParams,
    filtered_probs,
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
