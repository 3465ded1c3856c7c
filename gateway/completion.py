"""One chat completion through the mesh, as a stream of text deltas and a finish (no grpc, no protobuf here).

    encode chat (tokenizer) -> reserve quota (metering) -> Generate stream (batcher)
        -> per event: detokenize (tokenizer stream) -> StopChecker (eos, stop strings, max_tokens) -> Delta
    -> Finish; always, in the background: commit usage (metering)

The gateway owns the text: stop strings are matched here on the detokenized stream (never split across deltas);
when the text stops before the batcher does, the batcher is told to cancel and its last event (engine time) is
still collected for the bill. If the caller goes away, the upstream calls are cancelled and the commit still runs.

Billing through faults: a request the batcher refuses before it runs (prompt beyond the context window, queue full,
router down before the first token) is committed at 0 tokens with finish_reason "rejected", which releases its hold
at once and bills nothing; a request cut after tokens were delivered is billed for the prompt and the tokens the
client got (the commit is retried while metering restarts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.chat_request import ValidatedChat
from gateway.models import ModelDefaults
from gateway.events import (
    FINISH_CANCELLED, FINISH_DEADLINE, FINISH_ERROR, GenerateParams, Tenant, TokenEvent, TokenInfo, UsageRecord,
)
from moemesh.runtime.stopping import StopChecker
from moemesh.errors import ErrorStatus, ServiceError

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    async def encode_chat(self, model: str, messages: list[dict], tools_json: str = "") -> list[int]: ...
    async def encode_text(self, model: str, text: str) -> list[int]: ...
    async def sampling_defaults(self, model: str) -> dict[str, float]: ...
    async def eos_token_ids(self, model: str) -> tuple[int, ...]: ...
    async def pieces(self, model: str, ids: list[int]) -> list[tuple[str, bytes]]: ...
    def detokenizer(self, model: str): ...  # feed(ids) -> per-id texts (async), close()


class Batcher(Protocol):
    def generate(self, params: GenerateParams, timeout_s: float | None): ...  # events(), stop_early(), cancel()


class Metering(Protocol):
    async def reserve(self, request_id: str, tenant: str, model: str, prompt_tokens: int, max_tokens: int): ...
    async def commit(self, usage: UsageRecord) -> None: ...


@dataclass(frozen=True)
class Delta:
    """New text (never part of a stop string), and the tokens behind it when logprobs were asked for."""

    text: str
    tokens: tuple[TokenInfo, ...] = ()
    prompt: tuple[TokenInfo, ...] = ()  # sampling.prompt_logprobs: every prompt token (the first's logprob None)


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, served from the prefix cache


class EngineFailure(ServiceError):
    status = ErrorStatus.INTERNAL


class EngineLost(ServiceError):
    """The engine failed mid-generation: in practice a mesh service (router, expert shard) went away. Retrying is
    the right reaction, hence UNAVAILABLE and not INTERNAL."""

    status = ErrorStatus.UNAVAILABLE


FINISH_REJECTED = "rejected"  # the ledger's finish_reason of a request refused before it ran (0 tokens, $0)


@dataclass
class _Outcome:
    """What the bill needs; updated as the stream goes."""

    prompt_tokens: int
    finish_reason: str = FINISH_CANCELLED  # until something better is known
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    cached_tokens: int = 0
    admitted: bool = False  # the batcher sent an event: the request ran (else it is billed nothing)

    def billed(self) -> tuple[int, int, str]:
        """(prompt tokens, completion tokens, finish reason) to commit."""
        if not self.admitted:
            return 0, 0, FINISH_REJECTED
        return self.prompt_tokens, self.completion_tokens, self.finish_reason


class Completions:
    def __init__(self, tokenizer: Tokenizer, batcher: Batcher, metering: Metering) -> None:
        self._tokenizer, self._batcher, self._metering = tokenizer, batcher, metering
        self._eos: dict[str, tuple[int, ...]] = {}
        self._defaults: dict[str, ModelDefaults] = {}
        self._background: set[asyncio.Task] = set()

    async def run(self, chat: ValidatedChat, tenant: Tenant, request_id: str,
                  timeout_s: float | None) -> AsyncIterator[Delta | Finish]:
        start = time.monotonic()
        prompt_ids = await self._prompt_ids(chat)
        eos = await self._eos_ids(chat.model)
        billed_prompt = len(prompt_ids) if chat.bill_prompt else 0
        await self._metering.reserve(request_id, tenant.name, chat.model, billed_prompt, chat.sampling.max_tokens)
        outcome = _Outcome(prompt_tokens=len(prompt_ids))
        deadline_ms = int((time.time() + timeout_s) * 1000) if timeout_s else 0
        params = GenerateParams(request_id, tenant.name, chat.model, tuple(prompt_ids), chat.sampling,
                                deadline_ms, tenant.priority, tenant.weight, chat.cache_salt)
        params = replace(params, sampling=replace(chat.sampling, prompt_tokens=len(prompt_ids)))
        generation = self._batcher.generate(params, timeout_s)
        detok = self._tokenizer.detokenizer(chat.model)
        checker = StopChecker(replace(chat.sampling, stop=chat.stop), eos)
        try:
            async for item in self._stream(chat, generation, detok, checker, outcome, prompt_ids):
                if isinstance(item, Finish):
                    await detok.finish()
                    item = replace(item, reason="length", completion_tokens=0) if chat.score_only else item
                elif chat.score_only and not item.prompt:
                    continue  # the one token generated to score the prompt is not part of the answer
                yield item
        except Exception:
            outcome.finish_reason = FINISH_ERROR
            raise
        finally:
            generation.cancel()
            detok.close()
            prompt_tokens, completion_tokens, finish_reason = outcome.billed()
            prompt_tokens = prompt_tokens if chat.bill_prompt else 0  # billed with choice 0 (see choices.py)
            completion_tokens = 0 if chat.score_only else completion_tokens
            self._commit_later(UsageRecord(
                request_id=request_id, tenant=tenant.name, key_id=tenant.key_id, model=chat.model,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                latency_seconds=time.monotonic() - start, finish_reason=finish_reason,
                engine_seconds=outcome.engine_seconds, user=chat.user,
                cached_tokens=min(outcome.cached_tokens, prompt_tokens),
            ))

    async def _stream(self, chat, generation, detok, checker: StopChecker, outcome: _Outcome,
                      prompt_ids: list[int]) -> AsyncIterator[Delta | Finish]:
        async for event in generation.events():
            outcome.admitted = True
            _account(outcome, event)
            if event.prompt_logprobs:
                yield Delta("", prompt=await self._prompt_infos(chat.model, prompt_ids, event.prompt_logprobs))
            delta = await self._consume(chat, event, detok, checker)
            outcome.completion_tokens = checker.num_tokens
            if delta.text or delta.tokens:
                yield delta
            if not checker.finished and event.finish_reason:
                tail = _finish_for_batcher(checker, event.finish_reason)
                if tail:
                    yield Delta(tail)
            if checker.finished:
                if not event.finish_reason:  # our stop string or max_tokens came first
                    last = await generation.stop_early()
                    if last is not None:
                        outcome.engine_seconds = last.engine_seconds
                outcome.finish_reason = checker.finish_reason
                yield Finish(checker.finish_reason, outcome.prompt_tokens, checker.num_tokens, outcome.cached_tokens)
                return
        raise EngineFailure("batcher: the Generate stream ended without a finish reason")

    async def _consume(self, chat: ValidatedChat, event: TokenEvent, detok, checker: StopChecker) -> Delta:
        """Steps the checker over the event's tokens; returns the text that may be shown now."""
        ids = list(event.token_ids)
        if not ids or checker.finished:
            return Delta("")
        texts = await detok.feed(ids)
        emitted: list[str] = []
        used = 0
        for token_id, text in zip(ids, texts):
            decision = checker.step(token_id, text)
            emitted.append(decision.text)
            used += 1
            if decision.finished:
                break
        tokens = await self._token_infos(chat, event, used) if chat.sampling.logprobs else ()
        return Delta("".join(emitted), tokens)

    async def _token_infos(self, chat: ValidatedChat, event: TokenEvent, used: int) -> tuple[TokenInfo, ...]:
        ids = list(event.token_ids[:used])
        alts = [list(event.top_logprobs[i]) if i < len(event.top_logprobs) else [] for i in range(used)]
        wanted = ids + [a for per in alts for a, _ in per]
        pieces = dict(zip(wanted, await self._tokenizer.pieces(chat.model, wanted))) if wanted else {}
        out = []
        for i, token_id in enumerate(ids):
            top = tuple(TokenInfo(a, pieces[a][0], pieces[a][1], lp) for a, lp in alts[i])
            logprob = event.logprobs[i] if i < len(event.logprobs) else 0.0
            out.append(TokenInfo(token_id, pieces[token_id][0], pieces[token_id][1], logprob, top))
        return tuple(out)

    async def _prompt_infos(self, model: str, prompt_ids: list[int], scores) -> tuple[TokenInfo, ...]:
        """TokenEvent.prompt_logprobs -> TokenInfo per prompt token (texts of tokens and alternatives)."""
        wanted = list(dict.fromkeys(prompt_ids + [t for _, top in scores for t, _ in top]))
        pieces = dict(zip(wanted, await self._tokenizer.pieces(model, wanted)))
        return tuple(TokenInfo(token_id, *pieces[token_id], logprob,
                               tuple(TokenInfo(t, *pieces[t], lp) for t, lp in top))
                     for token_id, (logprob, top) in zip(prompt_ids, scores))

    async def _prompt_ids(self, chat: ValidatedChat) -> list[int]:
        if chat.prompt is not None:
            return await self._tokenizer.encode_text(chat.model, chat.prompt)
        tools = json.dumps(list(chat.tools.tools)) if chat.tools.tools else ""
        return await self._tokenizer.encode_chat(chat.model, chat.messages, tools)

    async def defaults(self, model: str) -> ModelDefaults:
        """The model's generation_config sampling defaults (asked of the tokenizer once, then cached)."""
        if model not in self._defaults:
            self._defaults[model] = ModelDefaults(**await self._tokenizer.sampling_defaults(model))
        return self._defaults[model]

    async def _eos_ids(self, model: str) -> tuple[int, ...]:
        if model not in self._eos:
            self._eos[model] = await self._tokenizer.eos_token_ids(model)
        return self._eos[model]

    def _commit_later(self, usage: UsageRecord) -> None:
        """Commits on its own task: it must survive the cancellation of the request's task."""
        task = asyncio.get_running_loop().create_task(self._commit(usage), name=f"commit:{usage.request_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit(self, usage: UsageRecord) -> None:
        try:
            await self._metering.commit(usage)
        except Exception as exc:  # the answer was already given; the reservation expires and is refunded
            log.warning("commit of %s failed: %s", usage.request_id, exc)

    async def committed(self, request_id: str, timeout: float) -> None:
        """Waits (at most `timeout` s) for this gateway's commit of `request_id` if it is still pending."""
        pending = [t for t in self._background if t.get_name() == f"commit:{request_id}"]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def drain(self) -> None:
        """Waits for pending commits (at shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)


def _account(outcome: _Outcome, event: TokenEvent) -> None:
    if event.prompt_tokens:
        outcome.prompt_tokens = event.prompt_tokens
    outcome.cached_tokens = max(outcome.cached_tokens, event.cached_tokens)
    if event.finish_reason:
        outcome.engine_seconds = event.engine_seconds


def _finish_for_batcher(checker: StopChecker, reason: str) -> str:
    """The batcher ended the sequence before our checker did: finish it the same way (returns held-back text)."""
    if reason == FINISH_DEADLINE:
        raise TimeoutError("deadline: the request did not finish in time")
    if reason == FINISH_ERROR:
        raise EngineLost("the engine failed while generating this request (a mesh service went away: router or "
                         "expert shard); the tokens delivered so far are billed; retry the request")
    return checker.finish(reason).text  # "stop", "length" or "cancelled"
