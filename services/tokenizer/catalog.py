"""The tokenizers this process serves, by model id (the name or path as configured). Loaded once at start: a request
can only name a configured model, never make the service load a path it chose."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from moemesh.tokenization.chat_tokenizer import ChatTokenizer

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """A request named a model this service does not serve (NOT_FOUND)."""


class TokenizerCatalog:
    def __init__(self, tokenizers: dict[str, ChatTokenizer]) -> None:
        if not tokenizers:
            raise ValueError("a tokenizer catalog needs at least one model")
        self._tokenizers = dict(tokenizers)

    @classmethod
    def load(cls, models: Iterable[str], resolve: Callable[[str], Path] | None = None) -> TokenizerCatalog:
        """Resolves each model (registry: built-in name, checkpoint dir or HF repo id) and loads its tokenizer."""
        if resolve is None:
            from moemesh.models.registry import resolve_model as resolve
        tokenizers = {}
        for model in models:
            path = resolve(model)
            tokenizers[model] = ChatTokenizer.load(path)
            log.info("tokenizer for %r loaded from %s (vocab %d)", model, path, tokenizers[model].vocab_size)
        return cls(tokenizers)

    @property
    def models(self) -> list[str]:
        return sorted(self._tokenizers)

    def get(self, model: str) -> ChatTokenizer:
        """The model's tokenizer; an empty model means the only one when exactly one is served."""
        if not model and len(self._tokenizers) == 1:
            return next(iter(self._tokenizers.values()))
        try:
            return self._tokenizers[model]
        except KeyError:
            raise UnknownModelError(f"model: {model!r} is not served here (served: {', '.join(self.models)})") from None


def check_ids(tokenizer: ChatTokenizer, ids: Iterable[int], field: str = "ids") -> list[int]:
    """The ids as a list; ValueError naming the first one outside the vocabulary."""
    out = list(ids)
    vocab = tokenizer.vocab_size
    for i, token in enumerate(out):
        if not 0 <= token < vocab:
            raise ValueError(f"{field}[{i}]: {token} is outside the vocabulary (size {vocab})")
    return out
