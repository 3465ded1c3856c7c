"""One request as the batcher sees it: its tokens, how many of them the router has cached, and its timings.

Every sequence is fed to the router the same way, whether fresh, decoding or recomputed after a preemption:

    tokens = prompt + output            (output[-1] is the last sampled token, not yet in the KV cache)
    feed   = tokens[num_cached:]        (a prefill chunk, or the single last token when decoding)
    sample = the chunk reaches the end of `tokens`

A fresh sequence has num_cached == 0 and feeds its prompt in chunks; a decoding one has num_cached == len(tokens) - 1;
a preempted one drops to num_cached == 0 and re-feeds prompt + output (recompute), then samples where it left off.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

_serial = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued (fresh or preempted); holds no KV cache
    RUNNING = "running"  # in the batch; the router may hold KV cache for it
    FINISHED = "finished"  # done; its KV cache is released (or queued for release)


class Finish(enum.Enum):
    """Why a sequence ended (mirrors moemesh.v1.FinishReason)."""

    STOP = "stop"  # an eos token or a stop token id
    LENGTH = "length"  # max_tokens, or the context window / KV cache cannot hold another token
    CANCELLED = "cancelled"  # the client cancelled or disconnected
    DEADLINE = "deadline"  # the deadline passed (queued or running)
    ERROR = "error"  # the router failed the step


@dataclass(eq=False)
class Sequence:
    """A request plus its scheduling state. Times are in seconds of the scheduler's injected clock."""

    seq_id: str
    prompt_ids: list[int]
    max_tokens: int  # 0: until the context window is full
    tenant: str = ""
    priority: int = 0  # higher runs first within the tenant and is preempted last
    weight: float = 1.0  # the tenant's share in weighted fair queuing
    deadline: float | None = None  # clock time after which the request is useless
    stop_ids: frozenset[int] = frozenset()  # stop token ids (eos ids are added unless ignore_eos)
    ignore_eos: bool = False
    sampling: Any = None  # passed to the router untouched; the scheduler never reads it
    trace: Any = None  # the request's tracing context (the router client parents step spans to it)
    cache_salt: str = ""  # the client's prefix-cache salt within its tenant
    arrival: float = 0.0

    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens of this sequence in the router's KV cache
    preemptions: int = 0
    first_scheduled: float | None = None  # first time it took part in a step
    engine_seconds: float = 0.0  # its share of router compute time
    cached_tokens: int = 0  # prompt tokens the router served from its prefix cache (first computation)
    cache_streak: bool = False  # its last prefill chunk came wholly from the prefix cache
    finish: Finish | None = None
    prompt_scores: list | None = None  # prompt logprobs gathered over prefill chunks (SequenceResult.prompt_logprobs)
    prompt_scores_sent: bool = False  # delivered with the first token: a recompute's repeats are dropped
    serial: int = field(default_factory=lambda: next(_serial))  # tie-break: earlier submissions first

    def __post_init__(self) -> None:
        if self.weight <= 0:
            self.weight = 1.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def window(self, start: int, n: int) -> list[int]:
        """tokens[start : start + n] without copying the whole sequence (decodes of long sequences stay cheap)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : start - p + n]
        if start + n <= p:
            return self.prompt_ids[start : start + n]
        return self.prompt_ids[start:] + self.output_ids[: start + n - p]

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next sample (1 when decoding)."""
        return self.length - self.num_cached

    @property
    def rank(self) -> tuple[int, float, int]:
        """Service order: higher priority first, then older first. The largest rank is the preemption victim."""
        return (-self.priority, self.arrival, self.serial)

    def stop_reason(self, token: int, eos: frozenset[int], max_context: int) -> Finish | None:
        """Why the sequence ends after sampling `token` (already appended to output_ids), or None to go on."""
        if token in self.stop_ids or (not self.ignore_eos and token in eos):
            return Finish.STOP
        if self.max_tokens and len(self.output_ids) >= self.max_tokens:
            return Finish.LENGTH
        if self.length >= max_context:  # the next token would not fit the context window
            return Finish.LENGTH
        return None

    def add_prompt_scores(self, position: int, entries: list) -> None:
        """Prompt logprobs of a chunk fed at `position` (a recompute from 0 before delivery starts over)."""
        if self.prompt_scores_sent or not entries:
            return
        if position == 0 or self.prompt_scores is None:
            self.prompt_scores = []
        self.prompt_scores.extend(entries)

    def take_prompt_scores(self) -> list:
        """The whole prompt's logprobs, once (for the first token's event)."""
        scores, self.prompt_scores = self.prompt_scores or [], None
        self.prompt_scores_sent = self.prompt_scores_sent or bool(scores)
        return scores

    def queue_seconds(self, now: float) -> float:
        start = self.first_scheduled if self.first_scheduled is not None else now
        return max(0.0, start - self.arrival)
