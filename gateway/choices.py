"""n choices of one request, and the shape of each choice's answer when tools are in play (no grpc, no protobuf).

n > 1 runs n independent sequences of the same prompt (each its own Generate call, request ids "<id>", "<id>-1",
...; a seeded request gets seeds seed, seed+1, ...): the prompt is prefilled n times. The KV cache is not shared
between them: the router's block manager has no copy-on-write forking yet, and on the CPU built-in model a prefill
of a chat prompt costs about one decode step, so sharing would save little.

Billing: the prompt is billed once (with choice 0; choices 1..n-1 commit 0 prompt tokens), each choice's completion
tokens on their own. That is what usage reports (prompt_tokens once, as OpenAI and vLLM report it) and what OpenAI
users are billed for n > 1: a client that reads usage to account for cost gets the bill. The router's extra prefills
still count in each choice's engine seconds (cost of goods). Prompt logprobs are scored once too (choice 0's).

ToolShaper turns one choice's text deltas into what the client sees: content deltas, or tool-call fragments.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from gateway.call_stream import CallStream, arguments_text
from gateway.completion import Delta, Finish
from gateway.structured import ToolPlan
from gateway.tool_calls import Call, call_id, parse

_DONE = object()


def _sub(chat, i: int):
    """Choice i's request: its own seed; after choice 0 neither billed for the prompt nor scoring it."""
    if i == 0:
        return chat
    seed = chat.sampling.seed
    sampling = replace(chat.sampling, seed=None if seed is None else (seed + i) % 2**64, prompt_logprobs=None)
    return replace(chat, sampling=sampling, bill_prompt=False)


@dataclass
class Gathered:
    """Every choice of a unary request, complete: texts[i], tokens[i] (Delta tokens) and finishes[i]; prompt: the
    prompt's TokenInfos when prompt logprobs were asked for (choice 0 scores them for all)."""

    texts: list[str]
    tokens: list[tuple]
    finishes: list[Finish]
    prompt: tuple = ()


async def gather_choices(completions, chat, tenant, request_id: str, timeout) -> Gathered:
    """Runs every choice to its end (unary APIs: chat and text completions share this)."""
    texts, tokens, finishes = [[] for _ in range(chat.n)], [[] for _ in range(chat.n)], [None] * chat.n
    prompt = ()
    async for i, item in run_choices(completions, chat, tenant, request_id, timeout):
        if isinstance(item, Delta):
            texts[i].append(item.text)
            tokens[i].extend(item.tokens)
            prompt = prompt or item.prompt
        else:
            finishes[i] = item
    return Gathered(["".join(t) for t in texts], [tuple(t) for t in tokens], finishes, prompt)


async def run_choices(completions, chat, tenant, request_id: str, timeout) -> AsyncIterator[tuple[int, object]]:
    """(choice index, Delta | Finish) of every choice as they come; the first failure fails the request."""
    if chat.n == 1:
        async for item in completions.run(chat, tenant, request_id, timeout):
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for item in completions.run(_sub(chat, i), tenant, request_id if i == 0 else f"{request_id}-{i}",
                                              timeout):
                await queue.put((i, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, exc))
        finally:
            await queue.put((i, _DONE))

    tasks = [asyncio.create_task(pump(i)) for i in range(chat.n)]
    try:
        done = 0
        while done < chat.n:
            i, item = await queue.get()
            if item is _DONE:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class ToolDelta:
    """A fragment of a streamed tool call (OpenAI's delta.tool_calls[] entry)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ToolShaper:
    """One choice: named and required modes stream the (constrained) arguments as they come (required: once the
    call's name is known, call_stream.py); auto holds the text back until the end (it may be a call or not), then
    sends content and/or whole calls."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held: list[str] = []
        self._named_id: str | None = None
        self._stream = CallStream()  # required mode
        self.calls: list[Call] = []

    def delta(self, item: Delta) -> tuple[str, list[ToolDelta]]:
        """(content text, tool fragments) to send for a text delta."""
        if self.plan.mode == "named":
            self._held.append(item.text)
            if self._named_id is None:
                self._named_id = call_id()
                return "", [ToolDelta(0, self._named_id, self.plan.name, item.text)]
            return "", [ToolDelta(0, arguments=item.text)] if item.text else []
        if self.plan.mode == "required":
            self._held.append(item.text)
            return "", [ToolDelta(0, i, n, a) for i, n, a in self._stream.feed(item.text)]
        if self.plan.mode == "auto":
            self._held.append(item.text)
            return "", []
        return item.text, []

    def finish(self, finish: Finish) -> tuple[str, list[ToolDelta], str]:
        """(held-back content, tool fragments, finish reason) at the choice's end."""
        text = "".join(self._held)
        if self.plan.mode == "named":
            content, calls = parse(text, self.plan)
            self.calls = [replace(c, id=self._named_id or c.id) for c in calls]
            return ("" if calls or self._named_id else content), [], finish.reason
        if self.plan.mode not in ("required", "auto"):
            return "", [], finish.reason
        content, self.calls = parse(text, self.plan)
        if self.plan.mode == "required" and self._stream.id is not None:  # the call went out in fragments
            self.calls = [replace(c, id=self._stream.id, arguments=self._stream.arguments() or c.arguments)
                          for c in self.calls]
            reason = "tool_calls" if self.calls and finish.reason == "stop" else finish.reason
            return "", [], reason  # cut by max_tokens: the client has the partial call, as OpenAI sends it
        deltas = [ToolDelta(k, c.id, c.name, c.arguments) for k, c in enumerate(self.calls)]
        return content, deltas, ("tool_calls" if self.calls and finish.reason == "stop" else finish.reason)

    def answer(self, text: str, finish: Finish) -> tuple[str, list[Call], str]:
        """Non-streaming: (content, calls, finish reason) of the whole text."""
        if self.plan.mode == "none":
            return text, [], finish.reason
        content, calls = parse(text, self.plan)
        if self.plan.mode == "required":  # the arguments' raw text, as a stream sends it
            calls = [replace(c, arguments=arguments_text(text) or c.arguments) for c in calls]
        reason = "tool_calls" if calls and self.plan.mode != "named" and finish.reason == "stop" else finish.reason
        return content, calls, reason
