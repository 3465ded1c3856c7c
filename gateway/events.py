"""Plain values the gateway's adapters (upstream.py, metering_client.py) hand to its domain (completion.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

# GenerateEvent.finish_reason names (moemesh.v1.FinishReason without the prefix, lowercase).
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_DEADLINE, FINISH_ERROR = (
    "stop", "length", "cancelled", "deadline", "error"
)


@dataclass(frozen=True)
class TokenEvent:
    """One event of the batcher's Generate stream."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()  # per token, when asked for
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()  # per token: its alternatives (id, logprob)
    finish_reason: str | None = None  # set on the last event only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    queue_seconds: float = 0.0
    cached_tokens: int = 0  # prompt tokens served from the router's prefix cache
    # sampling.prompt_logprobs, first token's event: per prompt token (logprob or None for the first, alternatives)
    prompt_logprobs: tuple[tuple[float | None, tuple[tuple[int, float], ...]], ...] = ()


@dataclass(frozen=True)
class GenerateParams:
    """What the gateway asks the batcher to run."""

    request_id: str
    tenant: str
    model: str
    prompt_ids: tuple[int, ...]
    sampling: object  # moemesh.runtime.types.SamplingParams
    deadline_unix_ms: int = 0
    priority: int = 0
    tenant_weight: float = 1.0
    cache_salt: str = ""  # prefix-cache salt within the tenant (the tenant always isolates)


@dataclass(frozen=True)
class Tenant:
    """Who pays for a request (Metering.Authenticate)."""

    name: str
    key_id: str
    weight: float = 1.0
    priority: int = 0
    namespace: str = ""  # isolation scope of the tenant's caches and resources (its name unless set)


@dataclass(frozen=True)
class UsageRecord:
    """What Metering.Commit records for one request."""

    request_id: str
    tenant: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_seconds: float
    finish_reason: str
    engine_seconds: float = 0.0
    user: str = ""
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (billed at the cached rate)


@dataclass(frozen=True)
class TokenInfo:
    """A generated token with what logprobs need: its own text and bytes, and its alternatives."""

    token_id: int
    text: str
    bytes: bytes
    logprob: float | None  # None: a prompt's first token (nothing precedes it)
    top: tuple["TokenInfo", ...] = field(default=())
