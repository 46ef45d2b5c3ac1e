"""This node's stages: the block ranges it holds per plan epoch, their ``StageRunner``s, the one
inference thread that owns every call into a runner, and the requests in flight per epoch.

- **One owner thread.** A ``StageRunner`` is not thread-safe. Every call into one goes through
  ``StageHost.call``, which runs it on the host's single inference thread (``meshllm-infer``;
  runners are built there too), or ``StageHost.call_here``, which runs it on the event loop: the
  serving layer runs a short decode step where its frame landed, saving two thread switches per
  hop, and never while an iteration of its own is on the inference thread. Planning, GA islands
  and profiling run on another executor, so a decode step never waits behind them.
- **Epochs.** ``load(epoch, ranges, attention=kind)`` builds the runners of an epoch with the
  attention kind its plan names (``runtime.attention``: the same on every node of a mesh, whatever
  each node's own setting), or reuses those of a loaded epoch with the same ranges and kind
  (re-plans often keep them). ``unload(epoch)`` first tells the
  ``on_unload`` hooks (the serving layer fails what remains of that epoch), then drops the epoch;
  runners another epoch shares stay.
- **Draining.** The serving layer marks a request in flight on this node with ``begin(epoch, req)``
  and ``end(epoch, req)``; ``drain(epoch, on_idle)`` calls ``on_idle`` once, as soon as nothing
  of that epoch is in flight here. That is what feeds the control plane's ``EpochIdle``.
- **Threads.** Every method but ``call``'s ``fn`` runs on the event loop; only ``fn`` (and the
  runner builds) run on the inference thread.
- **Memory.** ``budget_bytes`` bounds what the node holds: the weights of its ranges as they sit in
  memory, and the KV cache gets what is left, split evenly between the ranges.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from meshllm.errors import MeshError
from meshllm.model.manifest import Manifest
from meshllm.obs.progress import bar
from meshllm.runtime.attention import FUSED, KINDS, PLAIN
from meshllm.runtime.runner import StageRunner

log = logging.getLogger("meshllm.serve.stages")

T = TypeVar("T")
Range = tuple[int, int]


class StageHostClosed(MeshError):
    """A call into a stage host that has been closed."""


def _set_kv_budget(runner: StageRunner, budget: int) -> None:
    """Bound a built runner's KV reservations by ``budget`` bytes (the runner only learns how much
    memory its weights really take once they are loaded)."""
    setter = getattr(runner, "set_kv_budget", None)
    if callable(setter):
        setter(budget)
    elif hasattr(getattr(runner, "kv", None), "budget"):
        runner.kv.budget = budget


def _resident_weight_bytes(runner: StageRunner) -> int | None:
    """Bytes the runner's weights occupy in memory, when the runtime can tell (else None)."""
    got = getattr(runner, "weight_bytes_resident", None)
    if callable(got):
        got = got()
    return int(got) if isinstance(got, int | float) else None


class StageHost:
    """This node's loaded block ranges per plan epoch, their runners, the one inference thread that
    owns every call into a StageRunner, and the in-flight requests per epoch that drive draining."""

    def __init__(self, manifest: Manifest, *, threads: int, slowdown: float, budget_bytes: int,
                 spin: bool = False) -> None:
        self.manifest = manifest
        self.threads = threads
        self.spin = spin
        self.slowdown = slowdown
        self.budget_bytes = budget_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshllm-infer")
        self._ranges: dict[int, list[Range]] = {}
        self._kinds: dict[int, str] = {}  # epoch -> the attention kind of its runners
        self._runners: dict[int, list[StageRunner]] = {}
        self._by_first: dict[int, dict[int, StageRunner]] = {}
        self._inflight: dict[int, set[str]] = {}
        self._idle_waiters: dict[int, list[Callable[[], None]]] = {}
        self._unload_hooks: list[Callable[[int], None]] = []
        self._generation: dict[int, int] = {}  # bumped by unload: a load in progress is then void
        self._load_lock = asyncio.Lock()
        self._closed = False

    # --- epochs ---------------------------------------------------------------------------------
    async def load(self, epoch: int, ranges: list[tuple[int, int]], *, attention: str = FUSED) -> None:
        """Hold ``ranges`` for ``epoch`` with attention of kind ``attention`` (the plan's, see
        ``runtime.attention``). Builds the runners on the inference thread, or reuses those of a
        loaded epoch with the same ranges and kind. Raises ``MeshError`` when they cannot be built.
        An ``unload(epoch)`` while this is in progress wins: the runners are dropped when built."""
        if self._closed:
            raise StageHostClosed("the stage host is closed")
        if attention not in KINDS:
            raise MeshError(f"unknown attention kind {attention!r} (known: {', '.join(KINDS)})")
        ranges = [(int(a), int(b)) for a, b in ranges]
        gen = self._generation.get(epoch, 0)
        async with self._load_lock:  # one build at a time, so a second load of the same ranges reuses
            if self._generation.get(epoch, 0) != gen or self._closed:
                return
            if self._ranges.get(epoch) == ranges and self._kinds.get(epoch) == attention:
                return
            reuse = next((e for e, rg in self._ranges.items() if rg == ranges and self._kinds[e] == attention),
                         None)
            if reuse is not None:
                runners = list(self._runners[reuse])
            else:
                runners = await self._build(ranges, attention)
            if self._generation.get(epoch, 0) != gen or self._closed:
                log.info("epoch %d was unloaded while it loaded; dropped its blocks", epoch)
                return
            self._ranges[epoch] = ranges
            self._kinds[epoch] = attention
            self._runners[epoch] = runners
            self._by_first[epoch] = {r.first: r for r in runners}

    async def _build(self, ranges: list[Range], kind: str) -> list[StageRunner]:
        costs = self.manifest.costs
        stored = sum(c.param_bytes for a, b in ranges for c in costs[a:b])
        n = max(len(ranges), 1)

        def work() -> list[StageRunner]:
            first_guess = max(0, self.budget_bytes - stored) // n
            runners = []
            with bar(desc=f"load {self.manifest.name}", total=sum(b - a for a, b in ranges), unit="block") as shown:
                for a, b in ranges:
                    runners.append(StageRunner(self.manifest, a, b, threads=self.threads, spin=self.spin,
                                               slowdown=self.slowdown, one_pass=kind == PLAIN,
                                               kv_budget_bytes=first_guess))
                    shown.update(b - a)
            # Charge the weights as they sit in memory when the runner knows it (onnxruntime may hold
            # more than the stored bytes); the KV cache gets the rest.
            resident = [_resident_weight_bytes(r) for r in runners]
            if runners and all(x is not None for x in resident):
                kv = max(0, self.budget_bytes - sum(x or 0 for x in resident)) // n
                for r in runners:
                    _set_kv_budget(r, kv)
            return runners

        try:
            return await self.call(work)
        except MeshError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise MeshError(f"cannot load blocks {ranges}: {e}") from e

    def unload(self, epoch: int) -> None:
        """Drop ``epoch``'s runners (those another loaded epoch shares stay), after telling the
        ``on_unload`` hooks. Anything still in flight for it is forgotten."""
        self._generation[epoch] = self._generation.get(epoch, 0) + 1
        for cb in list(self._unload_hooks):
            try:
                cb(epoch)
            except Exception:
                log.exception("bug in an on_unload hook for epoch %d", epoch)
        had = self._runners.pop(epoch, None) is not None
        self._ranges.pop(epoch, None)
        self._kinds.pop(epoch, None)
        self._by_first.pop(epoch, None)
        self._inflight.pop(epoch, None)
        self._idle_waiters.pop(epoch, None)
        if had:
            log.info("unloaded the blocks of epoch %d", epoch)

    def epochs(self) -> list[int]:
        return sorted(self._ranges)

    def ranges(self, epoch: int) -> list[tuple[int, int]]:
        return list(self._ranges.get(epoch, []))

    def attention(self, epoch: int) -> str | None:
        """The attention kind of ``epoch``'s runners (None: not loaded here)."""
        return self._kinds.get(epoch)

    def runners(self, epoch: int) -> list[StageRunner]:
        return list(self._runners.get(epoch, []))

    def runner(self, epoch: int, first_block: int) -> StageRunner | None:
        return self._by_first.get(epoch, {}).get(first_block)

    def has_epoch(self, epoch: int) -> bool:
        return epoch in self._ranges

    # --- the inference thread ---------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the inference thread; its result, or what it raised."""
        if self._closed:
            raise StageHostClosed("the stage host is closed")
        try:
            # in the caller's context, so what fn logs names the node and request it works for
            ctx = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)
        except RuntimeError as e:
            if self._closed:  # the executor refused new work because it shut down
                raise StageHostClosed("the stage host is closed") from e
            raise

    def call_here(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the calling thread (the event loop), for work short enough to run where
        a frame lands. The caller keeps calls into a runner one at a time: the serving layer runs
        one iteration at a time, here or on the inference thread, never both."""
        if self._closed:
            raise StageHostClosed("the stage host is closed")
        return fn(*args)

    # --- requests in flight -----------------------------------------------------------------------
    def begin(self, epoch: int, req: str) -> None:
        self._inflight.setdefault(epoch, set()).add(req)

    def end(self, epoch: int, req: str) -> None:
        reqs = self._inflight.get(epoch)
        if reqs is None or req not in reqs:
            return
        reqs.discard(req)
        if not reqs:
            del self._inflight[epoch]
            self._fire_idle(epoch)

    def inflight(self, epoch: int) -> int:
        return len(self._inflight.get(epoch, ()))

    def drain(self, epoch: int, on_idle: Callable[[], None]) -> None:
        """Call ``on_idle()`` once (via ``loop.call_soon``) as soon as ``inflight(epoch) == 0``;
        at once if it is already."""
        self._idle_waiters.setdefault(epoch, []).append(on_idle)
        if self.inflight(epoch) == 0:
            self._fire_idle(epoch)

    def _fire_idle(self, epoch: int) -> None:
        waiters = self._idle_waiters.pop(epoch, [])
        if waiters:
            loop = asyncio.get_running_loop()
            for cb in waiters:
                loop.call_soon(cb)

    def on_unload(self, cb: Callable[[int], None]) -> None:
        self._unload_hooks.append(cb)

    async def close(self) -> None:
        """Drop every epoch and stop the inference thread (a call running on it finishes on its own)."""
        for epoch in self.epochs():
            self.unload(epoch)
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
