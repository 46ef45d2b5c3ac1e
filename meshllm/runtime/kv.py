"""KV cache slots: one preallocated buffer per decoder layer, one slot per sequence.

Each layer's keys and values live in ``(slots, kv_heads, slot_len, head_dim)`` float32 buffers
(the layout onnxruntime's GroupQueryAttention reads as its past). A sequence owns one slot index
in every layer; the attention kernel appends new positions into that slot in place, so a decode
step never copies the cache. A batch runs on the slot range ``[s0, s0 + B)`` as one view, so the
sequences of a batch must sit in consecutive slots: ``arrange`` moves them there when needed.

Slot windows (how a batch stays consecutive without cascading moves):

* A sequence may be allocated into a *group* (``alloc(..., group=g)``: a decoder's micro-batch).
  Each group owns a soft reservation, a *window* of consecutive slots ``[start, start + cap)``;
  its members take the lowest free slot of their window, so members of one group sit together.
* A new group's window is the upper half of the largest run of free slots no window claims
  (the lower half stays free for the window below to grow into; a run starting at slot 0 gives
  its lower half). A full window grows by one slot into a free unclaimed neighbour; failing
  that, the group moves to a free unclaimed run at least twice its size (every member copied
  once: amortised O(1) per join). Sequences without a group take free unclaimed slots from the
  top. Only when nothing unclaimed is free does a sequence borrow a free slot inside another
  group's window (from the window with the most free slots, its highest free slot).
* ``arrange`` for a batch whose members all belong to one group looks only at ranges of B
  slots that are free or hold that group's members, and swaps members into the range that
  already holds the most of them (its window's first). It therefore never moves another
  group's sequence, and a batch that differs from the previous one by one joining or leaving
  sequence costs at most one move. Only if no such range exists (slots exhausted and
  fragmented), or for a batch that mixes groups, does it take the general path: the range of
  the whole cache holding the most members, then the most free slots; that path may move
  sequences of other batches, so it is correct but not free. ``moves`` counts every sequence
  copied (tests check these promises).

Memory: buffers are anonymous memory maps, so untouched pages cost nothing and the resident
size grows with positions actually written. ``free`` returns a slot's pages to the OS
(``madvise(MADV_DONTNEED)``: they read back as zeros) and ``truncate`` the dropped tail's, so
pages touched once by a long sequence are not held forever. Page granularity: the few pages a
slot shares with its neighbours at its ends stay resident. The byte budget bounds what can be
reserved.
"""

from __future__ import annotations

import mmap
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.errors import CapacityError, ContextLengthError, ModelError

_PAGE = mmap.PAGESIZE
_CAN_RELEASE = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


@dataclass(slots=True)
class SeqState:
    slot: int
    max_len: int
    length: int  # positions held by every layer in range (after a prefill/decode)
    reserved: int  # bytes charged to the budget
    layer_len: dict[int, int]  # block -> positions written; equal to ``length`` unless importing
    group: Hashable | None = None


@dataclass(slots=True)
class _Window:
    start: int
    cap: int

    def __contains__(self, slot: int) -> bool:
        return self.start <= slot < self.start + self.cap


class _SlotBuffer:
    """A (slots, kv_heads, slot_len, head_dim) float32 array on an anonymous memory map whose
    byte ranges can be handed back to the OS."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        nbytes = int(np.prod(shape)) * 4
        # private: MADV_DONTNEED on a shared anonymous map only unmaps the pages (they stay in
        # the shared-memory object, contents and all); on a private one it frees them
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=flags) if flags else mmap.mmap(-1, max(nbytes, 1))
        self.array = np.frombuffer(self._map, np.float32, int(np.prod(shape))).reshape(shape)

    def release(self, start: int, end: int) -> None:
        """Drop the whole pages inside bytes [start, end) (they read back as zeros)."""
        a = -(-start // _PAGE) * _PAGE
        b = end // _PAGE * _PAGE
        if b > a and _CAN_RELEASE:
            self._map.madvise(mmap.MADV_DONTNEED, a, b - a)


class KVCache:
    def __init__(self, blocks: Sequence[int], *, kv_heads: int, head_dim: int, slot_len: int,
                 max_seqs: int, budget_bytes: int | None) -> None:
        if max_seqs <= 0:
            raise CapacityError("max_seqs must be positive")
        self.blocks = list(blocks)
        self.slot_len = slot_len
        self.max_seqs = max_seqs
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.bytes_per_token = 2 * kv_heads * head_dim * 4 * len(self.blocks)
        self.budget = budget_bytes
        shape = (max_seqs, kv_heads, slot_len, head_dim)
        self._bufs = {(b, kind): _SlotBuffer(shape) for b in self.blocks for kind in "kv"}
        self.k = {b: self._bufs[b, "k"].array for b in self.blocks}
        self.v = {b: self._bufs[b, "v"].array for b in self.blocks}
        self.seqs: dict[Hashable, SeqState] = {}
        self.owner: list[Hashable | None] = [None] * max_seqs
        self.windows: dict[Hashable, _Window] = {}
        self.reserved = 0
        self.moves = 0  # sequences whose KV was copied to another slot, ever

    # --- lifetime ---------------------------------------------------------------------------
    def alloc(self, seq_id: Hashable, max_len: int, *, group: Hashable | None = None) -> SeqState:
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
        if None not in self.owner:
            raise CapacityError(f"all {self.max_seqs} KV slots are in use")
        slot = self._place(group)
        self.owner[slot] = seq_id
        self.reserved += need
        st = SeqState(slot, max_len, 0, need, {b: 0 for b in self.blocks}, group)
        self.seqs[seq_id] = st
        return st

    def free(self, seq_id: Hashable) -> None:
        st = self.get(seq_id)
        self._release_slot(st.slot, 0)
        self.owner[st.slot] = None
        self.reserved -= st.reserved
        del self.seqs[seq_id]
        if st.group is not None and not any(s.group == st.group for s in self.seqs.values()):
            self.windows.pop(st.group, None)

    def get(self, seq_id: Hashable) -> SeqState:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise CapacityError(f"unknown sequence {seq_id!r} (not allocated or already freed)") from None

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Drop positions >= length in every layer; the next write continues from ``length``."""
        st = self.get(seq_id)
        held = max(st.layer_len.values(), default=st.length)
        if not 0 <= length <= held:
            raise ModelError(f"truncate: sequence {seq_id!r} holds {held} positions, cannot keep {length}")
        for b in st.layer_len:
            st.layer_len[b] = min(st.layer_len[b], length)
        st.length = min(st.layer_len.values(), default=length)
        # the pages of the positions dropped go back, unless fewer than a page's worth per head
        # was dropped: a speculative step's rejected drafts (a few positions) lie in pages the
        # next step writes again at once, and releasing them cost a system call per layer, kind
        # and head (180 on SmolLM2, 0.4 ms) on every step after a miss
        if (held - length) * self.head_dim * 4 >= _PAGE:
            self._release_slot(st.slot, length, held)

    def _release_slot(self, slot: int, keep: int, held: int | None = None) -> None:
        """Hand back the pages of positions >= keep of a slot (below ``held``, the positions it
        ever wrote since they were last handed back: the pages beyond were never touched), in
        every layer and head."""
        row = self.slot_len * self.head_dim * 4  # bytes of one head's positions
        if (self.slot_len - keep) * self.head_dim * 4 < _PAGE:
            return  # less than a page per head: nothing to give back
        base = slot * self.kv_heads * row
        upto = row if held is None else min(row, -(-held * self.head_dim * 4 // _PAGE) * _PAGE)
        for buf in self._bufs.values():
            if keep == 0:
                buf.release(base, base + self.kv_heads * row)
            else:
                for h in range(self.kv_heads):
                    start = base + h * row
                    buf.release(start + keep * self.head_dim * 4, min(start + upto, start + row))

    # --- placement --------------------------------------------------------------------------
    def _claimed(self) -> list[bool]:
        """Per slot: inside some group's window."""
        out = [False] * self.max_seqs
        for w in self.windows.values():
            for s in range(w.start, w.start + w.cap):
                out[s] = True
        return out

    def _runs(self, ok: list[bool]) -> list[tuple[int, int]]:
        """Maximal runs (start, length) of slots where ``ok`` holds."""
        runs, a = [], None
        for s in range(self.max_seqs + 1):
            if s < self.max_seqs and ok[s]:
                a = s if a is None else a
            elif a is not None:
                runs.append((a, s - a))
                a = None
        return runs

    def _place(self, group: Hashable | None) -> int:
        """A free slot for a new sequence (there is at least one); see the module docstring."""
        claimed = self._claimed()
        free_unclaimed = [self.owner[s] is None and not claimed[s] for s in range(self.max_seqs)]
        if group is None:
            for s in range(self.max_seqs - 1, -1, -1):
                if free_unclaimed[s]:
                    return s
            return self._borrow()
        w = self.windows.get(group)
        if w is None:
            runs = self._runs(free_unclaimed)
            if not runs:
                return self._borrow()
            a, n = max(runs, key=lambda r: (r[1], -r[0]))
            half = max(1, n // 2)
            w = _Window(a, half) if a == 0 else _Window(a + n - half, half)
            self.windows[group] = w
            return w.start
        for s in range(w.start, w.start + w.cap):
            if self.owner[s] is None:
                return s
        # grow by one into a free unclaimed neighbour
        end = w.start + w.cap
        if end < self.max_seqs and free_unclaimed[end]:
            w.cap += 1
            return end
        if w.start > 0 and free_unclaimed[w.start - 1]:
            w.start -= 1
            w.cap += 1
            return w.start
        # move the group to a free unclaimed run twice its size (or the largest that fits it)
        members = sorted(st.slot for st in self.seqs.values() if st.group == group)
        runs = [r for r in self._runs(free_unclaimed) if r[1] >= len(members) + 1]
        if runs:
            a, n = max(runs, key=lambda r: (min(r[1], 2 * w.cap), -r[0]))
            cap = min(n, max(2 * w.cap, len(members) + 1))
            for i, s in enumerate(members):
                self._swap(s, a + i)
            w.start, w.cap = a, cap
            return a + len(members)
        return self._borrow()

    def _borrow(self) -> int:
        """Any free slot: the highest free slot of the window with the most free slots (or any
        free slot outside windows, which only happens for a grouped sequence)."""
        best, best_free = None, -1
        for w in self.windows.values():
            free = [s for s in range(w.start, w.start + w.cap) if self.owner[s] is None]
            if len(free) > best_free and free:
                best, best_free = free[-1], len(free)
        if best is not None:
            return best
        return self.owner.index(None)

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
        group = states[0].group
        candidates: Sequence[int] = range(self.max_seqs - B + 1)
        w = self.windows.get(group) if group is not None else None
        if group is not None and all(st.group == group for st in states):
            # only ranges that hold nobody but this group's sequences, its own window first
            mine = [o is None or self.seqs[o].group == group for o in self.owner]
            own = [x for x in candidates if all(mine[x:x + B])]
            if own:
                candidates = own
        # the range of B slots that already holds the most members (fewest moves), then lies in
        # the batch's window, then holds the most free slots (displaces the fewest sequences)
        best, best_key = 0, (-1, False, -1)
        for x in candidates:
            window = range(x, x + B)
            inside = w is not None and w.start <= x and x + B <= w.start + w.cap
            key = (sum(1 for s in window if s in members), inside,
                   sum(1 for s in window if self.owner[s] is None))
            if key > best_key:
                best, best_key = x, key
        outside = [st for st in states if not best <= st.slot < best + B]
        for target in range(best, best + B):
            if target in members:
                continue
            self._swap(outside.pop().slot, target)
        return best

    def _swap(self, a: int, b: int) -> None:
        """Exchange the contents and owners of slots a and b (copies filled positions only)."""
        if a == b:
            return
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
            self.moves += 1
        if sb is not None:
            self.seqs[sb].slot = a
            self.moves += 1

    # --- export / import --------------------------------------------------------------------
    def export(self, seq_id: Hashable, block: int, start: int = 0,
               end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        st = self.get(seq_id)
        n = st.layer_len[block]
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ModelError(f"kv_export: range [{start}, {end}) is not inside the {n} positions "
                             f"block {block} holds for sequence {seq_id!r}")
        k = self.k[block][st.slot, :, start:end].transpose(1, 0, 2).copy()  # (end - start, kvh, d)
        v = self.v[block][st.slot, :, start:end].transpose(1, 0, 2).copy()  # (end - start, kvh, d)
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
