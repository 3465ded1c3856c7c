"""A chat-completion request as plain values, and its validation into what the mesh runs (no grpc, no protobuf).

Every rejection is a ValueError whose message starts with the offending field ("max_tokens: -5 must be >= 1"),
which the status interceptor turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gateway.models import ModelCatalog
from moemesh.runtime.types import SamplingParams

ROLES = {"system", "user", "assistant", "developer"}
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """The request as received (absent optional fields are None)."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    n: int | None = None
    user: str = ""
    include_usage: bool = False
    ignore_eos: bool = False  # moemesh extension (benchmarks): run to max_tokens past end-of-sequence tokens
    unsupported: tuple[str, ...] = ()  # names of set fields moemesh does not support


@dataclass(frozen=True)
class ValidatedChat:
    """What the gateway runs: canonical model, template-ready messages, sampling for the batcher."""

    model: str
    messages: list[dict[str, str]]
    sampling: SamplingParams
    user: str = ""
    include_usage: bool = False
    stop: tuple[str, ...] = field(default=())  # applied by the gateway on the detokenized text


def _in_range(name: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    ok = (low < value if low_open else low <= value) and value <= high
    if math.isnan(value) or not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: {value!r} is not in {bracket}{low:g}, {high:g}]")


def _max_tokens(req: ChatRequest, default: int) -> int:
    name, value = ("max_completion_tokens", req.max_completion_tokens)
    if value is None:
        name, value = "max_tokens", req.max_tokens
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{name}: {value} must be >= 1")
    return value


def _messages(messages: tuple[Message, ...]) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("messages: at least one message is required")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"messages[{i}].role: {m.role!r} is not one of {sorted(ROLES)}")
        if not m.content:  # nothing to answer: OpenAI accepts it, but it only wastes a request
            raise ValueError(f"messages[{i}].content: must not be empty")
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        if m.name:
            message["name"] = m.name
        out.append(message)
    return out


def _check_stop(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: {len(stop)} stop strings, at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not s:
            raise ValueError(f"stop[{i}]: empty stop string")


def _check_logprobs(req: ChatRequest) -> None:
    if req.top_logprobs is None:
        return
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs: {req.top_logprobs} is not in [0, {MAX_TOP_LOGPROBS}]")
    if req.top_logprobs and not req.logprobs:
        raise ValueError("top_logprobs: requires logprobs to be true")


def validate(req: ChatRequest, models: ModelCatalog, *, default_max_tokens: int) -> ValidatedChat:
    """The checks, in the order a client fixes them: unsupported features, model, messages, then numbers."""
    if req.unsupported:
        raise ValueError(f"{req.unsupported[0]}: not supported by moemesh (remove the field)")
    model = models.resolve(req.model)
    messages = _messages(req.messages)
    max_tokens = _max_tokens(req, default_max_tokens)
    _in_range("temperature", req.temperature, 0.0, 2.0)
    _in_range("top_p", req.top_p, 0.0, 1.0, low_open=True)
    _in_range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    if req.n is not None and req.n != 1:
        raise ValueError(f"n: {req.n} choices requested; only n=1 is supported")
    _check_stop(req.stop)
    _check_logprobs(req)
    sampling = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=None if req.seed is None else req.seed % 2**64,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        max_tokens=max_tokens,
        stop=req.stop,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
        ignore_eos=req.ignore_eos,
    )
    return ValidatedChat(model=model, messages=messages, sampling=sampling, user=req.user,
                         include_usage=req.include_usage, stop=req.stop)
