"""The entry's router: which prefill replica and which decoder replica serve a request.

It scores replicas the way the simulator does (``meshllm.sim.routing``: the same ``Candidate``
fields and policies; ``sim/serving.py`` ``arrive``): every replica that can take a prompt (a
PREFILL replica, with its best decoder, or a BOTH replica, which decodes its own) is a
candidate with the work queued at its first stage, what that stage is running, the prompt's
prefill there and the request's decode, and the policy chooses among them. Its figures come from:

- the cost model's estimates for the active plan (``estimate``: the prefill time of a prompt on a
  replica, and a decoder's time per output token), when the node has the profiles to compute them;
- what each decoder replica last reported (``LoadReport``: requests reserved there, those of them
  decoding, batch limit, free KV tokens), plus the requests this entry sent there since (the
  report lags by up to one period). A BOTH replica's reserved requests that are not decoding yet
  are prompts waiting for or in their prefill: the queue other entries put there;
- the prompts this entry sent to each replica whose prefill has not ended (``sent`` ...
  ``prefilled``): its own queue there, known at once;
- each PREFILL replica's observed time to first token (moving average; such a replica sends no
  load report), which replaces the estimate when it is slower — queueing behind other entries'
  prompts included.

Until the queues were counted, a BOTH replica was ranked as a decoder only (its predicted decode
time, scaled by the sequences it held): every entry sent every request to the fastest BOTH
replica, whose prompts then queued while the others idled (docs/experiments.md, "The claim
again").

Ties go to the lowest replica id, so routing is deterministic for a given state. Pure: the
caller passes the time (``now``; without it, nothing ages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshllm.serve.routes import Routes
from meshllm.sim.routing import (
    START_TOLERANCE_S,
    Candidate,
    choose,
    predicted_completion,
    predicted_first_token,
    predicted_start,
)
from meshllm.wire.messages import LoadReport

# (routes, replica id, prompt tokens) -> predicted prefill seconds; (routes, replica, batch) -> s/token
PrefillEstimate = Callable[[Routes, int, int], float]
DecodeEstimate = Callable[[Routes, int, int], float]

EWMA = 0.2


@dataclass(slots=True)
class _Load:
    decoding: int = 0
    started: int = 0  # of ``decoding``, those whose prefill is done (in a decode micro-batch)
    max_batch: int = 64
    free_tokens: int = -1  # -1: unknown (no budget)
    sent_since: int = 0  # requests this entry admitted there since the report
    ttft_s: float = 0.0  # observed prefill + hand-off time (moving average)
    t_report: float | None = None  # when the last report came (None: none, or no clock)
    own_at_report: int = 0  # this entry's prompts in that replica's prefill when the report came
    seen_s: float = 0.0  # the queue the replica answered with when it handed a prompt back
    t_seen: float | None = None


@dataclass(frozen=True, slots=True)
class _Sent:
    epoch: int
    replica: int
    seconds: float  # its predicted prefill there
    t_sent: float | None


class Router:
    def __init__(self, routes_for: Callable[[int], Routes | None], *, policy: str = "completion",
                 prefill_estimate: PrefillEstimate | None = None,
                 decode_estimate: DecodeEstimate | None = None) -> None:
        self.routes_for = routes_for
        self.policy = policy
        self.prefill_estimate = prefill_estimate
        self.decode_estimate = decode_estimate
        self.loads: dict[tuple[int, int], _Load] = {}  # (epoch, replica) -> last report
        self.inflight: dict[str, _Sent] = {}  # request -> the prefill this entry sent it to

    def report(self, m: LoadReport, now: float | None = None) -> None:
        ld = self.loads.setdefault((m.epoch, m.replica), _Load())
        try:
            decoding = int(m.load.get("decoding", 0))
            started = int(m.load.get("started", decoding))
            max_batch = int(m.load.get("max_batch", ld.max_batch))
            free = int(m.load.get("free_tokens", -1))
        except (TypeError, ValueError):
            return
        ld.decoding, ld.started, ld.max_batch, ld.free_tokens = decoding, min(max(started, 0), decoding), max_batch, free
        ld.sent_since = 0
        ld.seen_s = 0.0
        ld.t_report = now
        ld.own_at_report = self._own(m.epoch, m.replica)

    def sent(self, req: str, epoch: int, prefill_replica: int, seconds: float, now: float | None = None) -> None:
        """This entry sent a request's prompt to a prefill replica (predicted ``seconds`` there)."""
        self.inflight[req] = _Sent(epoch, prefill_replica, max(0.0, float(seconds)), now)

    def prefilled(self, req: str) -> None:
        """The request's prefill ended (its first token came), or its attempt did."""
        self.inflight.pop(req, None)

    def finished(self, epoch: int, prefill_replica: int, ttft_s: float) -> None:
        """A request's observed time to first token on the prefill replica that served it."""
        if ttft_s <= 0 or prefill_replica < 0:
            return
        ld = self.loads.setdefault((epoch, prefill_replica), _Load())
        ld.ttft_s = ttft_s if ld.ttft_s == 0 else (1 - EWMA) * ld.ttft_s + EWMA * ttft_s

    def _own(self, epoch: int, rid: int) -> int:
        return sum(1 for s in self.inflight.values() if s.epoch == epoch and s.replica == rid)

    def queued_s(self, routes: Routes, rid: int, prompt_s: float, now: float | None = None) -> float:
        """Predicted seconds of prompts ahead of a new one at replica ``rid``'s first stage: this
        entry's own (the oldest counted as under way since it was sent), and the others' its last
        load report showed (each counted as ``prompt_s``, the new prompt's own prefill there; they
        drain from the report on)."""
        own = [s for s in self.inflight.values() if s.epoch == routes.epoch and s.replica == rid]
        own_s = sum(s.seconds for s in own)
        if own and now is not None:
            oldest = min(own, key=lambda s: -1.0 if s.t_sent is None else s.t_sent)
            if oldest.t_sent is not None:
                own_s -= min(max(0.0, now - oldest.t_sent), oldest.seconds)
        ld = self.loads.get((routes.epoch, rid))
        others_s = 0.0
        if ld is not None:
            others = max(0, ld.decoding - ld.started - ld.own_at_report)
            others_s = others * prompt_s
            if now is not None and ld.t_report is not None:
                others_s = max(0.0, others_s - max(0.0, now - ld.t_report))
            if ld.seen_s > 0:  # what the replica itself answered lately: the truth then
                seen = ld.seen_s - (max(0.0, now - ld.t_seen) if now is not None and ld.t_seen is not None else 0.0)
                return max(own_s + others_s, seen)
        return own_s + others_s

    def _fronts(self, routes: Routes, prompt_len: int, max_tokens: int, now: float | None
                ) -> tuple[list[Candidate], list[int], list[int], dict[int, Candidate]]:
        """The candidates that take the prompt, the BOTH replicas among them, the decoders a
        PREFILL replica hands off to (best first) and their decode candidates."""
        pre = routes.prefill_replicas()
        dec = routes.decoder_replicas()
        need = prompt_len + max_tokens
        both = [rid for rid in pre if self._both(routes, rid)]
        pure = [rid for rid in dec if rid not in both]

        def decode_c(rid: int, handoff: float) -> Candidate:
            ld = self.loads.get((routes.epoch, rid), _Load())
            running = ld.decoding + ld.sent_since
            tpot = self.decode_estimate(routes, rid, running + 1) if self.decode_estimate else 1.0
            return Candidate(rid, 0.0, 0.0, tpot * max_tokens * (1 + running / max(ld.max_batch, 1)),
                             handoff, self.has_room(routes, rid, need))

        # the decoders a PREFILL replica hands off to, best first (room first): pure decoders;
        # BOTH replicas only in a plan without any (they prefill their own otherwise)
        dec_order = _ordered([decode_c(rid, 0.0) for rid in (pure or both)], "completion")
        dec_c = {rid: decode_c(rid, 0.0) for rid in (pure or both)}
        fronts = []
        for rid in pre:
            ps = self.prefill_estimate(routes, rid, prompt_len) if self.prefill_estimate else 0.0
            ld = self.loads.get((routes.epoch, rid))
            if rid in both:
                d = decode_c(rid, 0.0)
                # what its first stage runs now: a decode step of the sequences it holds
                busy = 0.0
                if ld is not None and ld.started > 0 and self.decode_estimate:
                    busy = self.decode_estimate(routes, rid, ld.started)
                fronts.append(Candidate(rid, self.queued_s(routes, rid, ps, now), ps, d.decode_s, 0.0,
                                        d.has_room, busy_s=busy))
            else:
                if ld is not None and ld.ttft_s > ps:  # it reports no load: its observed TTFT
                    ps = ld.ttft_s
                best = dec_c[dec_order[0]]
                fronts.append(Candidate(rid, self.queued_s(routes, rid, ps, now), ps, best.decode_s,
                                        best.handoff_s, any(c.has_room for c in dec_c.values())))
        return fronts, both, dec_order, dec_c

    def rank(self, routes: Routes, prompt_len: int, max_tokens: int,
             now: float | None = None) -> list[tuple[int, int]]:
        """(prefill, decoder) pairs, best first, for the entry to try in turn: the replicas that
        take prompts ranked under the policy, a BOTH replica paired with itself and a PREFILL
        replica with each decoder in the order the scoring prefers; pairs whose decoder last
        reported room come first."""
        if not routes.prefill_replicas() or not routes.decoder_replicas():
            return []
        fronts, both, dec_order, dec_c = self._fronts(routes, prompt_len, max_tokens, now)
        pairs = []
        for f in _ordered(fronts, self.policy):
            pairs.extend([(f, f)] if f in both else [(f, d) for d in dec_order])
        # a decoder that last reported no room goes after every one that did
        need = prompt_len + max_tokens
        room = {c.replica_id: c.has_room for c in dec_c.values()}
        room.update({rid: self.has_room(routes, rid, need) for rid in both})
        return sorted(pairs, key=lambda pd: not room[pd[1]])

    def queue_allowance(self, routes: Routes, replica: int, prompt_len: int, max_tokens: int,
                        now: float | None = None, exclude: frozenset[int] = frozenset()) -> int:
        """Prompt tokens that may be ahead of this prompt at ``replica``'s first stage before
        another candidate (not in ``exclude``) would be the policy's choice: the queue this router
        counts there plus the margin to the runner-up, in the replica's prefill tokens. -1: no
        limit (no runner-up, or no estimates). The entry sends it with a reservation, so that a
        replica whose queue grew since (prompts other entries sent a moment before) hands the
        prompt back instead of queueing it."""
        if self.prefill_estimate is None or prompt_len < 1:
            return -1
        fronts, _, _, _ = self._fronts(routes, prompt_len, max_tokens, now)
        me = next((c for c in fronts if c.replica_id == replica), None)
        others = [c for c in fronts if c.replica_id != replica and c.replica_id not in exclude and c.has_room]
        if me is None or not others or me.prefill_s <= 0:
            return -1
        margin = min(_margin(me, c, self.policy) for c in others)
        per_token = me.prefill_s / prompt_len
        return max(0, int((me.queue_s + margin) / per_token + 1e-6))  # 1e-6: float noise

    def observed(self, routes: Routes, replica: int, ahead: int, prompt_len: int, now: float | None = None) -> None:
        """A replica answered that ``ahead`` prompt tokens were queued at its first stage when it
        handed back a prompt of ``prompt_len``: counted as its queue, at that prompt's prefill
        time per token (as :meth:`queue_allowance` allowed it), draining from now until the
        replica's next load report."""
        if self.prefill_estimate is None or ahead <= 0 or prompt_len < 1:
            return
        per_token = float(self.prefill_estimate(routes, replica, prompt_len)) / prompt_len
        ld = self.loads.setdefault((routes.epoch, replica), _Load())
        ld.seen_s, ld.t_seen = ahead * per_token, now

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


def _margin(me: Candidate, other: Candidate, policy: str) -> float:
    """Seconds of queue ``me`` may gain before ``other`` is preferred to it under ``policy``."""
    if policy in ("start", "first_token"):
        when = predicted_start if policy == "start" else predicted_first_token
        gap = when(other) - when(me)
        if gap > START_TOLERANCE_S:
            return gap
        # as soon: completion decides, and any more queue at ``me`` lets ``other`` go first
        return 0.0
    return max(0.0, predicted_completion(other) - predicted_completion(me))


def _ordered(cands: list[Candidate], policy: str) -> list[int]:
    """Replica ids in the order ``policy`` prefers them, those with room first."""
    order: list[int] = []
    rest = list(cands)
    while rest:
        pick = choose(rest, policy=policy, need_room=True)
        if pick is None:
            pick = choose(rest, policy=policy)
        assert pick is not None
        order.append(pick)
        rest = [c for c in rest if c.replica_id != pick]
    return order
