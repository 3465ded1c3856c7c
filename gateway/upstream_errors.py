"""Upstream refusals said again in the terms of the Chat API the client called.

The batcher refuses a prompt beyond the context window naming its own field (`prompt_ids has 76032 tokens; ...`)
with trailing metadata `error-code: context_length_exceeded`; the client sent `messages`, so that is the field the
gateway names (OpenAI: HTTP 400, `param: "messages"`, `code: "context_length_exceeded"`; the edge maps it).
"""

from __future__ import annotations

import grpc

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ContextLengthExceeded(ValueError):
    """INVALID_ARGUMENT naming `messages`; `error_code` travels as trailing metadata `error-code`."""

    error_code = CONTEXT_LENGTH_EXCEEDED


def upstream_error_code(exc: grpc.RpcError) -> str | None:
    """The `error-code` trailing metadata of an upstream error, if any."""
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return None
    return next((str(v) for k, v in metadata if k == "error-code"), None)


def in_chat_terms(exc: grpc.RpcError) -> Exception | None:
    """The Chat API's error for a batcher refusal that names the batcher's fields; None: keep `exc` as it is."""
    if upstream_error_code(exc) != CONTEXT_LENGTH_EXCEEDED:
        return None
    return ContextLengthExceeded(f"messages: the prompt does not fit the model's context window: shorten the "
                                 f"messages (batcher: {exc.details()})")  # type: ignore[attr-defined]
