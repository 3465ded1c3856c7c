"""A chat-completion request as plain values, and its validation into what the mesh runs (no grpc, no protobuf).

Every rejection is a ValueError whose message starts with the offending field ("max_tokens: -5 must be >= 1"),
which the status interceptor turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway.message_shapes import Message, template_messages
from gateway.models import ModelCatalog, ModelDefaults
from gateway.structured import ToolPlan, response_guided, tool_plan
from moemesh.runtime.types import Guided, SamplingParams

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range (the router checks it again: moemesh/runtime/penalties.py)


@dataclass(frozen=True)
class ChatRequest:
    """The request as received (absent optional fields are None). A completions request sets `prompt` instead of
    messages."""

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
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}
    response_format: dict[str, Any] | None = None
    logit_bias: tuple[tuple[str, float], ...] = ()  # (token id as sent, bias)
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float | None = None
    prompt: str | None = None  # /v1/completions: plain text, no chat template
    cache_salt: str = ""  # vLLM's field: prefix-cache sharing only among requests of the tenant with this salt
    prompt_logprobs: int | None = None  # vLLM's extension: score the prompt's tokens with this many alternatives
    echo: bool = False  # /v1/completions: the answer starts with the prompt (and its logprobs, with logprobs)


@dataclass(frozen=True)
class ValidatedChat:
    """What the gateway runs: canonical model, template-ready messages (or a plain prompt), sampling."""

    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    user: str = ""
    include_usage: bool = False
    stop: tuple[str, ...] = field(default=())  # applied by the gateway on the detokenized text
    n: int = 1
    tools: ToolPlan = field(default_factory=ToolPlan)
    prompt: str | None = None
    cache_salt: str = ""  # prefix-cache salt within the tenant
    prompt_logprobs: int | None = None  # the client asked for prompt_logprobs (returned as such)
    echo: bool = False  # completions: prepend the prompt to the text (and its token logprobs, with logprobs)
    bill_prompt: bool = True  # False for choices 1..n-1 of one request: the prompt is billed once (choices.py)
    # echo with max_tokens 0 (OpenAI's way to score a text, e.g. lm-eval's loglikelihood): the engine always samples,
    # so one token is generated and dropped; the answer and the bill have 0 completion tokens
    score_only: bool = False


def _cache_salt(salt: str) -> str:
    """NUL separates tenant and salt in the router's cache namespace; a salt is a short opaque string."""
    if "\x00" in salt or len(salt) > 256:
        raise ValueError(f"cache_salt: must be at most 256 characters without NUL, got {salt[:40]!r}")
    return salt


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


def _prompt_scoring(req: ChatRequest) -> int | None:
    """How many alternatives the router scores prompt tokens with: prompt_logprobs, or echo's logprobs count
    (OpenAI's echo returns the prompt tokens' logprobs with the same top_logprobs as the completion's)."""
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"prompt_logprobs: {req.prompt_logprobs} is not in [0, {MAX_TOP_LOGPROBS}]")
    if req.echo and req.prompt is None:
        raise ValueError("echo: only /v1/completions takes echo (chat: use prompt_logprobs)")
    wanted = [n for n in (req.prompt_logprobs, (req.top_logprobs or 0) if req.echo and req.logprobs else None)
              if n is not None]
    return max(wanted) if wanted else None


def _logit_bias(pairs: tuple[tuple[str, float], ...]) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in pairs:
        if not key.isdigit():
            raise ValueError(f"logit_bias[{key!r}]: keys must be token ids (non-negative integers as strings)")
        _in_range(f"logit_bias[{key!r}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        out.append((int(key), bias))
    return tuple(out)


def _guided(req: ChatRequest) -> tuple[ToolPlan, Guided | None]:
    plan, forced = tool_plan(list(req.tools), req.tool_choice)
    guided = response_guided(req.response_format)
    if forced is not None and guided is not None:
        raise ValueError("response_format: cannot be combined with a tool_choice that forces a call")
    return plan, forced or guided


def _default(value, defaults: ModelDefaults, name: str, fallback):
    """The request's value, else the model's generation_config default, else moemesh's (as vLLM does)."""
    if value is not None:
        return value
    chosen = getattr(defaults, name)
    return fallback if chosen is None else chosen


def _sampling(req: ChatRequest, max_tokens: int, defaults: ModelDefaults, guided: Guided | None) -> SamplingParams:
    return SamplingParams(
        temperature=_default(req.temperature, defaults, "temperature", 1.0),
        top_p=_default(req.top_p, defaults, "top_p", 1.0),
        top_k=_default(req.top_k, defaults, "top_k", 0),
        seed=None if req.seed is None else req.seed % 2**64,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        max_tokens=max_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
        ignore_eos=req.ignore_eos,
        logit_bias=_logit_bias(req.logit_bias),
        repetition_penalty=_default(req.repetition_penalty, defaults, "repetition_penalty", 1.0),
        guided=guided,
        prompt_logprobs=_prompt_scoring(req),
    )


def validate(req: ChatRequest, models: ModelCatalog, *, default_max_tokens: int, max_n: int = 8,
             defaults: ModelDefaults | None = None) -> ValidatedChat:
    """The checks, in the order a client fixes them: unsupported features, model, messages, then numbers."""
    if req.unsupported:
        raise ValueError(f"{req.unsupported[0]}: not supported by moemesh (remove the field)")
    model = models.resolve(req.model)
    messages = template_messages(req.messages) if req.prompt is None else []
    if req.prompt is not None and not req.prompt:
        raise ValueError("prompt: must not be empty")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    score_only = req.echo and asked == 0
    max_tokens = 1 if score_only else _max_tokens(req, default_max_tokens)
    _in_range("temperature", req.temperature, 0.0, 2.0)
    _in_range("top_p", req.top_p, 0.0, 1.0, low_open=True)
    _in_range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _in_range("repetition_penalty", req.repetition_penalty, 0.0, 2.0, low_open=True)
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise ValueError(f"n: {n} choices requested; this gateway allows 1 to {max_n} (--max-n)")
    _check_stop(req.stop)
    _check_logprobs(req)
    plan, guided = _guided(req)
    sampling = _sampling(req, max_tokens, defaults or ModelDefaults(), guided)
    return ValidatedChat(model=model, messages=messages, sampling=sampling, user=req.user,
                         include_usage=req.include_usage, stop=req.stop, n=n, tools=plan, prompt=req.prompt,
                         cache_salt=_cache_salt(req.cache_salt), prompt_logprobs=req.prompt_logprobs,
                         echo=req.echo, score_only=score_only)
