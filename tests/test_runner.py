"""StageRunner: KV-cached decoding equals the full forward, ragged batches, hand-off, capacity."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import CapacityError, ConfigError, ContextLengthError, ModelError
from meshllm.model import reference
from meshllm.model.manifest import Manifest
from meshllm.runtime.kv import KVCache
from meshllm.runtime.runner import StageRunner, session_options

ATOL = 1e-4


def _ids(m: Manifest, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, n)


def _runner(m: Manifest, first: int = 0, end: int | None = None, **kw: object) -> StageRunner:
    return StageRunner(m, first, m.config.num_blocks if end is None else end, threads=1, **kw)  # type: ignore[arg-type]


# every compute test runs both ways a stage can run its range: one fused session for the blocks
# before the head (the default) and one session per block
both = pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per_block"])


@both
def test_incremental_decode_equals_full_forward(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    cfg = tiny_manifest.config
    ids = _ids(tiny_manifest, 20, 1)
    want = reference.forward(ids, tiny_weights, cfg)  # (T, V)
    r = _runner(tiny_manifest, fuse=fuse)
    r.alloc("a", 32)
    np.testing.assert_allclose(r.prefill("a", ids[:5]), want[4], atol=ATOL, rtol=0)
    assert r.seq_len("a") == 5
    for t in range(5, 20):
        got = r.decode(["a"], ids[t:t + 1])  # (1, V)
        np.testing.assert_allclose(got[0], want[t], atol=ATOL, rtol=0, err_msg=f"position {t}")
    assert r.seq_len("a") == 20


@both
def test_chunked_prefill_equals_one_prefill(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    cfg = tiny_manifest.config
    ids = _ids(tiny_manifest, 23, 2)
    want = reference.forward(ids, tiny_weights, cfg)
    r = _runner(tiny_manifest, fuse=fuse)
    r.alloc(0, 23)
    parts = [r.prefill(0, ids[a:b], last_only=False) for a, b in ((0, 7), (7, 8), (8, 20), (20, 23))]
    np.testing.assert_allclose(np.concatenate(parts), want, atol=ATOL, rtol=0)


@both
@pytest.mark.parametrize("last_only", [True, False])
def test_long_prompts_run_in_chunks(tiny_manifest: Manifest, tiny_weights, fuse: bool, last_only: bool) -> None:
    cfg = tiny_manifest.config
    ids = _ids(tiny_manifest, 23, 12)
    want = reference.forward(ids, tiny_weights, cfg)
    r = StageRunner(tiny_manifest, 0, cfg.num_blocks, threads=1, fuse=fuse, prefill_chunk=5)
    r.alloc(0, 30)
    got = r.prefill(0, ids, last_only=last_only)
    np.testing.assert_allclose(got, want[-1] if last_only else want, atol=ATOL, rtol=0)
    assert r.seq_len(0) == 23
    np.testing.assert_allclose(r.decode([0], np.array([3]))[0],
                               reference.forward(np.append(ids, 3), tiny_weights, cfg)[-1], atol=ATOL, rtol=0)
    mid = StageRunner(tiny_manifest, 1, 3, threads=1, fuse=fuse, prefill_chunk=4)
    mid.alloc(0, 30)
    hs = reference.hidden_states(ids, tiny_weights, cfg)
    np.testing.assert_allclose(mid.prefill(0, hs[0].astype(np.float32)), hs[2], atol=ATOL, rtol=0)


@both
def test_batched_ragged_decode_equals_one_at_a_time(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    cfg = tiny_manifest.config
    prompts = {f"s{i}": _ids(tiny_manifest, n, 10 + i) for i, n in enumerate((3, 11, 1, 7))}
    steps = 6
    nxt = {s: _ids(tiny_manifest, steps, 50 + i) for i, s in enumerate(prompts)}
    # one sequence at a time
    single = {}
    r1 = _runner(tiny_manifest, max_seqs=1, fuse=fuse)
    for s, p in prompts.items():
        r1.alloc(s, 32)
        r1.prefill(s, p)
        single[s] = np.stack([r1.decode([s], nxt[s][t:t + 1])[0] for t in range(steps)])
        r1.free(s)
    # all together, in a scrambled order, with a freed slot in between so slots are not consecutive
    rb = _runner(tiny_manifest, max_seqs=8, fuse=fuse)
    rb.alloc("gap", 4)
    for s, p in prompts.items():
        rb.alloc(s, 32)
        rb.prefill(s, p)
        if s == "s1":
            rb.free("gap")
            rb.alloc("gap2", 4)
    order = ["s2", "s0", "s3", "s1"]
    batched: dict[str, list[np.ndarray]] = {s: [] for s in prompts}
    for t in range(steps):
        if t == 3:
            order = ["s1", "s3", "s0", "s2"]
        out = rb.decode(order, np.array([nxt[s][t] for s in order]))  # (B, V)
        for j, s in enumerate(order):
            batched[s].append(out[j])
    for s in prompts:
        np.testing.assert_allclose(np.stack(batched[s]), single[s], atol=ATOL, rtol=0, err_msg=s)
        full = reference.forward(np.concatenate([prompts[s], nxt[s]]), tiny_weights, cfg)
        np.testing.assert_allclose(single[s], full[len(prompts[s]):], atol=ATOL, rtol=0, err_msg=s)


@both
def test_decode_of_a_subset_leaves_other_sequences_intact(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    """Moving sequences into consecutive slots for a batch must carry their caches along."""
    cfg = tiny_manifest.config
    r = _runner(tiny_manifest, max_seqs=6, fuse=fuse)
    seqs = {i: _ids(tiny_manifest, 4 + i, 70 + i) for i in range(5)}
    for i, p in seqs.items():
        r.alloc(i, 16)
        r.prefill(i, p)
    tok = {i: _ids(tiny_manifest, 3, 90 + i) for i in seqs}
    pos = dict.fromkeys(seqs, 0)
    for batch in ([0, 2, 4], [1, 3], [4, 0], [3, 2, 1, 0, 4], [2]):
        out = r.decode(batch, np.array([tok[i][pos[i] % 3] for i in batch]))
        for j, i in enumerate(batch):
            seqs[i] = np.append(seqs[i], tok[i][pos[i] % 3])
            pos[i] += 1
            want = reference.forward(seqs[i], tiny_weights, cfg)[-1]
            np.testing.assert_allclose(out[j], want, atol=ATOL, rtol=0, err_msg=f"seq {i} batch {batch}")


@both
def test_split_ranges_chained_equal_one_runner(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    cfg = tiny_manifest.config
    L = cfg.num_layers
    ids = _ids(tiny_manifest, 9, 4)
    more = _ids(tiny_manifest, 4, 5)
    whole = _runner(tiny_manifest, fuse=fuse)
    stages = [_runner(tiny_manifest, 0, 2, fuse=fuse), _runner(tiny_manifest, 2, L + 1, fuse=fuse),
              _runner(tiny_manifest, L + 1, fuse=fuse)]
    whole.alloc("q", 16)
    for s in stages:
        s.alloc("q", 16)
    want = whole.prefill("q", ids, last_only=False)
    h = ids
    for s in stages:
        h = s.prefill("q", h, last_only=False)
    np.testing.assert_allclose(h, want, atol=ATOL, rtol=0)
    for t in more:
        want = whole.decode(["q"], np.array([t]))
        h = np.array([t])
        for s in stages:
            h = s.decode(["q"], h)
        assert h.shape == (1, cfg.vocab_size)
        np.testing.assert_allclose(h, want, atol=ATOL, rtol=0)
    # a middle stage outputs hidden states; the head-less first stage too
    assert stages[0].decode(["q"], np.array([1])).shape == (1, cfg.hidden_size)


@both
def test_kv_export_import_hands_a_sequence_to_another_runner(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    cfg = tiny_manifest.config
    ids = _ids(tiny_manifest, 13, 6)
    cont = _ids(tiny_manifest, 5, 7)
    want = reference.forward(np.concatenate([ids, cont]), tiny_weights, cfg)
    prefill_node = _runner(tiny_manifest, fuse=fuse)
    prefill_node.alloc("r", 13)
    first_logits = prefill_node.prefill("r", ids)
    np.testing.assert_allclose(first_logits, want[12], atol=ATOL, rtol=0)
    decode_node = _runner(tiny_manifest, max_seqs=3, fuse=fuse)
    decode_node.alloc("other", 8)
    decode_node.alloc("r", 32)
    for b in range(1, cfg.num_layers + 1):
        k, v = prefill_node.kv_export("r", b)
        assert k.shape == v.shape == (13, cfg.num_kv_heads, cfg.head_dim)
        if b == 1:  # layer-wise streaming of chunks: two pieces
            decode_node.kv_import("r", b, k[:8], v[:8])
            with pytest.raises(ModelError, match="incomplete"):
                decode_node.decode(["r"], cont[:1])
            decode_node.kv_import("r", b, k[8:], v[8:], start=8)
        else:
            decode_node.kv_import("r", b, k, v)
    prefill_node.free("r")
    assert decode_node.seq_len("r") == 13
    for t in range(5):
        got = decode_node.decode(["r"], cont[t:t + 1])[0]
        np.testing.assert_allclose(got, want[13 + t], atol=ATOL, rtol=0)
    k2, _ = decode_node.kv_export("r", 1)
    assert k2.shape[0] == 18


def test_kv_budget_exhaustion_and_slot_reuse(tiny_manifest: Manifest) -> None:
    cfg = tiny_manifest.config
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4 * cfg.num_layers
    r = _runner(tiny_manifest, kv_budget_bytes=per_token * 40, max_seqs=4)
    assert r.kv_bytes_per_token == per_token
    r.alloc("a", 30)
    with pytest.raises(CapacityError, match="budget"):
        r.alloc("b", 11)
    r.alloc("b", 10)
    r.prefill("a", _ids(tiny_manifest, 5, 1))
    r.free("a")
    r.alloc("c", 30)  # the freed reservation and slot are reusable
    out = r.prefill("c", _ids(tiny_manifest, 5, 1))
    fresh = _runner(tiny_manifest)
    fresh.alloc(0, 30)
    np.testing.assert_allclose(out, fresh.prefill(0, _ids(tiny_manifest, 5, 1)), atol=1e-6, rtol=0)


def test_slot_exhaustion(tiny_manifest: Manifest) -> None:
    r = _runner(tiny_manifest, max_seqs=2)
    r.alloc(1, 4)
    r.alloc(2, 4)
    with pytest.raises(CapacityError, match="slots"):
        r.alloc(3, 4)
    r.free(1)
    r.alloc(3, 4)
    with pytest.raises(CapacityError, match="already"):
        r.alloc(3, 4)


def test_bad_use_gets_clear_errors(tiny_manifest: Manifest) -> None:
    cfg = tiny_manifest.config
    r = _runner(tiny_manifest, max_seqs=2)
    with pytest.raises(ContextLengthError):
        r.alloc("long", cfg.max_position + 1)
    r.alloc("s", 4)
    with pytest.raises(CapacityError, match="exceed"):
        r.prefill("s", np.arange(5))
    r.prefill("s", np.arange(3))
    r.decode(["s"], np.array([1]))
    with pytest.raises(CapacityError, match="full"):
        r.decode(["s"], np.array([1]))
    with pytest.raises(CapacityError, match="unknown"):
        r.decode(["nope"], np.array([1]))
    with pytest.raises(CapacityError, match="unknown"):
        r.free("nope")
    r.alloc("t", 8)
    with pytest.raises(ModelError, match="token id"):
        r.prefill("t", np.array([cfg.vocab_size]))
    with pytest.raises(ModelError, match="token ids"):
        r.prefill("t", np.zeros((2, cfg.hidden_size), np.float32))
    with pytest.raises(ModelError, match="rows"):
        r.decode(["t"], np.array([1, 2]))
    with pytest.raises(ModelError, match="twice"):
        r.decode(["t", "t"], np.array([1, 2]))
    with pytest.raises(ModelError, match="not a decoder layer"):
        r.kv_export("t", 0)
    mid = _runner(tiny_manifest, 1, 2)
    mid.alloc("h", 8)
    with pytest.raises(ModelError, match="hidden"):
        mid.prefill("h", np.arange(3))
    with pytest.raises(ModelError, match="kv_import"):
        mid.kv_import("h", 1, np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ModelError, match="range"):
        StageRunner(tiny_manifest, 2, 2)
    with pytest.raises(ConfigError, match="slowdown"):
        StageRunner(tiny_manifest, 0, 1, slowdown=0.5)
    with pytest.raises(ConfigError, match="slot_len"):
        StageRunner(tiny_manifest, 0, 1, slot_len=cfg.max_position + 1)
    short = _runner(tiny_manifest, slot_len=8)
    with pytest.raises(ContextLengthError):
        short.alloc("x", 9)
    short.alloc("x", 8)


def test_slowdown_really_slows(tiny_manifest: Manifest) -> None:
    r = _runner(tiny_manifest, slowdown=3.0)
    r.alloc(0, 40)
    t0 = time.perf_counter()
    r.prefill(0, np.arange(30))
    wall = time.perf_counter() - t0
    # the runner sleeps (F - 1) x its measured compute time after computing
    assert r.last_compute_s > 0
    assert wall >= 3.0 * r.last_compute_s * 0.99


def test_sessions_use_given_threads_and_no_spinning() -> None:
    so = session_options(3)
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_fused_range_is_one_session_plus_head(tiny_manifest: Manifest) -> None:
    cfg = tiny_manifest.config
    assert [u.blocks for u in _runner(tiny_manifest, fuse=True).units] == [list(range(cfg.num_layers + 1)),
                                                                            [cfg.num_layers + 1]]
    assert len(_runner(tiny_manifest, fuse=False).units) == cfg.num_blocks
    assert len(_runner(tiny_manifest, 1, 3, fuse=True).units) == 1


@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "batch"]), st.integers(0, 9),
                          st.sets(st.integers(0, 9), min_size=1, max_size=6)), max_size=40))
@settings(max_examples=60, deadline=None)
def test_kv_arrange_keeps_every_sequence_with_its_cache(ops: list[tuple[str, int, set[int]]]) -> None:
    """Any mix of alloc/free/batches: a batch ends up in consecutive slots and every sequence's
    cache contents travel with it."""
    kv = KVCache([1, 2], kv_heads=2, head_dim=4, slot_len=8, max_seqs=8, budget_bytes=None)

    def fill(seq: int) -> None:
        st_ = kv.seqs[seq]
        st_.length = 3
        st_.layer_len = dict.fromkeys(st_.layer_len, 3)
        for b in kv.blocks:
            kv.k[b][st_.slot, :, :3] = seq + 100 * b
            kv.v[b][st_.slot, :, :3] = -(seq + 100 * b)

    for op, seq, batch in ops:
        if op == "alloc" and seq not in kv.seqs and len(kv.seqs) < kv.max_seqs:
            kv.alloc(seq, 8)
            fill(seq)
        elif op == "free" and seq in kv.seqs:
            kv.free(seq)
        elif op == "batch":
            members = [s for s in batch if s in kv.seqs]
            if members:
                s0 = kv.arrange(members)
                assert sorted(kv.seqs[s].slot for s in members) == list(range(s0, s0 + len(members)))
        for s, state in kv.seqs.items():
            assert kv.owner[state.slot] == s
            for b in kv.blocks:
                assert (kv.k[b][state.slot, :, :3] == s + 100 * b).all()
                assert (kv.v[b][state.slot, :, :3] == -(s + 100 * b)).all()


@both
def test_decode_writes_only_the_new_position_in_place(tiny_manifest: Manifest, fuse: bool) -> None:
    """The attention kernel shares the slot buffer as past and present: it appends in place. Had
    it run in copy mode (present != past), it would have cleared and rewritten the whole buffer,
    erasing the sentinel past the sequence's end."""
    r = _runner(tiny_manifest, max_seqs=2, fuse=fuse)
    r.alloc("a", 20)
    r.prefill("a", _ids(tiny_manifest, 5, 3))
    slot = r.kv.seqs["a"].slot
    bufs = [r.kv.k[b] for b in r.layer_blocks] + [r.kv.v[b] for b in r.layer_blocks]
    before = [buf[slot, :, :5].copy() for buf in bufs]
    for buf in bufs:
        buf[slot, :, 6:] = 7.0
    r.decode(["a"], np.array([1]))
    for buf, old in zip(bufs, before, strict=True):
        np.testing.assert_array_equal(buf[slot, :, :5], old)  # the past is untouched
        assert np.abs(buf[slot, :, 5]).max() > 0  # the new position was written
        assert (buf[slot, :, 6:] == 7.0).all()  # nothing beyond it
