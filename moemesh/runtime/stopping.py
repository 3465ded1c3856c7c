"""When one sequence stops, and which part of its text may be shown now (pure Python).

Feed `StopChecker.step(token_id, text_delta)` once per generated token, with the text that token added (from an
incremental detokenizer). The checker stops on, in this order of precedence:
  1. a stop token: `stop_token_ids`, plus the model's end-of-sequence ids unless `ignore_eos` -> reason "stop"; the
     stop token's own text is never emitted (its id still belongs to the completion's token ids);
  2. a stop string anywhere in the text, also one straddling several tokens -> reason "stop"; the text is cut before
     the stop string that completes first (ending earliest; on a tie the longest) and it is never emitted;
  3. `max_tokens` generated -> reason "length".
While running it holds back the longest tail of the text that is a proper prefix of some stop string, so a streamed
delta never shows part of a stop string; the held tail is released as soon as it can no longer start one, or when
the sequence finishes for another reason.

Invariant: the held-back buffer never contains a whole stop string, and any stop string that ends in new text must
start inside the buffer (otherwise an emitted suffix would have been a prefix of it, and would have been held).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from moemesh.runtime.types import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StopDecision:
    """Result of one step: `text` may be emitted now; `finish_reason` is None while the sequence continues."""

    text: str
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Stop conditions of one sequence; `text` is everything emitted so far."""

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int] = ()):
        self.max_tokens = params.max_tokens
        self.stop_strings = tuple(s for s in params.stop if s)
        eos = () if params.ignore_eos else tuple(eos_token_ids)
        self.stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._held = ""  # tail not yet emitted: could be the start of a stop string
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def is_stop_token(self, token_id: int) -> bool:
        """True when this token ends the sequence (its text need not even be decoded)."""
        return token_id in self.stop_ids

    def step(self, token_id: int, text_delta: str = "") -> StopDecision:
        """Account one generated token and the text it added; returns what to emit and whether to stop."""
        if self.finished:
            raise RuntimeError(f"step after the sequence finished ({self.finish_reason})")
        self.num_tokens += 1
        if self.is_stop_token(token_id):
            return self.finish("stop")
        buffer = self._held + text_delta
        cut = self._earliest_stop(buffer)
        if cut is not None:
            self._held = buffer[:cut]
            return self.finish("stop")
        if self.num_tokens >= self.max_tokens:
            self._held = buffer
            return self.finish("length")
        hold = self._prefix_tail_len(buffer)
        emit, self._held = buffer[: len(buffer) - hold], buffer[len(buffer) - hold :]
        self._emitted.append(emit)
        return StopDecision(text=emit)

    def finish(self, reason: FinishReason) -> StopDecision:
        """Stop now (also for outside reasons, e.g. a full context window): flushes the held-back text."""
        emit, self._held = self._held, ""
        self._emitted.append(emit)
        self.finish_reason = reason
        return StopDecision(text=emit, finish_reason=reason)

    def _earliest_stop(self, buffer: str) -> int | None:
        """Start of the stop string that completes first in buffer (earliest end; on a tie the longest), or None.

        Ordering by end makes the result independent of how the text was split into deltas: it is where a
        character-by-character stream would have stopped."""
        found = [(i + len(s), i) for s in self.stop_strings if (i := buffer.find(s)) >= 0]
        return min(found)[1] if found else None

    def _prefix_tail_len(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:n]):
                    best = n
                    break
        return best
