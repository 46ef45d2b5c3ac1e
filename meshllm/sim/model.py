"""The simulator's view of a plan: replicas, their stages, and a timing oracle.

The simulator never computes a service time itself: every compute and transfer duration comes
from a ``Timing`` object. ``meshllm.sim.adapter`` builds one from the planner's cost model; tests
build synthetic ones (a constant service time for the M/D/1 check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from meshllm.planner.cost import IDLE_GAP_S
from meshllm.sim.engine import SimError
from meshllm.sim.routing import POLICIES

ROLES = ("prefill", "decoder", "both")


@dataclass(frozen=True, slots=True)
class SimStage:
    node: str
    first: int  # first block index (0 = embed)
    end: int  # one past the last block index


@dataclass(frozen=True, slots=True)
class SimReplica:
    id: int
    role: str  # "prefill" | "decoder" | "both"
    stages: tuple[SimStage, ...]
    kv_capacity_tokens: int  # KV tokens every stage can hold at once (the tightest stage)
    max_batch: int  # sequences decoded at once (KV slots)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SimError(f"replica {self.id}: unknown role {self.role!r}")
        if not self.stages:
            raise SimError(f"replica {self.id} has no stages")


class Timing(Protocol):
    """Service times in seconds. Implementations must be pure functions of their arguments."""

    def prefill_s(self, replica: SimReplica, stage: int, tokens: int, ctx_before: int) -> float:
        """Compute time of ``tokens`` prompt tokens through one stage, after ``ctx_before``."""
        ...

    def decode_s(self, replica: SimReplica, stage: int, batch: int, ctx: float) -> float:
        """Compute time of one decode step of ``batch`` sequences of mean context ``ctx``."""
        ...

    def idle_s(self, replica: SimReplica, stage: int, gap_s: float = IDLE_GAP_S) -> float:
        """What a stage's work (a decode step, a prompt chunk) takes more when its node was idle
        for ``gap_s`` just before (``planner.cost.idle_time``); 0 where that is not modelled."""
        ...

    def transfer_s(self, src: str, dst: str, nbytes: float) -> float:
        """Time to move ``nbytes`` from ``src`` to ``dst`` (bandwidth plus latency); 0 if same."""
        ...

    def act_bytes_per_token(self, block: int) -> int:
        """Bytes per token of the output of ``block`` (what crosses a stage boundary)."""
        ...

    def kv_bytes_per_token(self, first: int, end: int) -> int:
        """KV bytes per token held by blocks ``[first, end)``."""
        ...


@dataclass(frozen=True, slots=True)
class SimModel:
    replicas: tuple[SimReplica, ...]
    timing: Timing
    entry: str | None = None  # node where prompts enter and tokens leave; None: each replica's stage 0

    def __post_init__(self) -> None:
        roles = {r.role for r in self.replicas}
        if not self.replicas:
            raise SimError("the plan has no replicas")
        if "prefill" in roles and "decoder" not in roles:
            raise SimError("the plan has prefill replicas but no decoder replica")
        if "decoder" in roles and not roles & {"prefill", "both"}:
            raise SimError("the plan has decoder replicas but nothing that runs prefill")


@dataclass(frozen=True, slots=True)
class SimConfig:
    pipeline: str = "no-bubbles"  # "no-bubbles" | "bubbles" (EdgeShard Fig. 5)
    prefill_chunk_tokens: int = 512  # prompt micro-batch size through the prefill pipeline
    max_groups: int = 0  # decode micro-batches in flight per replica; 0 = number of stages
    routing: str = "completion"  # routing policy (meshllm.sim.routing.POLICIES)
    # 0: every node has its own hardware. n > 0: the nodes share n cores (a mesh of processes on
    # one machine, as `meshllm up` and the benchmarks run): work that starts while k nodes are
    # computing takes max(1, k / n) times as long (processor sharing, frozen at the start)
    shared_cores: float = 0.0
    # 0: stage 0 of a BOTH replica serves prompts and decode micro-batches first come, first
    # served (a decode step waits for every prompt that arrived before it came back). n > 0: as
    # the serving core's scheduler (serve/stagecore.py, step_token_budget): a decode micro-batch
    # that is back waits for at most n prompt tokens of prefill (and always at least one chunk)
    step_token_budget: int = 0
    # False: each job (a prompt's micro-batch, a decode micro-batch) is served on its own and its
    # output leaves when it ends. True (needs step_token_budget > 0): stage work in the serving
    # core's iterations (serve/stagecore.py ``schedule``): an iteration takes every decode
    # micro-batch that is back and prompt micro-batches while the budget lasts (at least one),
    # computes them one after another and sends every output when the last ends; a prompt is
    # admitted (its KV room allocated) in one iteration and computed from the next; at later
    # stages an iteration's work arrives together and is computed together
    iterations: bool = False
    # with iterations: a prompt for a separate decoder with room goes to its prefill replica at
    # once, beside the reservation (serve.eager_handoff, on by default); the decoder's reservation
    # (its next iteration, after the steps it is running) then gates only its decode start. False:
    # the prompt is admitted when the reservation is back
    eager_handoff: bool = True
    # with shared_cores: the share of a core each node uses while it computes (1/F for a node
    # slowed F times, which sleeps the rest), as (node, share) pairs; unlisted nodes use a whole
    # core. Work stretches by the cores' sharing only in its computing share
    core_share: tuple[tuple[str, float], ...] = ()
    # with shared_cores: the CPU seconds each node's serving path (frames, the stage core, the
    # entries' HTTP and SSE) takes per row of a stage's work (a prompt micro-batch, or a sequence of
    # a decode micro-batch), as (node, seconds) pairs. It runs beside the compute (the node's event
    # loop, not its inference thread) and is not slowed: while a job runs its node asks for
    # (its rows' serving CPU / the job's time) of a core more, which stretches work only where the
    # cores are short. Unlisted nodes: none. On its own hardware a node's serving path is not modelled
    serve_cpu: tuple[tuple[str, float], ...] = ()
    # with shared_cores: the cores other work on the machine takes meanwhile (steady): they share
    # the cores with the nodes computing (work stretches by max(1, (k + background) / n))
    background_cores: float = 0.0

    def __post_init__(self) -> None:
        if self.pipeline not in ("no-bubbles", "bubbles"):
            raise SimError(f"unknown pipeline mode {self.pipeline!r}")
        if self.routing not in POLICIES:
            raise SimError(f"unknown routing policy {self.routing!r}; known: {', '.join(POLICIES)}")
        if self.step_token_budget < 0:
            raise SimError("step_token_budget must be >= 0")
        if not self.shared_cores >= 0:
            raise SimError("shared_cores must be >= 0")
        if self.iterations and self.step_token_budget <= 0:
            raise SimError("iterations need a step_token_budget > 0")
        if any(not 0 < x <= 1 for _, x in self.core_share):
            raise SimError("a node's core share must be in (0, 1]")
        if not self.background_cores >= 0:
            raise SimError("background_cores must be >= 0")
        if any(not x >= 0 for _, x in self.serve_cpu):
            raise SimError("a node's serving CPU per row must be >= 0")
        if self.prefill_chunk_tokens <= 0:
            raise SimError("prefill_chunk_tokens must be positive")
