"""A small Python client of the moemesh Chat API (used by `moemesh chat`).

    from moemesh.sdk import ChatClient
    with ChatClient.from_status() as client:          # endpoint + dev key of the running `moemesh up`
        print(client.complete("Hello").choices[0].message.content)
        for text in client.stream_text("Tell me a story"):
            print(text, end="", flush=True)
"""

from moemesh.sdk.client import ChatClient, ChatStreamError

__all__ = ["ChatClient", "ChatStreamError"]
