"""Admission control at the door: requests that can never run are refused, and the bounded queue pushes back with a
retry-after hint instead of growing without limit."""

from __future__ import annotations

from services.batcher.fairness import FairQueue
from services.batcher.kv_view import KvView
from services.batcher.policy import Policy
from services.batcher.sequence import Sequence
from services.batcher.step import InvalidRequest, QueueFull


class ContextLengthExceeded(InvalidRequest):
    """The prompt alone fills the context window (or the whole KV cache). `error_code` tells callers so without
    parsing the message (trailing metadata `error-code`, moemesh/serving/errors.py)."""

    error_code = "context_length_exceeded"


def validate(seq: Sequence, max_context: int, kv: KvView) -> None:
    """Raises InvalidRequest, naming the field, for a request no schedule could ever run."""
    n = len(seq.prompt_ids)
    if n == 0:
        raise InvalidRequest("prompt_ids must hold at least one token, got 0")
    if n >= max_context:
        raise ContextLengthExceeded(
            f"prompt_ids has {n} tokens; the context window is {max_context} (prompt + at least 1 generated token)"
        )
    if kv.blocks_for(n + 1) > kv.total:
        raise ContextLengthExceeded(
            f"prompt_ids has {n} tokens, needing {kv.blocks_for(n + 1)} KV blocks; the router has {kv.total}"
        )
    if seq.max_tokens < 0:
        raise InvalidRequest(f"max_tokens must be >= 0, got {seq.max_tokens}")
    if seq.max_tokens >= max_context:  # could never be reached: say so instead of generating to the window's end
        raise InvalidRequest(
            f"max_tokens: {seq.max_tokens} is not below the context window of {max_context} tokens (prompt included)"
        )


def check_room(queue: FairQueue, policy: Policy, tenant: str, admit_rate: float) -> None:
    """Raises QueueFull when the whole queue, or the tenant's share of it, is at its bound."""
    if len(queue) >= policy.max_queue:
        raise QueueFull(retry_after(policy, len(queue), admit_rate), f"queue full ({policy.max_queue} waiting)")
    mine = queue.queued(tenant)
    if mine >= policy.tenant_queue_limit:
        raise QueueFull(
            retry_after(policy, mine, admit_rate), f"tenant {tenant!r} has {policy.tenant_queue_limit} requests waiting"
        )


def retry_after(policy: Policy, backlog: int, admit_rate: float) -> float:
    """Seconds until `backlog` requests are likely admitted at the recent admission rate (per second), clamped."""
    guess = backlog / admit_rate if admit_rate > 0 else 1.0
    return min(policy.retry_after_max, max(policy.retry_after_min, guess))
