"""``StageRunner``: run a contiguous range of blocks ``[first, end)`` on onnxruntime.

Sessions have an explicit intra-op thread count and spinning off unless asked (several nodes
may share a machine's cores). By default the range is one fused session, the head included (it
reads only the positions in ``logit_rows``, so prefill computes logits for the last position
only); ``fuse=False`` runs a session per block. The runtime benchmark measures both: fused
removes a session run per block.

The decoder layers' KV cache lives in preallocated slots (``kv.KVCache``); attention (the block
files' GroupQueryAttention, "fused", the default; or with ``one_pass`` the plain operators of
``attention``, "plain": ``attention_kind``) writes only the new
positions into the slot buffer, in place, through IOBinding (``present_*`` bound to the
``past_*`` memory), and reads the first positions of the context from it, so a decode step costs
the weights plus the attention over the context, never a copy of the whole slot. A decode step's bindings are made once per slot
range and reused.

A runner is not thread-safe: call it from one thread at a time.

Interface (the one the rest of meshllm codes against):

* ``alloc(seq_id, max_len, *, group=None)`` / ``free(seq_id)`` / ``seq_len(seq_id)``; ``group``
  names the micro-batch a sequence decodes in (its slots stay together, see ``kv``).
* ``prefill(seq_id, x, last_only=True)``: x (T,) int64 ids when the range starts at the embedding,
  else (T, H) float32 hidden; appends to the sequence (chunked prefill works). Returns (T, H)
  hidden, or, if the range ends with the head, logits (V,) for the last position or (T, V).
* ``decode(seq_ids, x)``: one token per sequence, sequences of any lengths: x (B,) int64 or
  (B, H) float32 -> (B, H) hidden or (B, V) logits. ``decode_rows`` is the same step reporting
  bad rows (unknown, incomplete, full) instead of raising: (outputs, ok row indices, errors);
  with ``counts=`` each row carries several positions (a token and its drafts) in the same pass.
  A pass computes every position bit for bit as a one-position step at that position does,
  whatever else it carries: in one pass with ``one_pass=True`` (``attention``; a mesh that
  speculates), else as that many one-position steps; ``one_pass_exact`` says which (false
  without ``one_pass`` and for int4 "exact" blocks, whose matrix kernel is not row-invariant).
* ``kv_export(seq_id, block, start=0, end=None)`` -> (k, v), each (end - start, kv_heads,
  head_dim), copying only that range; ``kv_import`` the reverse (``start=`` appends a later
  chunk), which is how a prefill node hands a sequence to a decode node.
* ``truncate(seq_id, length)``: forget positions >= length (their pages go back to the OS).
* ``weight_bytes_resident``: bytes the loaded weights occupy in memory (float16 files are held
  as float32, see ``weight_bytes_resident()``).

Memory: loading keeps no second copy of the weights. A fused range is built as protobuf
messages in Python and handed over serialized; onnxruntime's wrapper would keep those bytes
for the session's life, and glibc keeps the freed parse buffers, which together left RSS at
2.8x the stored bytes (bench preset, fp32); both are released after loading (measured 1.01x;
docs/runtime.md). Prepacking of the weights stays on: it replaces the original tensors (no net
memory) and without it a batch-8 decode step measured twice as slow.

Beyond the shared contract (all keyword-only, with defaults): ``fuse``, ``slot_len`` (positions
per slot; default the model's context), ``has_seq``, ``kv_bytes_per_token``, ``last_compute_s``,
``spin`` (onnxruntime's pool threads wait busy: for a process with its cores to itself),
``profile_prefix`` with ``kernels_per_step`` (the kernels a step runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from meshllm.errors import CapacityError, ConfigError, MeshError, ModelError
from meshllm.model.blocks import fuse_blocks
from meshllm.model.config import DEFAULT_INT4_MODE, INT4_MODES, BlockCost
from meshllm.model.manifest import Manifest
from meshllm.runtime import attention
from meshllm.runtime.kv import KVCache, SeqState
from meshllm.runtime.pacing import Pacer, bucket

# Fusing a stage's blocks into one session: see the runtime benchmark for the measurement.
FUSE_DEFAULT = True
FUSE_MAX_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class _Unit:
    blocks: list[int]  # consecutive block indices this session runs
    session: ort.InferenceSession
    fused: bool  # KV tensors are named per layer (past_key.{b}) in a fused graph
    # the head is fused in too: the session reads ``logit_rows`` (the positions whose logits it
    # computes, so a prompt's prefill runs the head on its last position only)
    rows: bool = False


@dataclass(slots=True)
class _Step:
    """Reusable bindings of a decode step on one slot range: inputs are copied into x and the
    attention inputs, each unit's output buffer is the next unit's bound input."""

    x: np.ndarray  # (1, B) ids or (1, B, H) hidden (one_pass); (B, 1[, H]) for GroupQueryAttention
    attn: dict[str, np.ndarray]  # the attention's inputs but attn_key_pos, whose length varies
    rows: np.ndarray  # int64: the positions whose logits a unit with the head fused in computes
    ios: list[ort.IOBinding]
    outs: list[np.ndarray]


def default_threads() -> int:
    """The cores this process may run on (affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(threads: int, profile_prefix: str | None = None, spin: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if profile_prefix is not None:  # onnxruntime's per-kernel trace (see kernels_per_step)
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores other node processes on the same machine need; a process
    # that has its cores to itself may spin (``spin``): the pool's threads then wait for the next
    # kernel busy instead of asleep, and a step of hundreds of small kernels stops paying a
    # wake-up per kernel (see docs/runtime.md)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def load_session(model: Path | bytes, threads: int, profile_prefix: str | None = None,
                 spin: bool = False) -> ort.InferenceSession:
    """A CPU session for a model file (or serialized model bytes)."""
    src = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(src, session_options(threads, profile_prefix, spin),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        what = "the fused blocks" if isinstance(model, bytes) else str(model)
        raise ModelError(f"cannot load {what}: {str(e).splitlines()[0][:200]}") from None
    # onnxruntime's Python wrapper keeps the serialized model for the session's lifetime, only to
    # re-create the session if the providers change (never here, CPU only): a second copy of
    # every weight. The session itself no longer needs it once created.
    if isinstance(model, bytes) and getattr(sess, "_model_bytes", None) is not None:
        sess._model_bytes = None
    return sess


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS. Loading parses every weight through protobuf
    messages several times over; glibc keeps those freed chunks mapped (its mmap threshold grows
    with the first large free), which left RSS at 1.6x the weights after loading the bench preset."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# How many bytes a stored weight byte occupies once loaded. float16 matrices are cast to float32
# when the session folds constants (the graph computes in float32; runtime casts measured slower,
# see docs/runtime.md), except the embedding table, which is gathered in its storage dtype.
_RESIDENT_FACTOR = {"float32": 1.0, "float16": 2.0}
# int4 matrices run as MatMulNBits; at accuracy level 4 ("fast") onnxruntime's prepacked layout
# adds a float32 scale and a float32 block sum per block of 32 weights (measured on the small and
# bench presets: 0.24 bytes per matrix weight over the stored bytes; "exact" adds nothing).
_INT4_FAST_EXTRA_PER_PARAM = 8 / 32


def weight_bytes_resident(manifest: Manifest, first: int, end: int) -> int:
    """Bytes the weights of blocks [first, end) occupy in memory once loaded by a StageRunner
    (not the bytes stored on disk): what a node charges against its memory budget."""
    cfg = manifest.config
    factor = _RESIDENT_FACTOR.get(cfg.weight_dtype, 1.0)
    int4_fast = cfg.weight_dtype == "int4" and \
        (manifest.provenance or {}).get("int4_mode", DEFAULT_INT4_MODE) == "fast"
    h = cfg.hidden_size
    layer_matrices = h * cfg.q_size + 2 * h * cfg.kv_size + cfg.q_size * h + 3 * h * cfg.intermediate_size
    total = 0
    for c in manifest.costs[first:end]:
        total += c.param_bytes if c.kind == "embed" else int(c.param_bytes * factor)
        if int4_fast and c.kind != "embed":  # the embedding is gathered, not multiplied
            total += int((layer_matrices if c.kind == "layer" else cfg.vocab_size * h) * _INT4_FAST_EXTRA_PER_PARAM)
    layers = sum(1 for b in range(first, end) if 1 <= b <= cfg.num_layers)
    if layers:  # the rotary cos/sin tables, float32, in every layer block
        total += layers * 2 * cfg.max_position * (cfg.head_dim // 2) * 4
    return total


def resident_costs(manifest: Manifest) -> list[BlockCost]:
    """The manifest's per-block costs with ``param_bytes`` as a runner holds them in memory (what
    the planner must charge a node), not as stored."""
    return [replace(c, param_bytes=weight_bytes_resident(manifest, c.index, c.index + 1)) for c in manifest.costs]


def bind_buffer(io: ort.IOBinding, name: str, arr: np.ndarray, output: bool) -> None:
    """Bind a C-contiguous numpy array's memory (no copy) as an input or output; the array must
    outlive the runs that use the binding."""
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: binding needs a C-contiguous array")
    ptr = arr.__array_interface__["data"][0]
    if output:
        io.bind_output(name, "cpu", 0, arr.dtype.type, list(arr.shape), ptr)
    else:
        io.bind_input(name, "cpu", 0, arr.dtype.type, list(arr.shape), ptr)


class StageRunner:
    def __init__(self, manifest: Manifest, first: int, end: int, *, threads: int | None = None,
                 kv_budget_bytes: int | None = None, max_seqs: int = 64, slowdown: float = 1.0,
                 fuse: bool = FUSE_DEFAULT, slot_len: int | None = None, prefill_chunk: int = 512,
                 profile_prefix: str | None = None, spin: bool = False, one_pass: bool = False) -> None:
        cfg = manifest.config
        if not 0 <= first < end <= cfg.num_blocks:
            raise ModelError(f"block range [{first}, {end}) is not inside [0, {cfg.num_blocks})")
        if not slowdown >= 1.0:
            raise ConfigError(f"slowdown must be >= 1, got {slowdown}")
        if threads is not None and threads <= 0:
            raise ConfigError(f"threads must be positive, got {threads}")
        slot_len = cfg.max_position if slot_len is None else slot_len
        if not 0 < slot_len <= cfg.max_position:
            raise ConfigError(f"slot_len must be in [1, {cfg.max_position}], got {slot_len}")
        if kv_budget_bytes is not None and kv_budget_bytes < 0:
            raise ConfigError(f"kv_budget_bytes must be >= 0, got {kv_budget_bytes}")
        if prefill_chunk <= 0:
            raise ConfigError(f"prefill_chunk must be positive, got {prefill_chunk}")
        # the attention kernel's scratch is heads x chunk x slot_len floats: long prompts run in
        # chunks of this many tokens to bound it
        self.prefill_chunk = prefill_chunk
        self.manifest = manifest
        self.config = cfg
        self.first, self.end = first, end
        self.threads = threads or default_threads()
        self.slowdown = float(slowdown)
        self.pacer = Pacer(self.slowdown)  # a slowed runner's steps: see runtime/pacing.py
        self.has_embed = first == 0
        self.has_head = end == cfg.num_blocks
        self.layer_blocks = [b for b in range(first, end) if 1 <= b <= cfg.num_layers]
        self._profile_prefix = profile_prefix
        self._spin = spin
        # the attention kind (``attention.KINDS``): ``one_pass``, attention as plain operators
        # ("plain"): a pass of several positions per row costs one pass and equals one-position
        # steps bit for bit; without (the default, "fused"), the block files' GroupQueryAttention
        # kernel, faster for one-position steps (docs/runtime.md), which runs a pass of several
        # positions as that many one-position steps. A mesh runs one kind on every node.
        self.one_pass = one_pass
        self.attention_kind = attention.PLAIN if one_pass else attention.FUSED
        self.units = self._load_units(fuse)
        _trim_heap()
        self.weight_bytes_resident = weight_bytes_resident(manifest, first, end)
        self.fused = any(u.fused for u in self.units)
        self._steps: dict[tuple[int, int], _Step] = {}
        self.kv = KVCache(self.layer_blocks, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          slot_len=slot_len, max_seqs=max_seqs, budget_bytes=kv_budget_bytes)
        self._key_pos = np.arange(slot_len, dtype=np.int64)  # attn_key_pos binds a prefix of it
        # Whether a pass of several positions per row runs as one pass, each position computed bit
        # for bit as a one-position step computes it, whatever else the pass carries (positions,
        # rows): attention as plain operators does (``one_pass``, see ``attention``); float matrices
        # (prepacked MatMul) and int4 "fast" (MatMulNBits on int8 activations) are row-invariant;
        # int4 "exact" (accuracy level 0) runs one row through its own kernel, which rounds
        # differently from several (a batch of 4 rows vs one row alone: 8e-5 on SmolLM2's logits)
        mode = (manifest.provenance or {}).get("int4_mode", DEFAULT_INT4_MODE)
        self.one_pass_exact = one_pass and not (cfg.weight_dtype == "int4" and INT4_MODES.get(mode) == 0)
        self.last_compute_s = 0.0  # compute time of the last prefill/decode, before any slowdown

    # --- sequences --------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv.bytes_per_token

    def alloc(self, seq_id: Hashable, max_len: int, *, group: Hashable | None = None) -> None:
        """Reserve a KV slot for up to ``max_len`` positions. ``group``: the micro-batch the
        sequence will decode in; a group's sequences get slots in a window of their own, so its
        batches decode without moving other groups' caches (see ``kv``)."""
        self.kv.alloc(seq_id, max_len, group=group)

    def free(self, seq_id: Hashable) -> None:
        self.kv.free(seq_id)

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Drop positions >= ``length`` in every layer (length <= the positions held); the next
        prefill/decode continues from ``length``."""
        self.kv.truncate(seq_id, length)

    def seq_len(self, seq_id: Hashable) -> int:
        return self._ready(seq_id).length

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self.kv.seqs

    def _ready(self, seq_id: Hashable) -> SeqState:
        st = self.kv.get(seq_id)
        if any(n != st.length for n in st.layer_len.values()):
            raise ModelError(f"sequence {seq_id!r}: KV of its layers is incomplete "
                             f"({st.layer_len}); import every layer in range to the same length")
        return st

    # --- input checks -----------------------------------------------------------------------
    def _check_input(self, x: np.ndarray, rows: int | None, what: str) -> np.ndarray:
        x = np.asarray(x)
        if self.has_embed:
            if x.ndim != 1 or x.dtype.kind not in "iu":
                raise ModelError(f"{what}: expected a 1-D array of token ids, got {x.dtype} {x.shape}")
            if x.size and (x.min() < 0 or x.max() >= self.config.vocab_size):
                raise ModelError(f"{what}: token id out of range [0, {self.config.vocab_size})")
            x = x.astype(np.int64, copy=False)
        else:
            if x.ndim != 2 or x.shape[1] != self.config.hidden_size or x.dtype.kind != "f":
                raise ModelError(f"{what}: expected float hidden states (n, {self.config.hidden_size}), "
                                 f"got {x.dtype} {x.shape}")
            x = np.ascontiguousarray(x, dtype=np.float32)
        if rows is not None and x.shape[0] != rows:
            raise ModelError(f"{what}: {x.shape[0]} rows for {rows} sequences")
        if x.shape[0] == 0:
            raise ModelError(f"{what}: empty input")
        return x

    # --- compute ----------------------------------------------------------------------------
    def prefill(self, seq_id: Hashable, x: np.ndarray, *, last_only: bool = True) -> np.ndarray:
        t0 = self.pacer.start()
        st = self._ready(seq_id)
        x = self._check_input(x, None, "prefill")
        T = x.shape[0]
        if st.length + T > st.max_len:
            raise CapacityError(f"sequence {seq_id!r}: {st.length} + {T} positions exceed its "
                                f"reserved {st.max_len}")
        start = st.length
        outs = []
        for a in range(0, T, self.prefill_chunk):
            c = x[a:a + self.prefill_chunk]
            n = c.shape[0]
            positions = st.length + np.arange(n, dtype=np.int64)[None]  # (1, n)
            final = a + n == T
            # with last_only the head runs once, on the last position of the last chunk
            h = self._run(c[None], st.slot, positions, last_only, head=final or not last_only)  # (1, n|1, H|V)
            self._advance([st], n)
            outs.append(h[0])
        self._pace(t0, ("prefill", bucket(T), bucket(start + T)), work=T)
        if self.has_head and last_only:
            return outs[-1][-1]  # (V,)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)  # (T, H) or (T, V)

    def decode(self, seq_ids: Sequence[Hashable], x: np.ndarray) -> np.ndarray:
        seq_ids = list(seq_ids)
        if not seq_ids:
            raise ModelError("decode: empty batch")
        if len(set(seq_ids)) != len(seq_ids):
            raise ModelError("decode: a sequence appears twice in one batch")
        x = self._check_input(x, len(seq_ids), "decode")
        states = [self._ready(s) for s in seq_ids]
        for s, st in zip(seq_ids, states, strict=True):
            if st.length + 1 > st.max_len:
                raise CapacityError(f"sequence {s!r} is full: {st.length} of {st.max_len} reserved positions")
        return self._decode(seq_ids, states, x)

    def decode_rows(self, seq_ids: Sequence[Hashable], x: np.ndarray, *,
                    counts: Sequence[int] | None = None) -> tuple[np.ndarray, list[int], dict[Hashable, MeshError]]:
        """``decode`` that fails rows, not the batch: every row is checked first (unknown or freed
        sequence, incomplete KV, sequence full, token id out of range); failing rows are left out
        and reported, the rest run as one batch. Returns (outputs of the rows that ran, in input
        order: (n_ok, H) or (n_ok, V); their row indices; seq_id -> error). A malformed call
        (empty batch, a sequence twice, wrong shape or dtype of ``x``) still raises.

        ``counts``: positions per row (a token and its drafts): ``x`` holds the rows' positions
        one after another (``sum(counts)`` entries) and so do the outputs of the rows that ran.
        Every row's positions run in the same pass, each computed bit for bit as a one-position
        step at that position would compute it (see ``attention``)."""
        seq_ids = list(seq_ids)
        if not seq_ids:
            raise ModelError("decode: empty batch")
        if len(set(seq_ids)) != len(seq_ids):
            raise ModelError("decode: a sequence appears twice in one batch")
        x = np.asarray(x)
        if self.has_embed and (x.ndim != 1 or x.dtype.kind not in "iu"):
            raise ModelError(f"decode: expected a 1-D array of token ids, got {x.dtype} {x.shape}")
        if not self.has_embed and (x.ndim != 2 or x.shape[1] != self.config.hidden_size or x.dtype.kind != "f"):
            raise ModelError(f"decode: expected float hidden states (n, {self.config.hidden_size}), "
                             f"got {x.dtype} {x.shape}")
        n = [1] * len(seq_ids) if counts is None else [int(c) for c in counts]
        if len(n) != len(seq_ids) or any(c < 1 for c in n):
            raise ModelError(f"decode: counts must give each of the {len(seq_ids)} rows at least one position")
        if x.shape[0] != sum(n):
            raise ModelError(f"decode: {x.shape[0]} rows for {len(seq_ids)} sequences" if counts is None else
                             f"decode: {x.shape[0]} rows for {sum(n)} positions (counts) of {len(seq_ids)} sequences")
        at = np.concatenate([[0], np.cumsum(n)]).astype(int)
        ok: list[int] = []
        states: list[SeqState] = []
        errors: dict[Hashable, MeshError] = {}
        for i, s in enumerate(seq_ids):
            try:
                self._check_input(x[at[i]:at[i + 1]], n[i], "decode")
                st = self._ready(s)
                if st.length + n[i] > st.max_len:
                    raise CapacityError(f"sequence {s!r} is full: {st.length} of {st.max_len} reserved positions"
                                        + (f", {n[i]} more asked" if n[i] > 1 else ""))
            except MeshError as e:
                errors[s] = e
                continue
            ok.append(i)
            states.append(st)
        width = self.config.vocab_size if self.has_head else self.config.hidden_size
        if not ok:
            return np.empty((0, width), np.float32), ok, errors
        if all(c == 1 for c in n):
            xs = self._check_input(x[ok], len(ok), "decode")
            return self._decode([seq_ids[i] for i in ok], states, xs), ok, errors
        rows = [np.arange(at[i], at[i + 1]) for i in ok]
        xs = self._check_input(x[np.concatenate(rows)], None, "decode")
        return self._decode_multi([seq_ids[i] for i in ok], states, xs, [n[i] for i in ok]), ok, errors

    def _decode_multi(self, seq_ids: list[Hashable], states: list[SeqState], x: np.ndarray,
                      counts: list[int]) -> np.ndarray:
        """One pass for checked rows of several positions each (x: their positions in order). A
        row shorter than the longest repeats its last position (input and position): the same
        bytes written twice to the same KV place, its extra outputs dropped. Without ``one_pass``
        (GroupQueryAttention) the positions run as one-position steps, j = 0, 1, ...: exact, no
        cheaper than steps."""
        if not self.one_pass:
            at = np.concatenate([[0], np.cumsum(counts)]).astype(int)
            out = np.empty((len(x), self.config.vocab_size if self.has_head else self.config.hidden_size), np.float32)
            for j in range(max(counts)):
                rows = [i for i, c in enumerate(counts) if c > j]
                out[at[rows] + j] = self._decode([seq_ids[i] for i in rows], [states[i] for i in rows],
                                                 x[at[rows] + j])
            return out
        t0 = self.pacer.start()
        s0 = self.kv.arrange(seq_ids) if self.layer_blocks else 0
        order = np.argsort([st.slot for st in states]) if self.layer_blocks else np.arange(len(states))
        S = max(counts)
        at = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        take = np.concatenate([np.arange(at[i], at[i + 1]) for i in order])  # the rows in slot order
        positions = np.array([[states[i].length + min(j, counts[i] - 1) for j in range(S)] for i in order],
                             np.int64)
        h = self._run_step(x[take][None], s0, positions, [counts[i] for i in order])
        out = np.empty((len(x), h.shape[-1]), np.float32)
        out[take] = h[0]  # (N, H|V) back in input order
        for st, c in zip(states, counts, strict=True):
            self._advance([st], c)
        self._pace(t0, ("decode", len(states), S, bucket(max(st.length for st in states))))
        return out

    def _decode(self, seq_ids: list[Hashable], states: list[SeqState], x: np.ndarray) -> np.ndarray:
        """One step for checked rows."""
        t0 = self.pacer.start()
        s0 = self.kv.arrange(seq_ids) if self.layer_blocks else 0
        # row j of the batch runs on slot s0 + j
        order = np.argsort([st.slot for st in states]) if self.layer_blocks else np.arange(len(states))
        positions = np.array([[states[i].length] for i in order], np.int64)  # (B, 1)
        h = self._run_step(x[order][None], s0, positions)  # (1, B, H|V)
        out = np.empty((len(seq_ids), h.shape[-1]), np.float32)
        out[order] = h[0]
        self._advance(states, 1)
        self._pace(t0, ("decode", len(states), 1, bucket(max(st.length for st in states))))
        return out

    def _advance(self, states: list[SeqState], n: int) -> None:
        for st in states:
            st.length += n
            for b in st.layer_len:
                st.layer_len[b] = st.length

    def _pace(self, t0: float, key: tuple[object, ...], work: float = 1.0) -> None:
        """A slowed runner waits (F - 1) x the step's reference, the typical compute of steps of
        its shape (``key``), never more than its own (``runtime/pacing.py``): a step disturbed
        by other work is not made F times longer for it."""
        self.last_compute_s = self.pacer.pace(t0, key, work)

    def _load_units(self, fuse: bool) -> list[_Unit]:
        """Sessions for the range: one per block, or (fused) one for the whole range, the head
        included: a stage is one session, so a decode step is one run and one thread pool (two
        sessions' pools, each spinning after its run, would fight over the cores)."""
        blocks = list(range(self.first, self.end))
        size = sum(p.stat().st_size for b in blocks
                   for p in (self.manifest.block_path(b), Path(f"{self.manifest.block_path(b)}.data"))
                   if p.exists())
        body = [b for b in blocks if b != self.config.num_layers + 1]
        # a fused graph is handed to onnxruntime as one serialized protobuf, which cannot exceed
        # 2 GiB: bigger ranges run a session per block (measured within noise of fused there)
        if not fuse or len(body) < 2 or size > FUSE_MAX_BYTES:
            return [_Unit([b], load_session(self._layer_bytes(b) if b in self.layer_blocks
                                            else self.manifest.block_path(b), self.threads,
                                            self._profile_prefix, self._spin), False)
                    for b in range(self.first, self.end)]
        try:
            models = [onnx.load(str(self.manifest.block_path(b))) for b in blocks]
        except Exception as e:  # onnx raises protobuf errors for unreadable files
            raise ModelError(f"cannot load the blocks of [{self.first}, {self.end}): {e}") from None
        fused = fuse_blocks(models, blocks, select_logits=self.has_head)
        if self.one_pass:
            fused = attention.rewrite(fused, self.config.head_dim)
        del models
        return [_Unit(blocks, load_session(fused.SerializeToString(), self.threads, self._profile_prefix,
                                           self._spin), True, rows=self.has_head)]

    def _layer_bytes(self, b: int) -> bytes:
        """A layer block's graph with its attention as the runner runs it (``one_pass``)."""
        try:
            model = onnx.load(str(self.manifest.block_path(b)))
        except Exception as e:  # onnx raises protobuf errors for unreadable files
            raise ModelError(f"cannot load block {b}: {e}") from None
        return (attention.rewrite(model, self.config.head_dim) if self.one_pass else model).SerializeToString()

    def _out_shape(self, unit: _Unit, B: int, S: int, R: int) -> tuple[int, int, int]:
        last = unit.blocks[-1]
        if last == self.config.num_layers + 1:
            return (B, R if unit.rows else S, self.config.vocab_size)  # logits
        return (B, S, self.config.hidden_size)  # hidden

    def _attn_inputs(self, positions: np.ndarray, counts: list[int] | None = None) -> dict[str, np.ndarray]:
        """The attention's inputs for rows at ``positions`` (B, S): the rewritten graph's
        (``attention.inputs``), or GroupQueryAttention's (each row's total length - 1, the
        longest row's total length)."""
        cfg = self.config
        if not self.one_pass:
            return {"seqlens_k": np.ascontiguousarray(positions[:, -1], np.int32),
                    "total_sequence_length": np.array(int(positions.max()) + 1, np.int32)}
        return attention.inputs(positions, cfg.num_heads, cfg.num_kv_heads, self._key_pos, counts)

    def _bind_unit(self, io: ort.IOBinding, unit: _Unit, h: np.ndarray, out: np.ndarray, s0: int,
                   attn: dict[str, np.ndarray], rows: np.ndarray) -> None:
        L = self.config.num_layers
        # rows; h is (1, N[, H]), their positions (one_pass), or (B, S[, H])
        B = attn["attn_positions" if self.one_pass else "seqlens_k"].shape[0]
        bind_buffer(io, "input_ids" if unit.blocks[0] == 0 else "hidden", h, output=False)
        if unit.rows:
            bind_buffer(io, "logit_rows", rows, output=False)
        bind_buffer(io, "logits" if unit.blocks[-1] == L + 1 else "hidden_out", out, output=True)
        layers = [b for b in unit.blocks if 1 <= b <= L]
        if layers:
            for name, arr in attn.items():
                bind_buffer(io, name, arr, output=False)
        for b in layers:
            sfx = f".{b}" if unit.fused else ""
            k = self.kv.k[b][s0:s0 + B]  # (B, kvh, slot_len, d): a view, no copy
            v = self.kv.v[b][s0:s0 + B]
            bind_buffer(io, "past_key" + sfx, k, output=False)
            bind_buffer(io, "past_value" + sfx, v, output=False)
            # same memory as the past: the kernel writes only the new positions, in place
            bind_buffer(io, "present_key" + sfx, k, output=True)
            bind_buffer(io, "present_value" + sfx, v, output=True)

    def _run(self, x: np.ndarray, s0: int, positions: np.ndarray, last_only: bool,
             head: bool = True, counts: list[int] | None = None) -> np.ndarray:
        """x: (1, N) ids or (1, N, H) hidden, the positions of rows on slots [s0, s0 + B) one
        row after another (``counts`` per row, default S each) at ``positions`` (B, S); returns
        the range's output (1, N, H|V) (a fresh array; the last position's only with
        ``last_only``), or the hidden states before the head when ``head`` is false."""
        h = np.ascontiguousarray(x)
        attn = self._attn_inputs(positions, counts)
        S = h.shape[1]
        # a fused head computes the last position only where that is all that is wanted (and
        # where the head's output is not wanted at all: a prompt's earlier chunks)
        rows = np.arange(S - 1 if last_only or not head else 0, S, dtype=np.int64)
        for unit in self.units:
            if unit.blocks[0] == self.config.num_layers + 1 and not head:
                break
            if unit.blocks[0] == self.config.num_layers + 1 and last_only:
                h = np.ascontiguousarray(h[:, -1:])  # (B, 1, H): only the last position's logits
            out = np.empty(self._out_shape(unit, h.shape[0], h.shape[1], len(rows)), np.float32)
            io = unit.session.io_binding()
            self._bind_unit(io, unit, h, out, s0, attn, rows)
            unit.session.run_with_iobinding(io)
            h = out
        return h

    def _run_step(self, x: np.ndarray, s0: int, positions: np.ndarray,
                  counts: list[int] | None = None) -> np.ndarray:
        """One decode step, x (1, B[, H]) at ``positions`` (B, 1) on slots [s0, s0 + B), or with
        ``counts`` a pass of N = sum(counts) positions (x (1, N[, H]), positions (B, S), every
        position's output). The bindings for a slot range and shape are made once and reused (the
        slot buffers never move), so a step only copies its inputs in (and binds the attended
        length): making them costs about 0.7 ms on SmolLM2, a sixth of what a pass with one draft
        adds to a step. Returns the range's output in a buffer the next step of its shape
        overwrites."""
        N = x.shape[1]
        if not self.one_pass:  # GroupQueryAttention: B rows of one position, (B, 1[, H])
            x = x.reshape(N, 1, *x.shape[2:])
        attn = self._attn_inputs(positions, counts)
        key_pos = attn.pop("attn_key_pos", None)
        key = (s0, N) if counts is None else (s0, N, *positions.shape)
        step = self._steps.get(key)
        if step is None:
            if len(self._steps) >= 64:  # batch shapes come and go; keep the table small
                self._steps.clear()
            step = _Step(np.empty(x.shape, x.dtype), {k: np.empty_like(v) for k, v in attn.items()},
                         np.arange(N if self.one_pass else 1, dtype=np.int64), [], [])
            h = step.x
            for unit in self.units:
                out = np.empty(self._out_shape(unit, x.shape[0], x.shape[1], len(step.rows)), np.float32)
                io = unit.session.io_binding()
                bound = step.attn if key_pos is None else {**step.attn, "attn_key_pos": key_pos}
                self._bind_unit(io, unit, h, out, s0, bound, step.rows)
                step.ios.append(io)
                step.outs.append(out)
                h = out
            self._steps[key] = step
        step.x[...] = x
        for k, v in attn.items():
            step.attn[k][...] = v
        for unit, io in zip(self.units, step.ios, strict=True):
            if key_pos is not None and any(1 <= b <= self.config.num_layers for b in unit.blocks):
                bind_buffer(io, "attn_key_pos", key_pos, output=False)  # a prefix of one array: no copy
            unit.session.run_with_iobinding(io)
        return step.outs[-1].reshape(1, N, -1)  # (1, N, H|V), a view

    def kernels_per_step(self, steps: int) -> tuple[float, dict[str, float]]:
        """With ``profile_prefix``: the kernels onnxruntime ran per step over the last ``steps``
        runs of every session (call after ``steps`` decode steps), in all and per operator.
        Ends profiling."""
        if self._profile_prefix is None:
            raise ModelError("kernels_per_step needs a runner made with profile_prefix")
        import json

        by_op: dict[str, float] = {}
        for unit in self.units:
            path = unit.session.end_profiling()
            events = json.loads(Path(path).read_text())
            runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")[-steps:]
            if not runs:
                continue
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]:
                    op = str(e.get("args", {}).get("op_name", "?"))
                    by_op[op] = by_op.get(op, 0.0) + 1.0 / steps
            Path(path).unlink(missing_ok=True)
        return sum(by_op.values()), dict(sorted(by_op.items(), key=lambda kv: -kv[1]))

    # --- KV hand-off ------------------------------------------------------------------------
    def _check_block(self, block: int) -> None:
        if block not in self.kv.k:
            raise ModelError(f"block {block} is not a decoder layer of this runner's range "
                             f"[{self.first}, {self.end})")

    def kv_export(self, seq_id: Hashable, block: int, start: int = 0,
                  end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions [start, end) (default: all written) of one layer for a
        sequence, each (end - start, kv_heads, head_dim) float32. Copies only that range, so a
        prefill stage can stream each chunk's new KV right after computing it."""
        self._check_block(block)
        return self.kv.export(seq_id, block, start, end)

    def kv_import(self, seq_id: Hashable, block: int, k: np.ndarray, v: np.ndarray, *, start: int = 0) -> None:
        """Write positions [start, start + len) of one layer's KV (e.g. received from a prefill
        node). The sequence can decode once every layer in range holds the same length."""
        self._check_block(block)
        cfg = self.config
        want = (cfg.num_kv_heads, cfg.head_dim)
        k, v = np.asarray(k), np.asarray(v)
        if k.ndim != 3 or k.shape[1:] != want or v.shape != k.shape:
            raise ModelError(f"kv_import: expected k and v of shape (len, {want[0]}, {want[1]}), "
                             f"got {k.shape} and {v.shape}")
        st = self.kv.get(seq_id)
        if not 0 <= start <= st.layer_len[block]:
            raise ModelError(f"kv_import: start {start} leaves a gap after the {st.layer_len[block]} "
                             f"positions block {block} holds")
        self.kv.import_(seq_id, block, k.astype(np.float32, copy=False), v.astype(np.float32, copy=False),
                        start)
