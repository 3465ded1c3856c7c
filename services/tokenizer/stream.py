"""Incremental detokenization of one generated sequence, one text piece per id (the DetokenizeStream contract)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from moemesh.tokenization.detokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class Piece:
    """Text completed by a batch of ids: `text` == "".join(token_texts); one token_text per id."""

    text: str
    token_texts: tuple[str, ...]


class DetokenizeSession:
    """Wraps IncrementalDetokenizer: feeds ids one at a time so each id gets the text it completed (an id in the
    middle of a UTF-8 character completes ""; the id finishing it gets the whole character)."""

    def __init__(self, tokenizer: ChatTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)

    def feed(self, ids: Iterable[int]) -> Piece:
        texts = tuple(self._detok.feed(int(token)) for token in ids)
        return Piece("".join(texts), texts)

    def finish(self) -> str:
        """The held-back bytes of an unfinished character at the end of the stream (U+FFFD), usually ""."""
        return self._detok.flush()
