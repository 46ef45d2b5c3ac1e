"""The entry's router: which prefill replica and which decoder replica serve a request.

It scores replicas the way the simulator does (``meshllm.sim.routing``: the same ``Candidate``
fields and policies), from two sources:

- the cost model's estimates for the active plan (``estimate``: the prefill time of a prompt on a
  replica, and a decoder's time per output token), when the node has the profiles to compute them;
- what each decoder replica last reported (``LoadReport``: requests decoding, batch limit, free KV
  tokens), plus the requests this entry sent there since (the report lags by up to one period),
  and each replica's observed time to first token (moving average), which replaces the estimate
  when it is slower — queueing behind other entries' prompts included.

Ties go to the lowest replica id, so routing is deterministic for a given state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshllm.serve.routes import Routes
from meshllm.sim.routing import Candidate, choose
from meshllm.wire.messages import LoadReport

# (routes, replica id, prompt tokens) -> predicted prefill seconds; (routes, replica, batch) -> s/token
PrefillEstimate = Callable[[Routes, int, int], float]
DecodeEstimate = Callable[[Routes, int, int], float]

EWMA = 0.2


@dataclass(slots=True)
class _Load:
    decoding: int = 0
    max_batch: int = 64
    free_tokens: int = -1  # -1: unknown (no budget)
    sent_since: int = 0  # requests this entry admitted there since the report
    ttft_s: float = 0.0  # observed prefill + hand-off time (moving average)


class Router:
    def __init__(self, routes_for: Callable[[int], Routes | None], *, policy: str = "completion",
                 prefill_estimate: PrefillEstimate | None = None,
                 decode_estimate: DecodeEstimate | None = None) -> None:
        self.routes_for = routes_for
        self.policy = policy
        self.prefill_estimate = prefill_estimate
        self.decode_estimate = decode_estimate
        self.loads: dict[tuple[int, int], _Load] = {}  # (epoch, replica) -> last report

    def report(self, m: LoadReport) -> None:
        ld = self.loads.setdefault((m.epoch, m.replica), _Load())
        try:
            ld.decoding = int(m.load.get("decoding", 0))
            ld.max_batch = int(m.load.get("max_batch", ld.max_batch))
            ld.free_tokens = int(m.load.get("free_tokens", -1))
        except (TypeError, ValueError):
            return
        ld.sent_since = 0

    def finished(self, epoch: int, prefill_replica: int, ttft_s: float) -> None:
        """A request's observed time to first token on the prefill replica that served it."""
        if ttft_s <= 0 or prefill_replica < 0:
            return
        ld = self.loads.setdefault((epoch, prefill_replica), _Load())
        ld.ttft_s = ttft_s if ld.ttft_s == 0 else (1 - EWMA) * ld.ttft_s + EWMA * ttft_s

    def rank(self, routes: Routes, prompt_len: int, max_tokens: int) -> list[tuple[int, int]]:
        """(prefill, decoder) pairs, best first: the best prefill replica for the prompt, paired
        with each decoder in the order the scoring prefers (the entry tries them in turn)."""
        pre = routes.prefill_replicas()
        dec = routes.decoder_replicas()
        if not pre or not dec:
            return []
        need = prompt_len + max_tokens
        pre_c = []
        for rid in pre:
            ps = self.prefill_estimate(routes, rid, prompt_len) if self.prefill_estimate else 0.0
            ld = self.loads.get((routes.epoch, rid))
            if ld is not None and ld.ttft_s > ps:
                ps = ld.ttft_s
            pre_c.append(Candidate(rid, 0.0, ps, 0.0))
        best_p = choose(pre_c, policy=self.policy)
        assert best_p is not None
        dec_c = []
        for rid in dec:
            ld = self.loads.get((routes.epoch, rid), _Load())
            running = ld.decoding + ld.sent_since
            room = self.has_room(routes, rid, need)
            tpot = self.decode_estimate(routes, rid, running + 1) if self.decode_estimate else 1.0
            # a BOTH replica that also prefills this request saves the hand-off
            handoff = 0.0 if rid == best_p else 1e-6
            dec_c.append(Candidate(rid, 0.0, 0.0, tpot * max_tokens * (1 + running / max(ld.max_batch, 1)),
                                   handoff, room))
        order: list[int] = []
        rest = list(dec_c)
        while rest:
            pick = choose(rest, policy="completion", need_room=True)
            if pick is None:
                pick = choose(rest, policy="completion")
            assert pick is not None
            order.append(pick)
            rest = [c for c in rest if c.replica_id != pick]
        # a BOTH replica prefills its own decodes when it is the chosen decoder and can prefill
        pairs = []
        for d in order:
            p = d if d in pre and self._both(routes, d) else best_p
            pairs.append((p, d))
        return pairs

    def has_room(self, routes: Routes, replica: int, need: int) -> bool:
        """Whether a decoder replica last reported room for a request of ``need`` positions (with
        this entry's admissions since; no report yet counts as room)."""
        ld = self.loads.get((routes.epoch, replica), _Load())
        return ld.decoding + ld.sent_since < ld.max_batch and (ld.free_tokens < 0 or ld.free_tokens >= need)

    def admitted(self, epoch: int, replica: int) -> None:
        ld = self.loads.setdefault((epoch, replica), _Load())
        ld.sent_since += 1

    @staticmethod
    def _both(routes: Routes, rid: int) -> bool:
        return rid in routes.prefill_replicas() and rid in routes.decoder_replicas()
