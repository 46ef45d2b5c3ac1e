"""One request as the entry sees it: one record, one status, every legal transition in one table.

A request is WAITING (for a replica with room, or for an intact one after a fault), RESERVING (a
decoder replica was asked for KV room), PREFILLING (the prompt is on a prefill replica),
HANDING_OFF (the first token came from a prefill replica; the decoder takes over), DECODING, and
finally FINISHED with a reason. A failed attempt sends it back to WAITING with the next attempt
number; frames of any other attempt are dropped. Metrics, the dashboard and cleanup read this
record, and ``finish_reason`` is the one place that decides when generation ends (EOS, length).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from meshllm.errors import LocalProtocolError
from meshllm.runtime.generate import FINISH_LENGTH, FINISH_STOP, finish_reason
from meshllm.runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RESERVING = "reserving"
    PREFILLING = "prefilling"
    HANDING_OFF = "handing_off"
    DECODING = "decoding"
    FINISHED = "finished"


class Finish(enum.Enum):
    """Why a request ended. STOP and LENGTH are OpenAI's finish reasons; ABORT: the client went
    away; ERROR: it could not complete (the client got an explicit error)."""

    STOP = FINISH_STOP
    LENGTH = FINISH_LENGTH
    ABORT = "abort"
    ERROR = "error"


__all__ = ["FINISH_LENGTH", "FINISH_STOP", "RETRYABLE", "TRANSITIONS", "Finish", "Request", "Status", "finish_reason"]

S = Status
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.WAITING: frozenset({S.RESERVING, S.FINISHED}),
    # refused: the next decoder (RESERVING again) or wait for room; accepted: the prompt goes out
    S.RESERVING: frozenset({S.RESERVING, S.WAITING, S.PREFILLING, S.FINISHED}),
    S.PREFILLING: frozenset({S.HANDING_OFF, S.DECODING, S.WAITING, S.FINISHED}),
    S.HANDING_OFF: frozenset({S.DECODING, S.WAITING, S.FINISHED}),
    S.DECODING: frozenset({S.WAITING, S.FINISHED}),
    S.FINISHED: frozenset(),
}

# attempt failures worth another replica (a bad request or a bad token is not)
RETRYABLE = frozenset({"node_lost", "unreachable", "stage_error", "handoff_timeout", "stalled", "epoch_unloaded",
                       "stale_epoch", "capacity", "timeout"})


@dataclass(slots=True)
class Request:
    """Everything the entry knows about one request."""

    id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    t_arrival: float
    decoder: Any = None  # the tokenizer's StreamDecoder (stop strings, text), or None
    status: Status = Status.WAITING
    attempt: int = 0
    migrations: int = 0
    epoch: int = 0
    prefill: int = -1
    decode: int = -1
    nodes: frozenset[str] = frozenset()  # the nodes whose loss fails the current attempt
    reserve_nodes: frozenset[str] = frozenset()  # the decoder being asked for room
    tried: set[int] = field(default_factory=set)  # decoders that refused in this admission round
    refusals: dict[str, int] = field(default_factory=dict)  # code -> count, this admission round
    busy: set[int] = field(default_factory=set)  # replicas that handed its prompt back for their queue
    last_refusal: str = ""
    deadline: float = float("inf")  # when the current status times out
    wait_until: float = float("inf")  # the latest a WAITING request may wait
    retry_at: float = 0.0  # a WAITING request tries again (room may have come back)
    last_progress: float = 0.0
    expect_s: float = 0.0  # the router's estimate of the time to the first token
    prefilled: int = 0  # prompt tokens through the prefill replica's last stage reported so far
    next_index: int = 0
    pending: dict[int, Any] = field(default_factory=dict)  # index -> Token, out of order
    tokens: list[int] = field(default_factory=list)
    t_sent: float | None = None  # the prompt went to a prefill replica (the last one, after a hand-back)
    # how long it then waited at that replica's first stage (its first Progress says; None until
    # then): the waiting time is t_sent - t_arrival + queued_s, arrival to the prefill's start
    queued_s: float | None = None
    t_first: float | None = None
    t_end: float | None = None
    finish: Finish | None = None
    reason: str | None = None  # the OpenAI finish reason of a completed request
    error: tuple[str, str] | None = None  # (message, code) of a failed one
    dropped_frames: int = 0  # frames of other attempts, dropped
    prompt_logprobs: bool = False  # the prompt's own logprobs come with token 0
    eager: bool = False  # the prompt went out with the reservation, not after it came back

    def to(self, status: Status) -> None:
        if status not in TRANSITIONS[self.status]:
            raise LocalProtocolError(f"request {self.id}: illegal transition {self.status.value} -> {status.value}")
        self.status = status

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def sent(self) -> bool:
        return self.t_sent is not None
