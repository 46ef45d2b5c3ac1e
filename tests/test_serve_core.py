"""The serving core's promises on the in-memory mesh with real runners: a short request is not held
back by a long one, a request that can never fit is refused at once, a bug on a request's path ends
that request explicitly, frames of a failed attempt never land on the next, and a stateful
property test of arrivals, cancels, lost nodes and delays: every request ends exactly once, its
tokens are the single process's, and every node returns to holding nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servemesh import DataMesh
from test_serve import PLANS, answer, names, reference, settled
from waiting import async_wait_until

from meshllm.model.manifest import Manifest
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.request import Status
from meshllm.wire.ids import RequestId
from meshllm.wire.messages import Error, Token


@pytest.mark.parametrize("plan", ["one-node", "both-split"])
async def test_a_short_request_is_not_held_back_by_a_long_stream(make_mesh, tiny_manifest: Manifest,
                                                                 plan: str) -> None:
    """A replica that both prefills and decodes interleaves a new prompt's chunks with the decode
    steps of a long answer: the short request finishes first (its prefill used to wait for the
    whole long answer)."""
    mesh = await make_mesh(PLANS[plan])
    entry = mesh.node("a").serving.entry
    long_prompt, short_prompt = [5, 6, 7, 8], [9, 10, 11]
    long_params = SamplingParams(temperature=0.0, max_tokens=tiny_manifest.config.max_position - len(long_prompt),
                                 ignore_eos=True)
    short_params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    long_tokens: list[int] = []
    long_done = asyncio.Event()
    short: list[asyncio.Task] = []

    async def short_run():
        got = await answer(entry, short_prompt, short_params)
        return got, len(long_tokens), long_done.is_set()  # where the long answer was at that moment

    async def long_run() -> None:
        async for ev in entry.generate(long_prompt, long_params):
            assert ev.error is None
            long_tokens.append(ev.token_id)
            if len(long_tokens) == 3:  # the long answer streams: now the short request arrives
                short.append(asyncio.ensure_future(short_run()))
        long_done.set()

    task = asyncio.ensure_future(long_run())
    await async_wait_until(lambda: short, "the long answer to stream", 10.0)
    (tokens, reason, error), at_short_end, long_was_done = await short[0]
    assert error is None and reason == "length"
    assert not long_was_done and at_short_end < long_params.max_tokens, \
        f"the short request finished only after the long one ({at_short_end} tokens)"
    await task
    assert tokens == reference(tiny_manifest, short_prompt, short_params)
    assert long_tokens == reference(tiny_manifest, long_prompt, long_params)
    await settled(mesh)


async def test_a_request_that_can_never_fit_is_refused_at_once(make_mesh, tiny_manifest: Manifest) -> None:
    """More positions than any decoder's whole KV budget: an explicit too_large error at once,
    not a wait for room that never comes (queue_timeout_s is long here)."""
    cfg = tiny_manifest.config
    mesh = await make_mesh(PLANS["one-node"], ServeConfig(queue_timeout_s=60.0))
    (runner,) = mesh.node("a").stages.runners(1)
    runner.kv.budget = 16 * runner.kv_bytes_per_token  # room for 16 positions, ever
    entry = mesh.node("a").serving.entry
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    big = SamplingParams(temperature=0.0, max_tokens=cfg.max_position - 8, ignore_eos=True)
    tokens, _, error = await answer(entry, [3, 4, 5], big)
    assert error is not None and "never fit" in error, error
    assert loop.time() - t0 < 5.0
    # a request that fits is served as before
    small = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens, _, error = await answer(entry, [3, 4, 5], small)
    assert error is None and tokens == reference(tiny_manifest, [3, 4, 5], small)
    await settled(mesh)


async def test_a_bug_on_a_requests_path_ends_it_explicitly(make_mesh, monkeypatch) -> None:
    mesh = await make_mesh(PLANS["one-node"])
    entry = mesh.node("a").serving.entry

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(entry.core, "_on_token", broken)
    _, _, error = await asyncio.wait_for(answer(entry, [3, 4], SamplingParams(temperature=0.0, max_tokens=4)), 10.0)
    assert error is not None and "internal error" in error
    monkeypatch.undo()
    await settled(mesh)
    assert not entry.requests


async def test_frames_of_a_failed_attempt_are_dropped(make_mesh, tiny_manifest: Manifest) -> None:
    """After a fault the request resumes under a new attempt; a late token and a late error of the
    old attempt change nothing (they used to be taken into the new stream, or to use up a
    migration)."""
    mesh = await make_mesh(PLANS["three-replicas"])
    a = mesh.node("a")
    entry = a.serving.entry
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompt = [7, 8, 9]
    events = []
    gen = entry.generate(prompt, params)
    events.append(await anext(gen))
    rid, r = next(iter(entry.requests.items()))
    old = r.attempt
    # a stage of the current attempt reports a failure: the entry resumes elsewhere
    entry.handle(a.node_id, Error(RequestId(rid), "simulated step failure", "stage_error", old))
    assert r.migrations == 1 and r.attempt > old
    # late frames of the old attempt: a token from its decoder, and an error from another stage
    entry.handle(a.node_id, Token(RequestId(rid), 4000, len(r.tokens), False, "", old))
    entry.handle(a.node_id, Error(RequestId(rid), "node gone", "node_lost", old))
    assert r.migrations == 1 and r.dropped_frames == 2
    async for ev in gen:
        assert ev.error is None
        events.append(ev)
    assert [e.token_id for e in events] == reference(tiny_manifest, prompt, params)
    await settled(mesh)


# --- a stateful property test over the in-memory mesh ---------------------------------------------------

SCENARIO = st.lists(
    st.tuples(st.sampled_from(["request", "cancel", "kill", "pause"]),
              st.integers(min_value=0, max_value=10 ** 6)),
    min_size=3, max_size=10)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(SCENARIO)
def test_random_arrivals_cancels_losses_and_delays(tiny_manifest: Manifest, scenario) -> None:
    """Invariants over random traffic and faults on a 4-node mesh (two replicas that can both take
    any request, whose first stages hand prompts back when more is queued than their entry
    counted): each request ends exactly once; a completed one has exactly the single
    process's tokens (one attempt's, after any resumption); a cancelled or failed one has a prefix
    of them; every surviving node ends holding no KV and no request."""
    asyncio.run(_scenario(tiny_manifest, scenario))


async def _scenario(manifest: Manifest, scenario) -> None:
    spec = [("both", [("a", 0, 2), ("b", 2, 5)]), ("both", [("c", 0, 3), ("d", 3, 5)])]
    mesh = DataMesh(manifest, names(spec), config=ServeConfig(stall_timeout_s=5.0, migrate_wait_s=2.0,
                                                              queue_timeout_s=5.0))
    await mesh.start(spec)
    for n in mesh.nodes.values():  # estimates: entries send limits, and stages hand prompts back
        n.serving.router.prefill_estimate = lambda routes, rid, tokens: (0.001, 0.0015)[rid] * tokens
    rng = np.random.default_rng(0)
    ends: dict[int, list] = {}
    tasks: dict[int, asyncio.Task] = {}
    expected: dict[int, list[int]] = {}
    killed = False
    try:
        for i, (what, x) in enumerate(scenario):
            if what == "request" or (what == "cancel" and not tasks):
                prompt = [int(t) for t in rng.integers(3, 97, size=1 + x % 20)]
                params = SamplingParams(temperature=0.0 if x % 2 else 0.8, seed=x, max_tokens=2 + x % 12,
                                        ignore_eos=True)
                expected[i] = reference(manifest, prompt, params)
                entry = mesh.node("a" if killed else "abcd"[x % 4]).serving.entry
                tasks[i] = asyncio.ensure_future(_collect(entry, prompt, params, ends.setdefault(i, [])))
            elif what == "cancel":
                k = sorted(tasks)[x % len(tasks)]
                tasks[k].cancel()
            elif what == "kill" and not killed:
                killed = True
                await mesh.kill("c" if x % 2 else "d")
            elif what == "pause":
                for _ in range(x % 7):
                    await asyncio.sleep(0)
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for (i, _task), res in zip(tasks.items(), results, strict=True):
            got = ends[i]
            if isinstance(res, asyncio.CancelledError):
                toks = [e.token_id for e in got]
                assert toks == expected[i][:len(toks)], f"request {i}: cancelled with other tokens"
                continue
            assert not isinstance(res, BaseException), res
            finals = [e for e in got if e.finish_reason is not None or e.error is not None]
            assert len(finals) == 1 and finals[0] is got[-1], f"request {i} ended {len(finals)} times"
            toks = [e.token_id for e in got if e.token_id is not None]
            if got[-1].error is None:
                assert toks == expected[i], f"request {i}: other tokens"
            else:
                assert toks == expected[i][:len(toks)], f"request {i}: failed with other tokens"
        await settled(mesh)
        for n in mesh.nodes.values():
            if not n.dead:
                assert not n.serving.entry.requests
                assert all(r.status is Status.FINISHED for r in n.serving.entry.requests.values())
    finally:
        await mesh.close()


async def _collect(entry, prompt, params, out: list) -> None:
    async for ev in entry.generate(prompt, params):
        out.append(ev)


# --- penalties and logprobs at the head --------------------------------------------------------------

def reference_logprobs(manifest: Manifest, prompt: list[int], params: SamplingParams, tokens: list[int]):
    """What one process computes for these tokens: each one's logprob and top list, decoding them."""
    from meshllm.runtime.runner import StageRunner
    from meshllm.runtime.sampling import logprobs_of

    runner = StageRunner(manifest, 0, manifest.config.num_blocks, threads=1)
    runner.alloc("x", len(prompt) + len(tokens) + 1)
    logits = runner.prefill("x", np.array(prompt, np.int64), last_only=True)
    out = []
    for i, t in enumerate(tokens):
        out.append(logprobs_of(logits, params, t, history=tokens[:i]))
        logits = runner.decode(["x"], np.array([t], np.int64))[0]
    return out


async def _events(entry, prompt, params, **kw):
    got = []
    async for ev in entry.generate(prompt, params, **kw):
        assert ev.error is None, ev.error
        got.append(ev)
    return got


@pytest.mark.parametrize("plan", ["one-node", "both-split", "split-differently"])
async def test_penalties_and_logprobs_equal_one_process(make_mesh, tiny_manifest: Manifest, plan: str) -> None:
    mesh = await make_mesh(PLANS[plan])
    entry = mesh.node(names(PLANS[plan])[-1]).serving.entry
    prompt = [11, 12, 13, 11, 12]
    for params in (SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5,
                                  presence_penalty=0.5, logprobs=3),
                   SamplingParams(temperature=0.9, seed=4, max_tokens=10, ignore_eos=True, presence_penalty=1.0,
                                  logit_bias={7: 2.0}, logprobs=2)):
        got = await _events(entry, prompt, params)
        tokens = [e.token_id for e in got]
        assert tokens == reference(tiny_manifest, prompt, params)
        plain = SamplingParams(temperature=params.temperature, seed=params.seed, max_tokens=10, ignore_eos=True)
        if params.temperature == 0.0:  # the penalties change the answer (or the test proves nothing)
            assert tokens != reference(tiny_manifest, prompt, plain)
        ref = reference_logprobs(tiny_manifest, prompt, params, tokens)
        for e, (lp, top) in zip(got, ref, strict=True):
            assert e.logprob == pytest.approx(lp, abs=1e-4)
            assert [t for t, _ in e.top_logprobs] == [t for t, _ in top]
            assert [x for _, x in e.top_logprobs] == pytest.approx([x for _, x in top], abs=1e-4)
    await settled(mesh)


@pytest.mark.parametrize("plan", ["one-node", "split-differently"])
async def test_prompt_logprobs_equal_one_process(make_mesh, tiny_manifest: Manifest, plan: str) -> None:
    from meshllm.runtime.runner import StageRunner
    from meshllm.runtime.sampling import prompt_logprobs

    cfg = ServeConfig(prefill_chunk=4)  # several chunks, so rows cross chunk boundaries
    mesh = await make_mesh(PLANS[plan], cfg)
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 97, size=11)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=2)
    got = await _events(mesh.node("a").serving.entry, prompt, params, prompt_logprobs=True)
    runner = StageRunner(tiny_manifest, 0, tiny_manifest.config.num_blocks, threads=1, prefill_chunk=4)
    runner.alloc("x", len(prompt))
    rows = runner.prefill("x", np.array(prompt, np.int64), last_only=False)  # (P, V)
    ref = prompt_logprobs(rows[:-1], prompt[1:], 2)
    assert got[0].prompt_logprobs is not None and len(got[0].prompt_logprobs) == len(prompt) - 1
    for (lp, top), (rlp, rtop) in zip(got[0].prompt_logprobs, ref, strict=True):
        assert lp == pytest.approx(rlp, abs=1e-4)
        assert [t for t, _ in top] == [t for t, _ in rtop]
    assert all(e.prompt_logprobs is None for e in got[1:])
    await settled(mesh)


async def test_logprobs_and_penalties_survive_failover(make_mesh, tiny_manifest: Manifest) -> None:
    mesh = await make_mesh(PLANS["three-replicas"])
    a = mesh.node("a")
    entry = a.serving.entry
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=1.0, logprobs=1)
    prompt = [21, 22, 23]
    gen = entry.generate(prompt, params)
    got = [await anext(gen), await anext(gen), await anext(gen)]
    rid, r = next(iter(entry.requests.items()))
    entry.handle(a.node_id, Error(RequestId(rid), "simulated step failure", "stage_error", r.attempt))
    assert r.migrations == 1
    async for ev in gen:
        assert ev.error is None
        got.append(ev)
    tokens = [e.token_id for e in got]
    assert tokens == reference(tiny_manifest, prompt, params)
    ref = reference_logprobs(tiny_manifest, prompt, params, tokens)
    assert [e.logprob for e in got] == pytest.approx([lp for lp, _ in ref], abs=1e-4)
    await settled(mesh)


async def test_a_prompt_queued_behind_another_entrys_is_handed_back_and_served_elsewhere(
        make_mesh, tiny_manifest: Manifest) -> None:
    """Two entries send prompts at the same moment to the one-node BOTH replica they both rank
    first (neither knows of the other's: no load report could have come). Replica 0's stage holds
    the first and hands the second back ("busy"), whose entry sends it to replica 1: it is
    answered while replica 0's inference thread is still held, and both answers are the single
    process's tokens."""
    spec = [("both", [("a", 0, 5)]), ("both", [("b", 0, 5)]), ("both", [("c", 0, 5)])]
    mesh = await make_mesh(spec)
    for n in mesh.nodes.values():  # replica 0 the fastest, 1 next: every entry ranks them so
        n.serving.router.prefill_estimate = lambda routes, rid, tokens: (0.01, 0.02, 0.2)[rid] * tokens
    gate = mesh.node("a").hold_inference()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    p1, p2 = [5, 6, 7, 8], [9, 10, 11]
    first = asyncio.ensure_future(answer(mesh.node("b").serving.entry, p1, params))
    second = asyncio.ensure_future(answer(mesh.node("c").serving.entry, p2, params))
    try:
        tokens2, _, error2 = await asyncio.wait_for(second, 30.0)
        assert error2 is None and tokens2 == reference(tiny_manifest, p2, params)
        assert not first.done()  # replica 0 is still held: the second did not wait behind the first
        assert mesh.node("a").serving.stage.core.stats["busy"] == 1
        assert mesh.node("c").serving.entry.core.stats["busy"] == 1
    finally:
        gate.set()
    tokens1, _, error1 = await asyncio.wait_for(first, 30.0)
    assert error1 is None and tokens1 == reference(tiny_manifest, p1, params)
    await settled(mesh)
