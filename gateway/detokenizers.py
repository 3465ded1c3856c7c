"""Where the gateway turns a stream's token ids into text: in its own process.

A DetokenizeStream message and its answer per streamed token cost the tokenizer service ~0.5 ms and the gateway
~0.2 ms of CPU per token at batch 1 on 2 cores, a quarter of the front end's ~3 ms
(benchmarks/results/mesh-profile-cpu-frontend.md). Instead, the gateway asks the tokenizer service once per model for
its tokenizer definition (Tokenizer.Definition: the tokenizer.json it serves) and runs the same IncrementalDetokenizer
(moemesh/tokenization/detokenizer.py) on it, fed one id at a time as the service does (services/tokenizer/stream.py):
the text is the same, character for character. The tokenizer service stays the owner of the definition; requests
still encode there (its hop in every trace), and a tokenizer that dies mid-stream no longer cuts running streams.

A tokenizer service without Definition (an older one: the fetch says None) keeps every stream of that model on
DetokenizeStream; a fetch that fails (the service restarting) leaves that request on the stream and is tried again by
the next request. No grpc here: the fetch is the adapter's (gateway/upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tokenizers import Tokenizer

from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from moemesh.tokenization.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


def check_ids(ids: list[int], vocab_size: int) -> None:
    """The tokenizer service's own check (services/tokenizer/catalog.check_ids): ValueError naming the first id
    outside the vocabulary."""
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(f"ids[{i}]: {token} is outside the vocabulary (size {vocab_size})")


class LocalDetokenizer:
    """feed(ids) -> the text each id completed, as DetokenizeStream answers (skip_special_tokens, as the gateway
    asks it)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._vocab = tokenizer.vocab_size
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)

    async def feed(self, ids: list[int]) -> list[str]:
        check_ids(ids, self._vocab)
        return [self._detok.feed(int(token)) for token in ids]

    async def finish(self) -> None:
        """Nothing to end. (The stream's held-back remainder, bytes of a character never completed, is not shown
        either way: the gateway drops the stream's last answer too.)"""

    def close(self) -> None:
        pass


Fetch = Callable[[str], Awaitable[str | None]]  # model -> tokenizer.json, None: the service has no Definition


class LocalDecoders:
    """Per model, its tokenizer built from the service's definition: fetched once, in the background."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._tokenizers: dict[str, ChatTokenizer | None] = {}  # None: the service cannot give one (use the stream)
        self._loading: dict[str, asyncio.Task] = {}

    def known(self, model: str) -> ChatTokenizer | None:
        """The model's local tokenizer if it is loaded (never waits)."""
        return self._tokenizers.get(model)

    def start(self, model: str) -> None:
        """Starts loading the model's definition unless it is loaded or loading (call it before it is needed)."""
        if model not in self._tokenizers and model not in self._loading:
            task = asyncio.get_running_loop().create_task(self._load(model), name=f"tokenizer-definition:{model}")
            self._loading[model] = task

    async def get(self, model: str) -> ChatTokenizer | None:
        """The model's local tokenizer, waiting for a load in progress; None: use the stream (for now)."""
        self.start(model)
        task = self._loading.get(model)
        if task is not None:
            await asyncio.shield(task)  # a cancelled request does not cancel the load others wait for
        return self._tokenizers.get(model)

    async def _load(self, model: str) -> None:
        try:
            definition = await self._fetch(model)
            if definition is None:
                log.info("tokenizer service has no Definition: %s streams detokenize over DetokenizeStream", model)
                self._tokenizers[model] = None
            else:  # parsing a large vocabulary takes tens of ms: not on the event loop
                self._tokenizers[model] = await asyncio.to_thread(from_definition, definition)
        except Exception as exc:  # the service is away: this request uses the stream, the next one tries again
            log.warning("tokenizer definition of %s not loaded (streams use DetokenizeStream meanwhile): %s",
                        model, exc)
        finally:
            self._loading.pop(model, None)


def from_definition(tokenizer_json: str) -> ChatTokenizer:
    """A ChatTokenizer for decoding only (no chat template, no EOS: the gateway asks those of the service)."""
    return ChatTokenizer(Tokenizer.from_str(tokenizer_json), {}, None, [])


class ChosenDetokenizer:
    """One sequence's detokenizer, chosen at its first feed: local when the model's definition is loaded by then
    (its load started with the request), else the tokenizer service's stream (`open_stream()`)."""

    def __init__(self, decoders: LocalDecoders, model: str, open_stream: Callable[[], object]) -> None:
        self._decoders, self._model, self._open_stream = decoders, model, open_stream
        self._impl = None
        decoders.start(model)

    @property
    def in_process(self) -> bool:
        """Whether this sequence is detokenized here (known after the first feed)."""
        return isinstance(self._impl, LocalDetokenizer)

    async def feed(self, ids: list[int]) -> list[str]:
        if self._impl is None:
            tokenizer = await self._decoders.get(self._model)
            self._impl = LocalDetokenizer(tokenizer) if tokenizer is not None else self._open_stream()
        return await self._impl.feed(ids)

    async def finish(self) -> None:
        if self._impl is not None:
            await self._impl.finish()

    def close(self) -> None:
        if self._impl is not None:
            self._impl.close()
