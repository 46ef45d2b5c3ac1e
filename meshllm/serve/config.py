"""The serving layer's settings (one frozen record, passed in by the node's composition root)."""

from __future__ import annotations

from dataclasses import dataclass

from meshllm.errors import ConfigError

KV_WIRE_DTYPES = ("float32", "float16")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    # Prompt tokens per prefill chunk: a prefill replica's stages work on consecutive chunks at
    # once (pipelined) and stream each chunk's KV as soon as it is computed. The runner computes
    # a prompt in the same chunks, so a mesh and one process do the same arithmetic.
    prefill_chunk: int = 512
    # Tokens one scheduler iteration of a stage may compute: every ready decode row counts one,
    # then prefill chunks (one per request, round-robin) while the rest lasts, and always at least
    # one chunk, so neither decoding nor prefill starves. A smaller budget shortens the time a
    # decode step can wait behind prompts; a larger one prefills more per iteration.
    step_token_budget: int = 512
    max_queue: int = 64  # requests an entry holds (running + waiting); beyond: 429
    queue_timeout_s: float = 30.0  # how long a request may wait for KV room before 503
    reserve_timeout_s: float = 5.0  # a decoder replica's answer to an admission request
    handoff_timeout_s: float = 30.0  # KV reserved for a hand-off that never completes is freed
    # An entry sends a prompt to a PREFILL replica together with the reservation at its DECODER
    # (when the decoder's last load report shows room), not after the reservation comes back: the
    # reservation's round trip, which waits behind the decoder's running step on each of its
    # stages, leaves every time to first token. A refusal then frees the prefill done meanwhile.
    eager_handoff: bool = True
    # An entry that sends a prompt to a replica which prefills its own requests says how many
    # prompt tokens it expects queued ahead there, plus its margin to the next-best replica; stage
    # 0 hands the prompt back ("busy", with its own count) when more are queued (prompts other
    # entries sent a moment before, which no load report has shown yet) and the entry ranks again
    # knowing it. Each replica hands a request back once at most.
    busy_handback: bool = True
    # KV (and the first token) of such a hand-off that reaches a decoder stage before the
    # reservation does waits at the stage, up to this many MiB a node, then is taken in when the
    # reservation lands; beyond it, or after handoff_timeout_s, it is dropped (the hand-off then
    # fails and the request resumes elsewhere)
    early_kv_mib: float = 256.0
    # no sign of progress (a prefilled chunk, a token) for this long, or for stall_factor times
    # the router's estimate of the prefill when that is longer: the attempt failed
    stall_timeout_s: float = 30.0
    stall_factor: float = 4.0
    # a decode step of a ring that gets no answer within this long fails its rows instead of
    # stalling the micro-batch
    step_timeout_s: float = 30.0
    # how long a stage remembers a freed request, so late frames of it allocate nothing
    tombstone_s: float = 120.0
    kv_wire_dtype: str = "float32"  # float16 halves hand-off bytes (not exact)
    load_report_s: float = 0.5  # period of a replica's load report
    max_batch: int = 64  # sequences a decoder replica decodes at once (all micro-batches)
    retry_after_s: int = 1  # the Retry-After of a 429
    # a request whose replica fails resumes elsewhere from its prompt and streamed tokens, this
    # many times at most; then the client gets an explicit error
    max_migrations: int = 2
    # how long a resumed request waits for an intact replica (the mesh re-plans around a lost node)
    # before it fails with an explicit error
    migrate_wait_s: float = 10.0
    # a streaming answer idle this long (a long prefill, a wait for room, a slow token) gets a
    # keep-alive (an SSE comment, an empty NDJSON chunk) so proxies do not cut the connection
    keepalive_s: float = 10.0
    # speculative decoding (serve/spec.py): a decoder ring's stage 0 drafts up to spec_max_draft
    # tokens per request by prompt lookup and the head keeps those it samples itself, so a step
    # may yield several tokens with the tokens unchanged. The node's default; a request's
    # `speculate` overrides it. Off by default: exact verification costs a full one-token step per
    # draft on a CPU, and measured side by side (`bench mesh`, SmolLM2, 2 nodes) it took 8
    # concurrent streams from 158 to 106-112 tok/s, while it pays only on slow hops. Turning it on
    # or off never changes a token. With runtime.attention auto it also picks the mesh's attention
    # (plain, whose drafts verify in one pass, where it is on; fused GQA, the faster step, where it
    # is off): the leader's setting when the mesh's first plan is made (docs/runtime.md).
    speculate: bool = False
    spec_max_draft: int = 4
    # draft only as much as pays at the step costs measured on the ring (StepCost); off: always the
    # length adapted to acceptance alone
    spec_cost_aware: bool = True
    # a decode-only iteration expected to take at most this long (the stage's last one did) runs
    # on the event loop where its frame landed, not on the inference thread: a hop then pays no
    # thread switch. Control frames wait behind it that long at most; 0: always the thread.
    inline_step_ms: float = 25.0
    # while this node's stages decode, hold a CPU wake-up latency request of 0 (Linux PM QoS,
    # /dev/cpu_dma_latency; needs write access to it): idle cores poll in the kernel instead of
    # halting, so a ring's frame wakes its stage at once and the step runs on a warm core
    # (serve/wake.py). Machine-wide and a power cost while rings decode: off by default.
    wake_qos: bool = False
    # lab only: hold every control frame a stage sends to another node this long (a per-hop delay
    # on loopback, where netem is not available)
    hop_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.kv_wire_dtype not in KV_WIRE_DTYPES:
            raise ConfigError(f"kv_wire_dtype must be one of {KV_WIRE_DTYPES}, got {self.kv_wire_dtype!r}")
        if self.step_token_budget < 1:
            raise ConfigError(f"step_token_budget must be >= 1, got {self.step_token_budget}")
        for name in ("queue_timeout_s", "reserve_timeout_s", "handoff_timeout_s", "stall_timeout_s",
                     "load_report_s", "migrate_wait_s", "keepalive_s", "stall_factor", "step_timeout_s",
                     "tombstone_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_migrations < 0:
            raise ConfigError(f"max_migrations must be >= 0, got {self.max_migrations}")
        if not 0 <= self.spec_max_draft <= 16:
            raise ConfigError(f"spec_max_draft must be in [0, 16], got {self.spec_max_draft}")
        if not 0 <= self.hop_delay_ms <= 10_000:
            raise ConfigError(f"hop_delay_ms must be in [0, 10000], got {self.hop_delay_ms}")
        if not 0 <= self.inline_step_ms <= 1000:
            raise ConfigError(f"inline_step_ms must be in [0, 1000], got {self.inline_step_ms}")
        if self.early_kv_mib < 0:
            raise ConfigError(f"early_kv_mib must be >= 0, got {self.early_kv_mib}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
