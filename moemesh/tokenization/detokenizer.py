"""Streaming detokenization: text deltas that never split a UTF-8 character.

A byte-level BPE token can be part of a character (an emoji is often 2-3 tokens); decoding it alone yields U+FFFD.
The detokenizer decodes a short window: `prefix` (already emitted tokens kept for context, since some decoders,
e.g. SentencePiece's, change a token's text at the start of a decode) and the unread tokens; it emits the new text
only when it does not end in U+FFFD, i.e. holds back the bytes of an incomplete character. flush() emits the rest.
Invariant: "".join(all deltas) + flush() == tokenizer.decode(all ids) (windows start on character boundaries).
"""

from __future__ import annotations

from collections.abc import Iterable

from moemesh.tokenization.chat_tokenizer import ChatTokenizer, TokenPiece

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids, get text deltas. One instance per sequence; not thread-safe."""

    def __init__(self, tokenizer: ChatTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (already emitted, kept as context)
        self._read = 0  # tokens before this index are emitted
        self.text = ""  # everything emitted so far

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Add ids; return the new complete text (possibly "")."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self._ids.extend(ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def feed_with_pieces(self, token_ids: int | Iterable[int]) -> tuple[str, list[TokenPiece]]:
        """feed() plus each new token alone (text + bytes), for logprobs."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self.feed(ids), [self._tokenizer.token_piece(i) for i in ids]

    def flush(self) -> str:
        """The held-back remainder at the end of the stream (U+FFFD for bytes of a never-completed character)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""
