"""Offline batched generation over the step engine (eval, benchmarks, the chat CLI fallback).

Each engine step carries, for every running sequence, either its next prefill chunk (the whole prompt when
`prefill_chunk` is None) or its last sampled token; so all prompts prefill together in the first step(s) and then
all running sequences decode together, a finished sequence leaving the batch (and the KV cache) at once. Sampling
(penalties, seeds, logprobs) happens inside `engine.step`; stopping happens here with a StopChecker per sequence.

Context limit: prompt plus completion never exceed `engine.info.max_context` tokens; reaching it finishes the
sequence with "length". A prompt must leave room for at least one generated token.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from moemesh.runtime.sampling import validate, wants_logprobs
from moemesh.runtime.stopping import StopChecker
from moemesh.runtime.types import EngineInfo, SamplingParams, SequenceResult, SequenceWork

Decode = Callable[[list[int]], str]


class StepEngine(Protocol):
    """What generate needs of runtime.engine.Engine."""

    info: EngineInfo

    def step(self, work: list[SequenceWork]) -> list[SequenceResult]: ...

    def release(self, seq_ids: list[str]) -> object: ...


@dataclass
class Completion:
    """One prompt's result. token_ids include a terminating stop/eos token; text excludes it and any stop string."""

    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # None when generate() had no decode function
    prompt_tokens: int = 0
    logprobs: list[float] | None = None  # per token of token_ids, when params asked for logprobs
    top_logprobs: list[list[tuple[int, float]]] | None = None


class IncrementalText:
    """Text deltas from a decode(ids) -> str function without re-decoding everything each token.

    Decodes a window from `prefix` (a few tokens back, so tokenizers that drop a leading space see context) and waits
    while the text ends in U+FFFD (an incomplete UTF-8 sequence of byte-level tokens), as vLLM and TGI do.
    """

    CONTEXT = 5  # prompt tokens decoded before the completion

    def __init__(self, decode: Decode, prompt: list[int]):
        self.decode = decode
        self.ids = list(prompt)
        self.prefix = max(0, len(prompt) - self.CONTEXT)
        self.read = len(prompt)

    def push(self, token_id: int, final: bool = False) -> str:
        """Add one token; returns the new text (possibly "" while a character is incomplete, unless final)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


@dataclass
class _Running:
    """One sequence in flight."""

    seq_id: str
    index: int  # position in the caller's prompt list
    prompt: list[int]
    params: SamplingParams
    checker: StopChecker
    text: IncrementalText | None
    position: int = 0  # tokens already in the KV cache
    completion: Completion = field(default_factory=lambda: Completion(token_ids=[], finish_reason=""))

    def __post_init__(self) -> None:
        self.completion.prompt_tokens = len(self.prompt)
        if wants_logprobs(self.params):
            self.completion.logprobs, self.completion.top_logprobs = [], []

    def work(self, prefill_chunk: int | None) -> SequenceWork:
        """This sequence's next step: the next prompt chunk, or its last sampled token."""
        if self.position < len(self.prompt):
            end = len(self.prompt) if prefill_chunk is None else min(len(self.prompt), self.position + prefill_chunk)
            chunk = self.prompt[self.position : end]
            return SequenceWork(self.seq_id, chunk, self.position, self.params, sample=end == len(self.prompt))
        return SequenceWork(self.seq_id, [self.completion.token_ids[-1]], self.position, self.params)

    def accept(self, result: SequenceResult, max_context: int) -> bool:
        """Record a sampled token; True when the sequence finished with it."""
        tok = result.token_id
        out = self.completion
        out.token_ids.append(tok)
        if out.logprobs is not None:
            out.logprobs.append(result.logprob)
            out.top_logprobs.append(list(result.top_logprobs))
        context_full = len(self.prompt) + len(out.token_ids) >= max_context
        last = context_full or len(out.token_ids) >= self.params.max_tokens
        delta = ""
        if self.text is not None and not self.checker.is_stop_token(tok):
            delta = self.text.push(tok, final=last)
        decision = self.checker.step(tok, delta)
        if not decision.finished and context_full:
            decision = self.checker.finish("length")
        if not decision.finished:
            return False
        out.finish_reason = decision.finish_reason
        out.text = self.checker.text if self.text is not None else None
        return True


def generate(
    engine: StepEngine,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    *,
    decode: Decode | None = None,
    prefill_chunk: int | None = None,
    max_running: int | None = None,
) -> list[Completion]:
    """Generate a completion for every prompt (token ids); results in prompt order.

    decode: ids -> text, needed for stop strings and for Completion.text. prefill_chunk: at most this many prompt
    tokens per sequence per step. max_running: at most this many sequences in the engine at once (others wait).
    """
    info = engine.info
    plist = _params_list(prompts, params, decode, info.max_context)
    for name, value in (("prefill_chunk", prefill_chunk), ("max_running", max_running)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    eos = info.eos_token_ids
    run_id = uuid.uuid4().hex[:8]
    waiting = [
        _Running(f"gen-{run_id}-{i}", i, list(p), sp, StopChecker(sp, eos), decode and IncrementalText(decode, p))
        for i, (p, sp) in enumerate(zip(prompts, plist))
    ]
    waiting.reverse()  # pop() admits in prompt order
    running: list[_Running] = []
    done: dict[int, Completion] = {}
    try:
        while waiting or running:
            while waiting and (max_running is None or len(running) < max_running):
                running.append(waiting.pop())
            works = [seq.work(prefill_chunk) for seq in running]
            finished = _advance(running, works, engine.step(works), info.max_context)
            if finished:
                engine.release([seq.seq_id for seq in finished])
                for seq in finished:
                    done[seq.index] = seq.completion
                running = [seq for seq in running if not seq.checker.finished]
    except BaseException:
        # Free what this call holds; a release failure must not hide the original error.
        with contextlib.suppress(Exception):
            engine.release([seq.seq_id for seq in running])
        raise
    return [done[i] for i in range(len(prompts))]


def _params_list(
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    decode: Decode | None,
    max_context: int,
) -> list[SamplingParams]:
    """One validated SamplingParams per prompt; prompts checked against the context window."""
    plist = list(itertools.repeat(params, len(prompts))) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise ValueError(f"params has {len(plist)} entries for {len(prompts)} prompts")
    for i, (prompt, sp) in enumerate(zip(prompts, plist)):
        validate(sp)
        if not 0 < len(prompt) < max_context:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens; it needs 1 to {max_context - 1} (max_context)")
        if sp.stop and decode is None:
            raise ValueError(f"params[{i}].stop {sp.stop!r} needs a decode function to match text")
    return plist


def _advance(
    running: list[_Running], works: list[SequenceWork], results: list[SequenceResult], max_context: int
) -> list[_Running]:
    """Apply one step's results; returns the sequences that finished in it."""
    by_id = {r.seq_id: r for r in results}
    finished = []
    for seq, work in zip(running, works):
        seq.position += len(work.token_ids)
        if not work.sample:
            continue
        result = by_id.get(seq.seq_id)
        if result is None or result.token_id is None:
            raise RuntimeError(f"engine.step returned no token for sequence {seq.seq_id}")
        if seq.accept(result, max_context):
            finished.append(seq)
    return finished
