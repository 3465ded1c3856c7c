"""What crosses between the scheduler, the engine loop and the router client: a step's plan, its results, and the
events the waiting clients receive. Plain dataclasses; the router client maps them to protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from services.batcher.sequence import Finish, Sequence


@dataclass
class SequenceWork:
    """One sequence's share of a step: tokens[position : position + len(token_ids)]."""

    seq: Sequence
    token_ids: list[int]
    position: int  # tokens already in the router's KV cache
    sample: bool  # the chunk ends the known tokens: sample the next one
    # Pipelined (lookahead.py): the router feeds the token it sampled for the sequence in the previous step; planned
    # before that step's result, so token_ids is empty until the result fills it in (then [that token]).
    follows: bool = False


@dataclass
class StepPlan:
    step_id: int
    items: list[SequenceWork]
    release: list[str] = field(default_factory=list)  # sequences the router drops before this step's work

    @property
    def tokens(self) -> int:
        return sum(1 if i.follows else len(i.token_ids) for i in self.items)  # a follows work feeds one token


@dataclass
class SequenceResult:
    """The router's answer for one SequenceWork."""

    seq_id: str
    token_id: int | None  # None when the item did not sample
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    cached_tokens: int = 0  # tokens of the item served from the prefix cache (not computed)
    # sampling.prompt_logprobs: per prompt token the item fed, (logprob or None for the first, [(id, logprob)])
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class StepOutcome:
    outputs: list[SequenceResult]
    compute_seconds: float  # time inside the router
    kv_blocks_free: int  # idle cached blocks included (evicted on demand)
    kv_blocks_own: dict[str, int] = field(default_factory=dict)  # blocks only that sequence holds (changed ones)
    kv_blocks_cached: int | None = None  # idle blocks kept for a cached prefix


@dataclass
class Event:
    """Something a client is told: new tokens, and on the last event the finish reason and the request's figures."""

    seq_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # per token, when the router returned them
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    queue_seconds: float = 0.0
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens served from the router's prefix cache
    detail: str = ""  # why the sequence ended, in words (errors, deadlines)
    prompt_logprobs: list = field(default_factory=list)  # every prompt token's (SequenceResult), first token's event


@dataclass
class QueueFull(Exception):
    """The bounded queue is full; retry after `retry_after` seconds."""

    retry_after: float
    reason: str

    def __str__(self) -> str:
        return f"{self.reason}; retry after {self.retry_after * 1000:.0f} ms"


class InvalidRequest(ValueError):
    """The request can never run (names the offending field and value)."""


@dataclass(frozen=True)
class RouterLimits:
    """What the batcher needs from Router.Info."""

    model: str
    max_context: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    active_sequences: int
    eos_token_ids: tuple[int, ...]
    instance_id: str = ""  # new at every router start: a change means its KV cache is gone (recompute)


class RouterFull(Exception):
    """The router refused a step for lack of KV blocks (it applied nothing)."""

    def __init__(self, message: str, kv_blocks_free: int | None) -> None:
        super().__init__(message)
        self.kv_blocks_free = kv_blocks_free
