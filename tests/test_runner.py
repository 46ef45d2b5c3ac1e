"""StageRunner: KV-cached decoding equals the full forward, ragged batches, hand-off, capacity."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import CapacityError, ConfigError, ContextLengthError, ModelError
from meshllm.model import reference
from meshllm.model.manifest import Manifest
from meshllm.runtime.kv import KVCache
from meshllm.runtime.pacing import Pacer
from meshllm.runtime.runner import StageRunner, session_options

ATOL = 1e-4


def _ids(m: Manifest, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, n)


def _runner(m: Manifest, first: int = 0, end: int | None = None, **kw: object) -> StageRunner:
    return StageRunner(m, first, m.config.num_blocks if end is None else end, threads=1, **kw)  # type: ignore[arg-type]


# every compute test runs both ways a stage can run its range: one fused session for the whole
# range, the head included (the default), and one session per block
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
    # the runner waits (F - 1) x its step's reference after computing, the step's own compute
    # for a shape seen once (runtime/pacing.py; tests/test_pacing.py has the rule on a fake clock)
    assert r.last_compute_s > 0
    assert wall >= 3.0 * r.last_compute_s * 0.99


def test_slowed_steps_are_paced_by_their_shape(tiny_manifest: Manifest) -> None:
    """The runner names each step's shape to its pacer: a prefill by its tokens (the work its
    reference scales with) and context, a decode step by its batch, positions and context."""
    seen: list[tuple[object, float]] = []

    class Recording(Pacer):
        def pace(self, t0: float, key: object = None, work: float = 1.0) -> float:
            seen.append((key, work))
            return super().pace(t0, key, work)

    r = _runner(tiny_manifest, slowdown=1.5)
    r.pacer = Recording(1.5)
    r.alloc(0, 40)
    r.alloc(1, 40)
    r.prefill(0, np.arange(5))
    r.prefill(1, np.arange(3))
    r.decode([0], np.array([1]))
    r.decode([0, 1], np.array([1, 2]))
    assert seen == [(("prefill", 3, 3), 5), (("prefill", 2, 2), 3), (("decode", 1, 1, 3), 1.0),
                    (("decode", 2, 1, 3), 1.0)]
    assert r.last_compute_s == r.pacer.last_compute_s > 0


def test_sessions_use_given_threads_and_no_spinning() -> None:
    so = session_options(3)
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_fused_range_is_one_session(tiny_manifest: Manifest) -> None:
    cfg = tiny_manifest.config
    fused = _runner(tiny_manifest, fuse=True)
    assert [u.blocks for u in fused.units] == [list(range(cfg.num_blocks))] and fused.units[0].rows
    assert len(_runner(tiny_manifest, fuse=False).units) == cfg.num_blocks
    assert len(_runner(tiny_manifest, 1, 3, fuse=True).units) == 1


def test_fused_head_computes_the_rows_asked(tiny_manifest: Manifest) -> None:
    """The head inside the stage's one session runs on the last position of a prompt (every
    position with ``last_only=False``), across chunks, with the numbers of a separate head."""
    cfg = tiny_manifest.config
    ids = np.arange(1, 12) % cfg.vocab_size
    outs = {}
    for fuse in (True, False):
        r = _runner(tiny_manifest, fuse=fuse, prefill_chunk=4)
        r.alloc("a", 20)
        r.alloc("b", 20)
        last = r.prefill("a", ids)
        full = r.prefill("b", ids, last_only=False)
        step = r.decode(["a", "b"], np.array([3, 4]))
        outs[fuse] = (last, full, step)
    for got, want in zip(outs[True], outs[False], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    last, full, _ = outs[True]
    assert last.shape == (cfg.vocab_size,) and full.shape == (len(ids), cfg.vocab_size)
    np.testing.assert_allclose(full[-1], last, rtol=1e-5, atol=1e-5)


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


# --- the data plane's additions ------------------------------------------------------------------

@both
def test_kv_export_ranges_are_slices_of_the_full_export(tiny_manifest: Manifest, fuse: bool) -> None:
    r = _runner(tiny_manifest, fuse=fuse)
    r.alloc("p", 20)
    ids = _ids(tiny_manifest, 13, 21)
    r.prefill("p", ids[:8])
    for b in r.layer_blocks:  # a prefill stage streams each chunk's new positions
        k, v = r.kv_export("p", b, 0, 8)
        assert k.shape == v.shape == (8, tiny_manifest.config.num_kv_heads, tiny_manifest.config.head_dim)
    first = {b: r.kv_export("p", b, 0, 8) for b in r.layer_blocks}
    r.prefill("p", ids[8:])
    for b in r.layer_blocks:
        k, v = r.kv_export("p", b)
        assert k.shape[0] == 13 and k.dtype == np.float32
        np.testing.assert_array_equal(first[b][0], k[:8])
        for a, e in ((8, None), (3, 11), (5, 5), (0, 13), (12, 13)):
            ka, va = r.kv_export("p", b, a, e)
            np.testing.assert_array_equal(ka, k[a:e])
            np.testing.assert_array_equal(va, v[a:e])
    for a, e in ((-1, 3), (4, 3), (0, 14)):
        with pytest.raises(ModelError, match="range"):
            r.kv_export("p", 1, a, e)


@both
def test_truncate_then_decode_equals_never_having_the_tail(tiny_manifest: Manifest, tiny_weights,
                                                           fuse: bool) -> None:
    cfg = tiny_manifest.config
    ids = _ids(tiny_manifest, 14, 31)
    other = _ids(tiny_manifest, 5, 32)
    r = _runner(tiny_manifest, fuse=fuse)
    r.alloc("t", 30)
    r.prefill("t", ids)
    r.decode(["t"], np.array([7]))
    r.truncate("t", 9)
    assert r.seq_len("t") == 9
    want = reference.forward(np.concatenate([ids[:9], other]), tiny_weights, cfg)
    np.testing.assert_allclose(r.prefill("t", other[:2], last_only=False), want[9:11], atol=ATOL, rtol=0)
    for j in range(2, 5):
        np.testing.assert_allclose(r.decode(["t"], other[j:j + 1])[0], want[9 + j], atol=ATOL, rtol=0)
    r.truncate("t", 0)  # back to an empty sequence: a fresh prefill
    np.testing.assert_allclose(r.prefill("t", ids[:4]), reference.forward(ids[:4], tiny_weights, cfg)[-1],
                               atol=ATOL, rtol=0)
    with pytest.raises(ModelError, match="truncate"):
        r.truncate("t", 5)
    with pytest.raises(CapacityError, match="unknown"):
        r.truncate("nope", 0)


@both
def test_decode_rows_runs_the_good_rows_exactly_and_reports_the_bad(tiny_manifest: Manifest, fuse: bool) -> None:
    cfg = tiny_manifest.config

    def setup() -> StageRunner:
        r = _runner(tiny_manifest, max_seqs=8, fuse=fuse)
        for i, n in enumerate((5, 3, 9, 4)):
            r.alloc(f"ok{i}", 16)
            r.prefill(f"ok{i}", _ids(tiny_manifest, n, 40 + i))
        r.alloc("full", 3)
        r.prefill("full", _ids(tiny_manifest, 3, 50))
        r.alloc("half", 16)  # KV imported for one layer only
        r.kv_import("half", 1, np.zeros((2, cfg.num_kv_heads, cfg.head_dim)),
                    np.zeros((2, cfg.num_kv_heads, cfg.head_dim)))
        r.alloc("gone", 8)
        r.free("gone")
        r.alloc("badtok", 8)
        r.prefill("badtok", _ids(tiny_manifest, 2, 51))
        return r

    r = setup()
    seqs = ["full", "ok2", "gone", "ok0", "half", "badtok", "ok3", "ok1"]
    toks = np.array([1, 2, 3, 4, 5, cfg.vocab_size + 3, 6, 7])
    out, rows, errors = r.decode_rows(seqs, toks)
    assert rows == [1, 3, 6, 7]
    assert set(errors) == {"full", "gone", "half", "badtok"}
    assert isinstance(errors["full"], CapacityError) and "full" in str(errors["full"])
    assert isinstance(errors["gone"], CapacityError) and "unknown" in str(errors["gone"])
    assert isinstance(errors["half"], ModelError) and "incomplete" in str(errors["half"])
    assert isinstance(errors["badtok"], ModelError) and "token id" in str(errors["badtok"])
    alone = setup().decode([seqs[i] for i in rows], toks[rows])
    np.testing.assert_array_equal(out, alone)
    assert r.seq_len("ok2") == 10 and r.seq_len("full") == 3 and r.seq_len("badtok") == 2
    out, rows, errors = r.decode_rows(["full", "gone"], np.array([1, 2]))
    assert out.shape == (0, cfg.vocab_size) and rows == [] and set(errors) == {"full", "gone"}
    with pytest.raises(ModelError, match="twice"):
        r.decode_rows(["ok0", "ok0"], np.array([1, 2]))
    with pytest.raises(ModelError, match="rows"):
        r.decode_rows(["ok0", "ok1"], np.array([1]))
    with pytest.raises(ModelError, match="token ids"):
        r.decode_rows(["ok0", "ok1"], np.array([1.0, 2.0]))
    mid = _runner(tiny_manifest, 1, 3, fuse=fuse)
    mid.alloc("h", 8)
    mid.prefill("h", np.zeros((2, cfg.hidden_size), np.float32))
    with pytest.raises(ModelError, match="hidden"):
        mid.decode_rows(["h"], np.array([1]))
    out, rows, errors = mid.decode_rows(["h", "nope"], np.ones((2, cfg.hidden_size), np.float32))
    assert out.shape == (1, cfg.hidden_size) and rows == [0] and set(errors) == {"nope"}


def _filled_kv(max_seqs: int = 12) -> KVCache:
    return KVCache([1, 2], kv_heads=2, head_dim=4, slot_len=8, max_seqs=max_seqs, budget_bytes=None)


def test_groups_decode_without_moving_other_groups() -> None:
    """Two micro-batches (groups) whose members join and leave between steps: each batch costs
    at most one move per sequence that joined or left since its last step, and a group's steps
    never move the other group's sequences (while the cache has room for both groups' windows:
    here up to 6 members each in 16 slots)."""
    kv = _filled_kv(max_seqs=16)
    rng = np.random.default_rng(3)
    groups: dict[str, list[str]] = {"A": [], "B": []}
    n = 0
    events = dict.fromkeys(groups, 0)
    for step in range(200):
        g = "AB"[step % 2]
        if groups[g] and rng.random() < 0.3:  # one leaves
            s = groups[g].pop(int(rng.integers(len(groups[g]))))
            kv.free(s)
            events[g] += 1
        if len(groups[g]) < 6 and (not groups[g] or rng.random() < 0.5):  # one joins
            n += 1
            kv.alloc(f"{g}{n}", 8, group=g)
            groups[g].append(f"{g}{n}")
            events[g] += 1
        other = {s: kv.seqs[s].slot for h, ss in groups.items() if h != g for s in ss}
        before = kv.moves
        s0 = kv.arrange(groups[g])
        assert sorted(kv.seqs[s].slot for s in groups[g]) == list(range(s0, s0 + len(groups[g])))
        assert {s: kv.seqs[s].slot for s in other} == other, "another group's sequence moved"
        assert kv.moves - before <= events[g], (step, kv.moves - before, events[g])
        events[g] = 0
    assert kv.moves <= 100  # bounded by joins and leaves, not by batch size x steps


def test_a_full_window_grows_or_moves_its_group_once() -> None:
    kv = _filled_kv(max_seqs=16)
    for i in range(6):
        kv.alloc(("a", i), 8, group="a")
    kv.alloc("b0", 8, group="b")
    before = kv.moves
    for i in range(6, 9):  # a's window fills; it grows or moves, it never takes b's slots
        kv.alloc(("a", i), 8, group="a")
    slots = sorted(kv.seqs["a", i].slot for i in range(9))
    assert slots == list(range(slots[0], slots[0] + 9))
    assert kv.moves - before <= 6 and kv.arrange([("a", i) for i in range(9)]) == slots[0]
    assert kv.seqs["b0"].slot not in slots


@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "batch", "group"]), st.integers(0, 9),
                          st.sets(st.integers(0, 9), min_size=1, max_size=6)), max_size=40))
@settings(max_examples=60, deadline=None)
def test_kv_arrange_with_groups_keeps_every_sequence_with_its_cache(ops: list[tuple[str, int, set[int]]]) -> None:
    """Grouped, ungrouped, mixed batches, slots exhausted: every batch ends up consecutive and
    every cache travels with its sequence (the fallback path included)."""
    kv = _filled_kv(max_seqs=8)
    for op, seq, batch in ops:
        if op in ("alloc", "group") and seq not in kv.seqs and len(kv.seqs) < kv.max_seqs:
            kv.alloc(seq, 8, group=seq % 3 if op == "group" else None)
            st_ = kv.seqs[seq]
            st_.length = 3
            st_.layer_len = dict.fromkeys(st_.layer_len, 3)
            for b in kv.blocks:
                kv.k[b][st_.slot, :, :3] = seq + 100 * b
                kv.v[b][st_.slot, :, :3] = -(seq + 100 * b)
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
        assert sum(o is not None for o in kv.owner) == len(kv.seqs)


@both
def test_grouped_sequences_decode_exactly(tiny_manifest: Manifest, tiny_weights, fuse: bool) -> None:
    cfg = tiny_manifest.config
    r = _runner(tiny_manifest, max_seqs=6, fuse=fuse)
    ctx = {}
    for i in range(6):
        ctx[i] = _ids(tiny_manifest, 3 + i, 60 + i)
        r.alloc(i, 16, group=i % 2)
        r.prefill(i, ctx[i])
    for batch in ([0, 2, 4], [1, 3, 5], [0, 4], [5, 1, 3], [2, 3]):
        out = r.decode(batch, np.array([7 + i for i in batch]))
        for j, i in enumerate(batch):
            ctx[i] = np.append(ctx[i], 7 + i)
            np.testing.assert_allclose(out[j], reference.forward(ctx[i], tiny_weights, cfg)[-1],
                                       atol=ATOL, rtol=0, err_msg=f"{i} in {batch}")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_dropping_rejected_drafts_makes_no_system_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # a speculative step's rejected drafts are a few positions, in pages the next step writes
    # again: truncating them hands nothing back; dropping a page's worth or more still does, only
    # up to what the sequence held (the pages beyond were never touched)
    from meshllm.runtime import kv as kvmod

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(kvmod._SlotBuffer, "release", lambda self, a, b: calls.append((a, b)))
    kv = KVCache([1, 2], kv_heads=2, head_dim=64, slot_len=4096, max_seqs=2, budget_bytes=None)
    st_ = kv.alloc("a", 4096)
    st_.length = 100
    st_.layer_len = dict.fromkeys(st_.layer_len, 100)
    kv.truncate("a", 96)  # 4 positions: 1 KiB per head, less than a page
    assert calls == [] and st_.length == 96
    kv.truncate("a", 40)  # 56 positions: pages go back, in each of 2 layers x k, v x 2 heads
    row = 4096 * 64 * 4  # bytes of one head's positions
    held = -(-96 * 64 * 4 // mmap.PAGESIZE) * mmap.PAGESIZE  # the 96 positions held, to a whole page
    assert len(calls) == 8 and {(a % row, b % row) for a, b in calls} == {(40 * 64 * 4, held)}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_freeing_a_sequence_gives_its_kv_pages_back() -> None:
    kv = KVCache([1, 2, 3, 4], kv_heads=2, head_dim=64, slot_len=4096, max_seqs=3, budget_bytes=None)
    slot_bytes = 8 * 2 * 4096 * 64 * 4  # 8 buffers x (kv_heads, slot_len, head_dim) float32: 16 MiB
    kv.alloc("a", 4096)
    kv.alloc("b", 4096)
    base = _rss()
    for name in ("a", "b"):
        st_ = kv.seqs[name]
        for buf in (*kv.k.values(), *kv.v.values()):
            buf[st_.slot] = 1.0
        st_.length = 4096
        st_.layer_len = dict.fromkeys(st_.layer_len, 4096)
    touched = _rss()
    assert touched - base >= 0.9 * 2 * slot_bytes
    kv.truncate("a", 1024)  # the dropped three quarters of a go back
    truncated = _rss()
    assert touched - truncated >= 0.7 * slot_bytes
    assert (kv.k[1][kv.seqs["a"].slot, :, :1024] == 1.0).all()
    assert (kv.k[1][kv.seqs["a"].slot, :, 1100:4000] == 0.0).all()  # released pages read back as zeros
    slot_b = kv.seqs["b"].slot
    kv.free("b")
    freed = _rss()
    assert truncated - freed >= 0.9 * slot_bytes
    assert (kv.k[1][slot_b, :, 16:4080] == 0.0).all()
    kv.free("a")
    assert _rss() - base <= 0.05 * slot_bytes + (1 << 20)


def _initializer_bytes_in_memory(path: Path) -> int:
    """Bytes a block's weights take once loaded, read from its graph: a float16 weight that the
    graph casts to float32 counts as its float32 copy; an int4 matrix (MatMulNBits) run at
    accuracy level 4 adds onnxruntime's float32 scale and block sum per block of 32."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    cast = {n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    total = 0
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f":
            total += a.size * 4 if (a.dtype == np.float16 and t.name in cast) else a.nbytes
        elif a.dtype == np.uint8:  # packed int4 weights and zero points
            total += a.nbytes
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {x.name: x.i for x in n.attribute}
            if attrs.get("accuracy_level") == 4:
                total += attrs["K"] * attrs["N"] // 32 * 8
    return total


@pytest.mark.parametrize("dtype,mode", [("float32", None), ("float16", None), ("int4", "fast"), ("int4", "exact")])
def test_weight_bytes_resident_counts_weights_as_they_sit_in_memory(tmp_path: Path, tiny_weights, tiny_config,
                                                                    dtype: str, mode: str | None) -> None:
    from meshllm.model.export import export_model

    kw = {"int4_mode": mode} if mode else {}
    m = export_model(tiny_weights, tiny_config, tmp_path / dtype, name="t", weight_dtype=dtype, progress=False, **kw)
    L = tiny_config.num_layers
    for first, end in ((0, L + 2), (1, 3), (L + 1, L + 2), (0, 1)):
        want = sum(_initializer_bytes_in_memory(m.block_path(b)) for b in range(first, end))
        got = StageRunner(m, first, end, threads=1, max_seqs=1).weight_bytes_resident
        if dtype == "int4":  # the manifest's analytic int4 bytes round the zero points' packing
            assert abs(got - want) <= 0.02 * want, (first, end, got, want)
        else:
            assert got == want, (first, end)


# --- several positions per row in one pass (speculation's verification) -------------------------------

def _one_pass_cases(m: Manifest, r: StageRunner, prefill: bool = True) -> None:
    """Logits of positions computed in one pass (prefill of several, rows of different counts and
    lengths in one ``decode_rows``) equal, bit for bit, the same positions decoded one at a time."""
    prompt, toks = _ids(m, 7, 3), _ids(m, 8, 4)
    r.alloc("steps", 20)
    r.prefill("steps", prompt)
    steps = [r.decode(["steps"], toks[i:i + 1])[0].copy() for i in range(8)]
    for s in ("pass", "c5", "c1", "late", "b1", "b2"):
        r.alloc(s, 20)
        r.prefill(s, prompt)
    if prefill:
        np.testing.assert_array_equal(r.prefill("pass", toks[:6], last_only=False), np.stack(steps[:6]))
    if prefill:
        r.prefill("late", toks[:2], last_only=False)  # a longer row in the same pass
    else:  # GroupQueryAttention's prefill of several positions rounds differently from steps
        for i in range(2):
            r.decode(["late"], toks[i:i + 1])
    x = np.concatenate([toks[:5], toks[:1], toks[2:5]])
    out, ok, errors = r.decode_rows(["c5", "c1", "late"], x, counts=[5, 1, 3])
    assert ok == [0, 1, 2] and not errors
    np.testing.assert_array_equal(out, np.stack(steps[:5] + steps[:1] + steps[2:5]))
    assert [r.seq_len(s) for s in ("c5", "c1", "late")] == [12, 8, 12]
    out, ok, _ = r.decode_rows(["b1", "b2"], toks[:2])  # a batch of one-position rows, too
    np.testing.assert_array_equal(out[0], steps[0])


@pytest.mark.parametrize(("dtype", "mode", "kv_heads"), [
    ("float32", None, 2), ("int4", "fast", 2), ("float32", None, 4)], ids=["float32", "int4-fast", "one-head-groups"])
def test_a_pass_of_several_positions_equals_one_position_steps_bitwise(
        tmp_path: Path, tiny_weights, tiny_config, dtype: str, mode: str | None, kv_heads: int) -> None:
    from dataclasses import replace

    from meshllm.model.export import export_model, random_weights

    cfg, w = tiny_config, tiny_weights
    if kv_heads != cfg.num_kv_heads:  # one kv head per head: the attention pads its query rows
        cfg = replace(cfg, num_kv_heads=kv_heads)
        w = random_weights(cfg, np.random.default_rng(5))
    m = export_model(w, cfg, tmp_path / "m", name="t", weight_dtype=dtype, progress=False,
                     **({"int4_mode": mode} if mode else {}))
    for fuse in (True, False):
        r = StageRunner(m, 0, cfg.num_blocks, threads=2, fuse=fuse, one_pass=True)
        assert r.one_pass_exact
        _one_pass_cases(m, r)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-block"])
def test_without_one_pass_a_pass_runs_as_one_position_steps(tiny_manifest: Manifest, fuse: bool) -> None:
    """The block files' GroupQueryAttention (``one_pass=False``): rows of several positions are still
    the positions of one-position steps, bit for bit, run as those steps; it claims no one-pass
    exactness, so the serving core does not count on one pass."""
    r = StageRunner(tiny_manifest, 0, tiny_manifest.config.num_blocks, threads=2, fuse=fuse, one_pass=False)
    assert not r.one_pass and not r.one_pass_exact
    _one_pass_cases(tiny_manifest, r, prefill=False)


def test_attention_products_rows_do_not_depend_on_how_many_there_are() -> None:
    """What the rewritten attention stands on: onnxruntime's MatMul (MLAS's blocked kernel) gives
    each row of A the same bytes whatever M >= 2 is, for q.Kt (K = head_dim, N = T, scaled) and
    P.V (K = T), at attended lengths around MLAS's block edges; M = 1 does not (its own kernel)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def session(trans_b: bool) -> ort.InferenceSession:
        nodes = [helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 1, 3, 2])] if trans_b else []
        nodes += [helper.make_node("MatMul", ["a", "bt" if trans_b else "b"], ["p"]),
                  helper.make_node("Mul", ["p", "s"], ["y"])]
        f = TensorProto.FLOAT
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", f, ["B", "H", "M", "K"]),
                                           helper.make_tensor_value_info("b", f, ["B", "H", "X", "Y"])],
                              [helper.make_tensor_value_info("y", f, None)],
                              [numpy_helper.from_array(np.array(0.125 if trans_b else 1.0, np.float32), "s")])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        return ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), so)

    scores, pv = session(True), session(False)
    rng = np.random.default_rng(11)
    for T in (1, 2, 7, 31, 64, 127, 128, 129, 255, 256, 257, 300, 1023, 1024, 1025):
        q = rng.standard_normal((2, 3, 12, 64)).astype(np.float32)
        keys = rng.standard_normal((2, 3, T, 64)).astype(np.float32)
        probs = rng.random((2, 3, 12, T)).astype(np.float32)
        values = rng.standard_normal((2, 3, T, 64)).astype(np.float32)
        full_s = scores.run(None, {"a": q, "b": keys})[0]
        full_p = pv.run(None, {"a": probs, "b": values})[0]
        for m in (2, 3, 5, 6, 9):
            for off in (0, 3, 12 - m):
                a, b = slice(off, off + m), slice(off, off + m)
                np.testing.assert_array_equal(scores.run(None, {"a": q[:, :, a].copy(), "b": keys})[0], full_s[:, :, b])
                np.testing.assert_array_equal(pv.run(None, {"a": probs[:, :, a].copy(), "b": values})[0], full_p[:, :, b])
    one = pv.run(None, {"a": probs[:, :, :1].copy(), "b": values})[0]
    assert not np.array_equal(one, full_p[:, :, :1])  # the test can tell kernels apart


def test_a_pass_equals_steps_over_a_long_context(tmp_path: Path, tiny_weights, tiny_config) -> None:
    """Attended lengths across the matrix kernels' block edges (T of 250..262), passes of 2..6."""
    from dataclasses import replace

    from meshllm.model.export import export_model

    cfg = replace(tiny_config, max_position=300)
    m = export_model(tiny_weights, cfg, tmp_path / "m", name="t", progress=False)
    r = StageRunner(m, 0, cfg.num_blocks, threads=2, max_seqs=3, one_pass=True)
    prompt, toks = _ids(m, 250, 8), _ids(m, 6, 9)
    for s in ("steps", "pass", "short"):
        r.alloc(s, 300)
        r.prefill(s, prompt)
    steps = [r.decode(["steps"], toks[i:i + 1])[0].copy() for i in range(6)]
    for n in range(2, 7):
        out, ok, _ = r.decode_rows(["pass", "short"], np.concatenate([toks[:n], toks[:1]]), counts=[n, 1])
        assert ok == [0, 1]
        np.testing.assert_array_equal(out, np.stack(steps[:n] + steps[:1]))
        r.truncate("pass", 250)
        r.truncate("short", 250)


def test_passes_of_one_shape_reuse_their_bindings_and_still_equal_steps(tiny_manifest: Manifest) -> None:
    """A pass's bindings are made once per slot range and shape (rows, positions, longest row) and
    reused: passes of that shape whose rows carry different counts at other positions still give
    the one-position steps' logits bit for bit."""
    m = tiny_manifest
    r = StageRunner(m, 0, m.config.num_blocks, threads=1, max_seqs=3, one_pass=True)
    prompt, toks = _ids(m, 7, 3), _ids(m, 8, 4)
    r.alloc("steps", 20)
    r.prefill("steps", prompt)
    steps = [r.decode(["steps"], toks[i:i + 1])[0].copy() for i in range(5)]
    for s in ("a", "b"):
        r.alloc(s, 20)
        r.prefill(s, prompt)
    # rows a and b feed on from where each is: counts (2, 1), then (1, 2), then (2, 1)
    for feed, counts, want in ((toks[[0, 1, 0]], [2, 1], [0, 1, 0]), (toks[[2, 1, 2]], [1, 2], [2, 1, 2]),
                               (toks[[3, 4, 3]], [2, 1], [3, 4, 3])):
        out, ok, _ = r.decode_rows(["a", "b"], feed, counts=counts)
        assert ok == [0, 1]
        np.testing.assert_array_equal(out, np.stack([steps[i] for i in want]))
    assert [r.seq_len(s) for s in ("a", "b")] == [12, 11]
    assert sum(len(k) == 4 for k in r._steps) == 1  # one pass shape, bound once


def test_int4_exact_does_not_claim_one_pass_exactness(tmp_path: Path, tiny_weights, tiny_config) -> None:
    from meshllm.model.export import export_model

    m = export_model(tiny_weights, tiny_config, tmp_path / "m", name="t", weight_dtype="int4",
                     int4_mode="exact", progress=False)
    assert not StageRunner(m, 0, tiny_config.num_blocks, threads=1, one_pass=True).one_pass_exact


def test_decode_rows_with_counts_checks_them(tiny_manifest: Manifest) -> None:
    r = _runner(tiny_manifest, max_seqs=4)
    for s in ("a", "b", "short"):
        r.alloc(s, 10 if s != "short" else 8)
        r.prefill(s, _ids(tiny_manifest, 6, 1))
    with pytest.raises(ModelError, match="counts"):
        r.decode_rows(["a", "b"], np.array([1, 2, 3]), counts=[3, 0])
    with pytest.raises(ModelError, match="positions"):
        r.decode_rows(["a", "b"], np.array([1, 2, 3]), counts=[1, 1])
    # a row whose positions do not fit its reservation fails alone
    out, ok, errors = r.decode_rows(["a", "short"], np.array([1, 2, 3, 4, 5, 6]), counts=[3, 3])
    assert ok == [0] and out.shape == (3, tiny_manifest.config.vocab_size)
    assert set(errors) == {"short"} and isinstance(errors["short"], CapacityError)
    assert r.seq_len("a") == 9 and r.seq_len("short") == 6
