"""KV cache slots: one preallocated buffer per decoder layer, one slot per sequence.

Each layer's keys and values live in ``(slots, kv_heads, slot_len, head_dim)`` float32 buffers
(the layout onnxruntime's GroupQueryAttention reads as its past). A sequence owns one slot index
in every layer; the attention kernel appends new positions into that slot in place, so a decode
step never copies the cache. A batch runs on the slot range ``[s0, s0 + B)`` as one view, so the
sequences of a batch must sit in consecutive slots: ``arrange`` moves them there when a batch's
membership changes (copying only those sequences' filled positions, once) and then leaves them be.

Buffers are made with ``np.zeros`` (zero pages mapped lazily by the OS), so the resident memory
grows with the positions actually written, while the byte budget bounds what can be reserved.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.errors import CapacityError, ContextLengthError


@dataclass(slots=True)
class SeqState:
    slot: int
    max_len: int
    length: int  # positions held by every layer in range (after a prefill/decode)
    reserved: int  # bytes charged to the budget
    layer_len: dict[int, int]  # block -> positions written; equal to ``length`` unless importing


class KVCache:
    def __init__(self, blocks: Sequence[int], *, kv_heads: int, head_dim: int, slot_len: int,
                 max_seqs: int, budget_bytes: int | None) -> None:
        if max_seqs <= 0:
            raise CapacityError("max_seqs must be positive")
        self.blocks = list(blocks)
        self.slot_len = slot_len
        self.max_seqs = max_seqs
        self.bytes_per_token = 2 * kv_heads * head_dim * 4 * len(self.blocks)
        self.budget = budget_bytes
        shape = (max_seqs, kv_heads, slot_len, head_dim)
        self.k = {b: np.zeros(shape, np.float32) for b in self.blocks}
        self.v = {b: np.zeros(shape, np.float32) for b in self.blocks}
        self.seqs: dict[Hashable, SeqState] = {}
        self.owner: list[Hashable | None] = [None] * max_seqs
        self.reserved = 0

    # --- lifetime ---------------------------------------------------------------------------
    def alloc(self, seq_id: Hashable, max_len: int) -> SeqState:
        if seq_id in self.seqs:
            raise CapacityError(f"sequence {seq_id!r} already holds a KV slot")
        if max_len <= 0:
            raise ContextLengthError(f"max_len must be positive, got {max_len}")
        if max_len > self.slot_len:
            raise ContextLengthError(f"sequence {seq_id!r} asks for {max_len} positions; the model's "
                                     f"context is {self.slot_len}")
        need = max_len * self.bytes_per_token
        if self.budget is not None and self.reserved + need > self.budget:
            raise CapacityError(f"KV budget exhausted: {self.reserved + need} bytes needed for "
                                f"{max_len} positions, budget is {self.budget}")
        try:
            slot = self.owner.index(None)
        except ValueError:
            raise CapacityError(f"all {self.max_seqs} KV slots are in use") from None
        self.owner[slot] = seq_id
        self.reserved += need
        st = SeqState(slot, max_len, 0, need, {b: 0 for b in self.blocks})
        self.seqs[seq_id] = st
        return st

    def free(self, seq_id: Hashable) -> None:
        st = self.get(seq_id)
        self.owner[st.slot] = None
        self.reserved -= st.reserved
        del self.seqs[seq_id]

    def get(self, seq_id: Hashable) -> SeqState:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise CapacityError(f"unknown sequence {seq_id!r} (not allocated or already freed)") from None

    # --- batch placement --------------------------------------------------------------------
    def arrange(self, seq_ids: Sequence[Hashable]) -> int:
        """Place the batch's sequences in consecutive slots; return the first slot.

        Slot ``first + j`` then holds some member of the batch (not necessarily ``seq_ids[j]``;
        the caller orders rows by ``SeqState.slot``).
        """
        states = [self.get(s) for s in seq_ids]
        B = len(states)
        slots = sorted(st.slot for st in states)
        if slots[-1] - slots[0] + 1 == B:
            return slots[0]
        members = set(slots)
        # the window of B slots that already holds the most members (fewest moves) and, among
        # those, the most free slots (displaces the fewest sequences of other batches)
        best, best_key = 0, (-1, -1)
        for w in range(self.max_seqs - B + 1):
            window = range(w, w + B)
            key = (sum(1 for s in window if s in members), sum(1 for s in window if self.owner[s] is None))
            if key > best_key:
                best, best_key = w, key
        outside = [st for st in states if not best <= st.slot < best + B]
        for target in range(best, best + B):
            if target in members:
                continue
            self._swap(outside.pop().slot, target)
        return best

    def _swap(self, a: int, b: int) -> None:
        """Exchange the contents and owners of slots a and b (copies filled positions only)."""
        sa, sb = self.owner[a], self.owner[b]
        n = max((max(self.seqs[s].layer_len.values(), default=0) for s in (sa, sb) if s is not None),
                default=0)
        for buf in (*self.k.values(), *self.v.values()):
            tmp = buf[a, :, :n].copy()  # (kvh, n, d)
            buf[a, :, :n] = buf[b, :, :n]
            buf[b, :, :n] = tmp
        self.owner[a], self.owner[b] = sb, sa
        if sa is not None:
            self.seqs[sa].slot = b
        if sb is not None:
            self.seqs[sb].slot = a

    # --- export / import --------------------------------------------------------------------
    def export(self, seq_id: Hashable, block: int) -> tuple[np.ndarray, np.ndarray]:
        st = self.get(seq_id)
        n = st.layer_len[block]
        k = self.k[block][st.slot, :, :n].transpose(1, 0, 2).copy()  # (n, kvh, d)
        v = self.v[block][st.slot, :, :n].transpose(1, 0, 2).copy()  # (n, kvh, d)
        return k, v

    def import_(self, seq_id: Hashable, block: int, k: np.ndarray, v: np.ndarray, start: int) -> None:
        st = self.get(seq_id)
        n = k.shape[0]
        if start + n > st.max_len:
            raise CapacityError(f"sequence {seq_id!r}: importing positions [{start}, {start + n}) exceeds "
                                f"its reserved {st.max_len}")
        self.k[block][st.slot, :, start:start + n] = k.transpose(1, 0, 2)  # (kvh, n, d)
        self.v[block][st.slot, :, start:start + n] = v.transpose(1, 0, 2)
        st.layer_len[block] = start + n
        lens = set(st.layer_len.values())
        if len(lens) == 1:
            st.length = lens.pop()
