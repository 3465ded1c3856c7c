"""What a benchmark sends: LoadSpec (validated; errors name the flag), synthetic prompts and Poisson arrivals.

Prompts are random common English words, each one token in the usual BPE vocabularies, so that a prompt of N
words is about N tokens (the server's usage reports the exact count, template included). Every request gets a
different prompt (a prefix cache cannot make later requests cheaper) and the same seed gives the same prompts, so a
mesh run and an in-process run see the same text.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

WORDS = (
    "the of and to in is that for it as with was on be by at this from or an are not have but they one all "
    "which you were there their can more when so what about would time some only other if into could has then "
    "them two first see may its over now after way most these new many well also people should very where just "
    "good much work year back any long great day man old little use state world how through life down while part "
    "same place made under right still each between city water since never small found house last home"
).split()


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int = 1  # most requests in flight at once
    requests: int | None = 16  # stop after this many (None: only duration_s bounds the run)
    duration_s: float | None = None  # stop sending new requests after this many seconds
    rate: float | None = None  # Poisson arrivals per second; None: closed loop (a new request as one finishes)
    prompt_tokens: int = 128  # about this many words (~tokens) of synthetic prompt
    max_tokens: int = 64
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, "--concurrency", self.concurrency, "an integer >= 1")
        _check(self.requests is None or self.requests >= 1, "--requests", self.requests, "an integer >= 1")
        _check(self.duration_s is None or (math.isfinite(self.duration_s) and self.duration_s > 0), "--duration",
               self.duration_s, "a number of seconds > 0")
        _check(self.requests is not None or self.duration_s is not None, "--requests", self.requests,
               "given (or --duration): the run needs an end")
        _check(self.rate is None or (math.isfinite(self.rate) and self.rate > 0), "--rate", self.rate,
               "requests per second > 0 (leave it out for a closed loop)")
        _check(self.prompt_tokens >= 1, "--prompt-tokens", self.prompt_tokens, "an integer >= 1")
        _check(self.max_tokens >= 1, "--max-tokens", self.max_tokens, "an integer >= 1")
        _check(math.isfinite(self.temperature) and 0 <= self.temperature <= 2, "--temperature", self.temperature,
               "in [0, 2]")

    def more(self, sent: int, elapsed_s: float) -> bool:
        """Whether request number `sent` (0-based) may still be sent `elapsed_s` after the start."""
        if self.requests is not None and sent >= self.requests:
            return False
        return self.duration_s is None or elapsed_s < self.duration_s


def _check(ok: bool, flag: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{flag}: {value!r} must be {expected}")


def synthetic_prompt(index: int, words: int, seed: int = 0) -> str:
    """Request `index`'s prompt: `words` random common words (deterministic in seed and index)."""
    rng = random.Random(seed * 1_000_003 + index)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def poisson_offsets(rate: float, seed: int = 0) -> Iterator[float]:
    """Arrival times (seconds after the start) of a Poisson process of `rate` per second; the first at 0."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)
