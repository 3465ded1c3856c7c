"""Python clients of the moemesh Chat API: `ChatModel` (chat/stream/achat/astream, typed errors, TLS to the edge)
and the lower-level `ChatClient` (used by `moemesh chat`).

    from moemesh.sdk import ChatClient
    with ChatClient.from_status() as client:          # endpoint + dev key of the running `moemesh up`
        print(client.complete("Hello").choices[0].message.content)
        for text in client.stream_text("Tell me a story"):
            print(text, end="", flush=True)
"""

from moemesh.sdk.chat_model import ChatModel, ChatReply, Usage
from moemesh.sdk.client import ChatClient, ChatStreamError
from moemesh.sdk.errors import (
    APITimeoutError, AuthenticationError, BadRequestError, MoemeshError, NotFoundError, PermissionDeniedError,
    RateLimitError, ServerError, ServiceUnavailableError, StreamError,
)

__all__ = ["APITimeoutError", "AuthenticationError", "BadRequestError", "ChatClient", "ChatModel", "ChatReply",
           "ChatStreamError", "MoemeshError", "NotFoundError", "PermissionDeniedError", "RateLimitError",
           "ServerError", "ServiceUnavailableError", "StreamError", "Usage"]
