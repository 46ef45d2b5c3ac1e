"""Speculative decoding through the pipeline: the same tokens as without it, more per step.

Stage 0 of a decoder ring drafts by prompt lookup (``serve/spec.py``), every stage computes the
drafts in the step, the head keeps those it samples itself. These tests hold the result to the
single-process loop (no speculation there), on one node and on a 3-stage ring, greedy and seeded,
with drafts that hold and drafts that fail in the same batch, and through a lost node.
"""

from __future__ import annotations

import asyncio

import pytest
from test_serve import PLANS, reference, settled

from meshllm.model.manifest import Manifest
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.spec import MATCH_CLASSES, DraftLength, PromptLookup, StepCost, expected_kept, match_class

# drafts at the length adapted to acceptance, whatever the steps cost here: every test drafts
ON = ServeConfig(speculate=True, spec_cost_aware=False)
THREE = [("both", [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)])]
REPEAT = [5, 6, 7, 8, 9] * 5  # drafts hold often
FREE = [31, 77, 4, 58, 12, 90, 23, 66]  # little to look up
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)


def spec_stats(mesh) -> dict[str, int]:
    out = {"spec_rows": 0, "spec_drafted": 0, "spec_accepted": 0}
    for n in mesh.nodes.values():
        for k in out:
            out[k] += n.serving.stage.stats[k]
    return out


async def tokens_of(entry, prompt, params) -> list[int]:
    got = []
    async for ev in entry.generate(prompt, params):
        assert ev.error is None, ev.error
        got.append(ev.token_id)
    return got


# --- the proposer and the draft length, pure ----------------------------------------------------------

def test_prompt_lookup_continues_the_latest_match_of_the_longest_suffix() -> None:
    p = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5])
    assert p.propose(3) == ()  # the suffix (5) never occurred before
    p.extend([1, 2, 3])
    assert p.propose(2) == (4, 9)  # the longest suffix wins: "1 2 3" continued with 4 9
    p.extend([7, 2, 3])
    assert p.propose(2) == (7, 2)  # "7 2 3" is new; "2 3" last continued with 7 (not 4, not 5)
    assert p.propose(0) == ()
    p2 = PromptLookup([7, 8, 7])
    assert p2.propose(4) == (8, 7)  # "7" occurred at 0, continued by what followed, up to the end


def test_prompt_lookup_follows_the_occurrence_whose_match_reaches_furthest_back() -> None:
    # "1 2 3" continued with 4 after "5 1 2 3", and later with 6 after "8 1 2 3"
    p = PromptLookup([5, 1, 2, 3, 4, 8, 1, 2, 3, 6])
    p.extend([5, 1, 2, 3])
    assert p.propose(3) == (4, 8, 1)  # the copy of "5 1 2 3", not the most recent "1 2 3"
    assert p.matched == 4  # beyond the 3-gram it looked up
    p.extend([4, 9])
    assert p.propose(2) == () and p.matched == 0  # "9" never occurred before
    p.extend([1, 2, 3])
    assert p.propose(1) == (4,) and p.matched == 3  # every "1 2 3" reaches 3 back: the latest wins
    short = PromptLookup([5, 1, 2, 3, 4, 8, 1, 2, 3, 6], candidates=1)
    short.extend([5, 1, 2, 3])
    assert short.propose(1) == (6,) and short.matched == 3  # only the latest occurrence considered
    capped = PromptLookup(list(range(10, 40)) + list(range(10, 39)), max_match=5)
    assert capped.propose(1) == (39,) and capped.matched == 5
    with pytest.raises(ValueError):
        PromptLookup([1], candidates=0)


def test_a_draft_that_continues_a_long_match_is_trusted_more() -> None:
    d = DraftLength(4)
    assert [match_class(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 60)] == [0, 0, 1, 2, 2, 3, 3, 4, 4]
    assert d.hold_rate(1) == 0.5 and d.hold_rate() == 0.5  # the prior of a one-token match
    assert d.hold_rate(1) < d.hold_rate(2) < d.hold_rate(4) < d.hold_rate(8) < d.hold_rate(30) < 1
    for _ in range(4):
        d.update(1, 0, matched=1)  # single-token matches keep failing (free text)
    assert d.hold_rate(1) < 0.25
    assert d.hold_rate(12) == MATCH_CLASSES[4] / (MATCH_CLASSES[4] + 1)  # a long copy is judged apart
    for _ in range(4):
        d.update(4, 4, matched=12)
    assert d.hold_rate(12) > 0.95
    d.update(4, 1, matched=12)  # a copy that diverged: its class learns it
    assert d.hold_rate(12) < 0.95 and d.hold_rate(1) < 0.25
    # with a draft costing a fifth of a step, a one-token match that keeps failing drafts nothing,
    # a long copy drafts the whole length
    c = StepCost()
    c.observe(0, 0.020)
    c.observe(4, 0.036)
    assert c.best_k(4, d.hold_rate(1)) == 0 and c.best_k(4, d.hold_rate(30)) == 4


def test_draft_length_grows_on_hits_and_drops_to_zero_on_misses() -> None:
    d = DraftLength(4)
    assert d.want() == 4
    d.update(4, 4)
    assert d.k == 4
    d.update(4, 1)
    assert d.k == 1
    d.update(1, 1)
    assert d.k == 2
    for _ in range(3):
        d.update(d.want() or 1, 0)
    assert d.k == 0 and d.want() == 0
    for _ in range(d.backoff):
        d.want()
    assert d.k == 1  # tried again after a while
    assert d.drafted > d.accepted > 0


def test_step_cost_drafts_only_what_pays() -> None:
    c = StepCost()
    assert c.best_k(4, 0.6) == 4  # nothing measured yet: the adapted length
    c.observe(0, 0.010)
    c.observe(2, 0.030)  # every draft costs a full step: compute dominates
    assert c.best_k(4, 0.9) == 0
    trip = StepCost()
    trip.observe(0, 0.100)
    trip.observe(4, 0.120)  # a slow trip, cheap drafts: drafts pay
    assert trip.best_k(4, 0.7) == 4 and trip.best_k(4, 0.05) == 0
    assert not trip.plain_due()
    for _ in range(StepCost.PLAIN_EVERY):
        trip.observe(2, 0.11)
    assert trip.plain_due()  # time to measure a step without drafts again
    trip.observe(0, 0.1)
    assert not trip.plain_due()


def test_step_cost_separates_what_drafting_at_all_costs_from_each_draft() -> None:
    # a 40 ms trip; carrying drafts at all 3 ms more, each draft 4 ms (a 3-stage mesh's figures)
    c = StepCost()
    c.observe(0, 0.040)
    c.observe(1, 0.047)
    assert c.f == 0 and c.c == pytest.approx(0.007)  # one count seen: the extra time is all C
    for _ in range(5):
        for d in (1, 2, 4):
            c.observe(d, 0.040 + 0.003 + 0.004 * d)
    assert c.f == pytest.approx(0.003) and c.c == pytest.approx(0.004)
    assert c.cost(0) == pytest.approx(0.040) and c.cost(3) == pytest.approx(0.055)
    # one draft at 17 % does not pay for the 7 ms it costs (a line through D = 4 alone, C = 4.75 ms,
    # would have drafted it); four drafts of a long copy do
    assert c.best_k(4, 0.17) == 0 and c.best_k(4, 0.9) == 4
    only4 = StepCost()
    only4.observe(0, 0.040)
    only4.observe(4, 0.059)
    assert only4.best_k(4, 0.17) == 1
    # extra time that falls with more drafts fits no line: the mean cost per draft, F = 0
    odd = StepCost()
    odd.observe(0, 0.040)
    odd.observe(1, 0.050)
    odd.observe(3, 0.046)
    assert odd.f == 0 and odd.c is not None and 0 < odd.c < 0.010


def test_step_cost_weighs_a_draft_against_the_whole_batch() -> None:
    # one pass: a plain step 20 ms, each draft 3.5 ms more (SmolLM2 int4, one node)
    c = StepCost()
    c.observe(0, 0.020)
    c.observe(4, 0.034)
    assert c.best_k(4, 0.6) >= 2  # one stream: a draft that holds 60% of the time pays
    assert c.best_k(4, 0.6, tokens=8.0) == 0  # 8 rows: it would slow 8 tokens to win 0.6
    assert c.best_k(4, 0.99, tokens=4.0) > 0  # 4 rows: near-certain drafts still pay
    # rows decided earlier in the step raise the bar for the later ones
    first = c.best_k(4, 0.95, tokens=4.0)
    later = c.best_k(4, 0.95, tokens=4.0 + expected_kept(first, 0.95), drafts=first)
    assert first > 0 and later <= first
    assert expected_kept(3, 0.5) == 0.5 + 0.25 + 0.125 and expected_kept(0, 0.9) == 0


def test_a_steps_drafts_never_move_its_rows_between_loop_and_thread() -> None:
    from meshllm.serve.stage import INF, StepTimes

    t = StepTimes(cap=4)
    assert t.expect(1) == INF  # none measured: the first of a size runs on the thread
    t.record(1, 5, 0.030)  # one row with 4 drafts: an upper bound while no plain step was seen
    assert t.expect(1) == 0.030
    t.record(1, 1, 0.018)
    t.record(1, 5, 0.032)  # a pass that ran long because of its drafts
    assert t.expect(1) == 0.018  # the same row's steps stay where its plain step runs
    t.record(1, 1, 0.026)  # a plain step that ran long moves them
    assert t.expect(1) == 0.026 and t.expect(2) == INF
    for rows in range(2, 7):
        t.record(rows, rows, 0.001)
    assert t.expect(6) == 0.001 and len(t._plain) <= 4  # the table stays small


def test_a_requests_speculate_travels_and_is_checked() -> None:
    from meshllm.errors import SamplingError

    for p in (SamplingParams(), SamplingParams(speculate=False), SamplingParams(speculate=True)):
        assert SamplingParams.from_dict(p.to_dict()) == p
    assert "speculate" not in SamplingParams().to_dict()  # the default leaves frames as they were
    with pytest.raises(SamplingError, match="speculate"):
        SamplingParams(speculate="yes")  # type: ignore[arg-type]


# --- the same tokens, more per step ----------------------------------------------------------------------

@pytest.mark.parametrize("plan", ["one-node", "three-stages", "split-differently"])
async def test_speculation_gives_the_tokens_of_one_process(make_mesh, tiny_manifest: Manifest,
                                                           plan: str) -> None:
    mesh = await make_mesh(THREE if plan == "three-stages" else PLANS[plan], ON)
    entry = mesh.node("a").serving.entry
    for params in (GREEDY, SEEDED):
        for prompt in (REPEAT, FREE):
            got = await tokens_of(entry, prompt, params)
            assert got == reference(tiny_manifest, prompt, params, attention="plain"), (params, prompt)
    s = spec_stats(mesh)
    assert s["spec_accepted"] > 0, s  # drafts held: steps yielded several tokens
    assert s["spec_drafted"] > s["spec_accepted"], s  # and some failed: rejection was exercised
    await settled(mesh)


async def test_speculation_off_by_request_and_by_node(make_mesh, tiny_manifest: Manifest) -> None:
    mesh = await make_mesh(THREE, ON)
    entry = mesh.node("a").serving.entry
    off = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, speculate=False)
    assert await tokens_of(entry, REPEAT, off) == reference(tiny_manifest, REPEAT, off, attention="plain")
    assert spec_stats(mesh)["spec_drafted"] == 0
    await settled(mesh)
    mesh2 = await make_mesh(THREE, ServeConfig(speculate=False, spec_cost_aware=False))
    assert await tokens_of(mesh2.node("a").serving.entry, REPEAT, GREEDY) == reference(tiny_manifest, REPEAT, GREEDY)
    assert spec_stats(mesh2)["spec_drafted"] == 0
    on = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, speculate=True)  # the request overrides
    assert await tokens_of(mesh2.node("a").serving.entry, REPEAT, on) == reference(tiny_manifest, REPEAT, on)
    assert spec_stats(mesh2)["spec_drafted"] > 0
    await settled(mesh2)


async def test_a_fused_mesh_verifies_drafts_as_steps_and_gives_the_tokens_of_a_fused_process(
        make_mesh, tiny_manifest: Manifest) -> None:
    """A mesh on GroupQueryAttention (``runtime.attention = fused``) whose requests speculate
    (here every node's default, the attention pinned) verifies a step's drafts as one-position
    steps: the tokens are those of one fused process, with and without speculation."""
    mesh = await make_mesh(THREE, ON, attention="fused")
    entry = mesh.node("a").serving.entry
    runners = [r for n in "abc" for e in mesh.node(n).stages.epochs() for r in mesh.node(n).stages.runners(e)]
    assert [(r.attention_kind, r.one_pass_exact) for r in runners] == [("fused", False)] * 3
    for params in (GREEDY, SEEDED):
        off = SamplingParams(**{**params.to_dict(), "speculate": False})
        on = SamplingParams(**{**params.to_dict(), "speculate": True})
        want = reference(tiny_manifest, REPEAT, params, attention="fused")
        assert await tokens_of(entry, REPEAT, on) == want
        assert await tokens_of(entry, REPEAT, off) == want
    assert spec_stats(mesh)["spec_accepted"] > 0
    await settled(mesh)


async def test_rows_that_keep_and_reject_drafts_share_a_batch(make_mesh, tiny_manifest: Manifest) -> None:
    mesh = await make_mesh(THREE, ON)
    entry = mesh.node("a").serving.entry
    jobs = [(REPEAT, GREEDY), (FREE, SEEDED), ([3, 4, 3, 4, 3, 4, 3], GREEDY),
            (FREE[::-1], SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True,
                                        frequency_penalty=0.5)),
            (REPEAT[:12], SamplingParams(temperature=0.0, max_tokens=9))]  # EOS allowed, short: ends mid-draft
    got = await asyncio.gather(*(tokens_of(entry, p, q) for p, q in jobs))
    for (p, q), toks in zip(jobs, got, strict=True):
        assert toks == reference(tiny_manifest, p, q, attention="plain")
    s = spec_stats(mesh)
    assert s["spec_accepted"] > 0 and s["spec_drafted"] > s["spec_accepted"], s
    await settled(mesh)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
async def test_a_stage_lost_mid_speculation_resumes_with_the_same_tokens(make_mesh, tiny_manifest: Manifest,
                                                                       sampling: str) -> None:
    spec = [("prefill", [("a", 0, 5)]), ("decoder", [("b", 0, 2), ("c", 2, 5)]), ("decoder", [("d", 0, 5)])]
    mesh = await make_mesh(spec, ON)
    entry = mesh.node("a").serving.entry
    params = GREEDY if sampling == "greedy" else SEEDED
    params = SamplingParams(**{**params.to_dict(), "max_tokens": 30})
    tokens: list[int] = []
    async for ev in entry.generate(REPEAT, params):
        assert ev.error is None, ev.error
        tokens.append(ev.token_id)
        if len(tokens) == 6:
            holder = next(n for n in "bcd" if mesh.node(n).serving.stage.held_count())
            await mesh.kill(holder)
    assert tokens == reference(tiny_manifest, REPEAT, params, attention="plain")
    assert entry.stats["migrations"] == 1 and entry.stats["failed"] == 0
    # the replica that took over replayed the streamed tokens as drafts, several per step
    d = mesh.node("d").serving.stage.stats
    assert 0 < d["decode_steps"] < len(tokens) - 1 and d["decode_rows"] == d["decode_steps"]
    await settled(mesh)


async def test_a_client_gone_mid_speculation_frees_everything(make_mesh, tiny_manifest: Manifest) -> None:
    mesh = await make_mesh(THREE, ON)
    entry = mesh.node("a").serving.entry
    gen = entry.generate(REPEAT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    first = [await anext(gen), await anext(gen)]
    assert all(e.error is None for e in first)
    await gen.aclose()  # the client goes away while drafts are in flight
    await settled(mesh)
    ref = reference(tiny_manifest, REPEAT, GREEDY, attention="plain")
    assert [e.token_id for e in first] == ref[:2]


async def test_rows_with_different_draft_counts_share_one_pass_and_keep_the_reference_tokens(
        make_mesh, tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    # a step's rows, each with its own number of drafts, run as one pass on every stage (one
    # decode_rows call with their counts): the tokens are still the single-process loop's
    from meshllm.runtime.runner import StageRunner

    passes: list[list[int]] = []
    decode_rows = StageRunner.decode_rows

    def counting(self, seq_ids, x, *, counts=None):  # type: ignore[no-untyped-def]
        passes.append(list(counts or [1] * len(seq_ids)))
        return decode_rows(self, seq_ids, x, counts=counts)

    monkeypatch.setattr(StageRunner, "decode_rows", counting)
    mesh = await make_mesh(THREE, ON)
    entry = mesh.node("a").serving.entry
    short = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    jobs = [(REPEAT, GREEDY), (FREE, SEEDED), (REPEAT[:12], short), ([3, 4, 3, 4, 3, 4, 3], GREEDY),
            (REPEAT[3:], SEEDED), (FREE[::-1], GREEDY)]
    got = await asyncio.gather(*(tokens_of(entry, p, q) for p, q in jobs))
    assert got == [reference(tiny_manifest, p, q, attention="plain") for p, q in jobs]
    assert spec_stats(mesh)["spec_accepted"] > 0
    assert any(len(set(c)) > 1 for c in passes)  # rows with different draft counts shared a pass
    steps = sum(n.serving.stage.stats["decode_calls"] for n in mesh.nodes.values())
    assert len(passes) == steps  # one runner pass per step and stage, drafts or not
    await settled(mesh)


async def test_where_no_draft_pays_a_speculating_step_is_the_plain_step(
        make_mesh, tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    # the cost-aware length at 0 for every proposal: every stage runs the one-position step a
    # request without speculation runs (no counts, one position per row), the same tokens
    from meshllm.runtime.runner import StageRunner

    calls: list[tuple[int, list[int] | None]] = []
    decode_rows = StageRunner.decode_rows

    def recording(self, seq_ids, x, *, counts=None):  # type: ignore[no-untyped-def]
        calls.append((len(x), counts))
        return decode_rows(self, seq_ids, x, counts=counts)

    monkeypatch.setattr(StageRunner, "decode_rows", recording)
    monkeypatch.setattr(StepCost, "best_k", lambda self, cap, hold, tokens=1.0, drafts=0: 0)
    mesh = await make_mesh(THREE, ServeConfig(speculate=True, spec_cost_aware=True))
    entry = mesh.node("a").serving.entry
    for params in (GREEDY, SEEDED):
        assert await tokens_of(entry, REPEAT, params) == reference(tiny_manifest, REPEAT, params, attention="plain")
    assert calls and all(c is None for _, c in calls), calls[:5]
    assert spec_stats(mesh)["spec_drafted"] == 0
    await settled(mesh)


async def test_a_stop_string_ends_the_answer_mid_speculation(tiny_manifest: Manifest) -> None:
    from servemesh import DataMesh

    from meshllm.model.manifest import load_manifest
    from meshllm.model.paths import BUNDLED_MODEL
    from meshllm.model.tokenizer import Tokenizer
    from meshllm.runtime.generate import generate
    from meshllm.runtime.runner import StageRunner

    bundled = load_manifest(BUNDLED_MODEL)  # the bundled code model: its answers repeat what it saw
    tok = Tokenizer.from_manifest(bundled)
    prompt = tok.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(")
    plain = SamplingParams(temperature=0.0, max_tokens=40)
    full = generate(StageRunner(bundled, 0, bundled.config.num_blocks, threads=1, one_pass=True), prompt, plain, tokenizer=tok)
    stop = full.text.strip()[len(full.text.strip()) // 2:][:3] or "return"
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,))
    ref = generate(StageRunner(bundled, 0, bundled.config.num_blocks, threads=1, one_pass=True), prompt, params, tokenizer=tok)
    mesh = DataMesh(bundled, ["a", "b", "c"], config=ON)
    await mesh.start([("both", [("a", 0, 3), ("b", 3, 6), ("c", 6, 8)])])
    try:
        got = []
        async for ev in mesh.node("a").serving.entry.generate(prompt, params):
            assert ev.error is None, ev.error
            got.append(ev)
        assert "".join(e.text for e in got) == ref.text and got[-1].finish_reason == "stop"
        assert spec_stats(mesh)["spec_accepted"] > 0  # the answer was speculated when the stop came
        await settled(mesh)
    finally:
        await mesh.close()


async def test_the_lab_hop_delay_holds_every_frame_between_stages(make_mesh, tiny_manifest: Manifest) -> None:
    mesh = await make_mesh(THREE, ServeConfig(hop_delay_ms=40.0, speculate=False))
    entry = mesh.node("a").serving.entry
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await tokens_of(entry, REPEAT, params) == reference(tiny_manifest, REPEAT, params)
    # the prompt crosses 2 hops, each of the 3 decode steps 3 (a -> b -> c -> a): 11 hops of 40 ms at least
    assert loop.time() - t0 >= 11 * 0.040
    await settled(mesh)
