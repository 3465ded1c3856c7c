"""moemesh.v1.Chat's CreateCompletion / StreamCompletion (OpenAI's legacy /v1/completions: text in, text out).

A mixin of ChatServicer: same admission (auth, validation, model defaults), same Completions pipeline with the prompt
encoded as plain text instead of a chat template, n choices as in chat.
"""

from __future__ import annotations

import time

from gateway import chat_proto
from gateway.choices import gather_choices, run_choices
from gateway.completion import Delta
from moemesh.serving.telemetry import request_scope
from moemesh.v1 import chat_pb2


def unary_only(chat) -> None:
    """Prompt scoring (echo, prompt_logprobs) is answered whole: refused on the streaming RPCs."""
    if chat.echo:
        raise ValueError("echo: not supported with stream (send stream: false)")
    if chat.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs: not supported with stream (send stream: false)")


class CompletionRpcs:
    """Needs from the servicer: _admit, _completions, _closing (see gateway/servicer.py)."""

    async def CreateCompletion(self, request, context):
        from gateway.servicer import FINGERPRINT, new_request_id

        chat, tenant, timeout = await self._admit(request, context, chat_proto.to_completion_request)
        request_id, created = new_request_id("cmpl"), int(time.time())
        with request_scope(request_id):
            got = await gather_choices(self._completions, chat, tenant, request_id, timeout)
        choices = []
        for i in range(chat.n):
            # echo: the prompt's text and tokens (choice 0 scored them for all) lead every choice's
            text, tokens = (chat.prompt + got.texts[i], got.prompt + got.tokens[i]) if chat.echo else (
                got.texts[i], got.tokens[i])
            choice = chat_pb2.CompletionChoice(index=i, text=text, finish_reason=got.finishes[i].reason)
            if chat.sampling.logprobs:
                choice.logprobs.CopyFrom(chat_proto.completion_logprobs(tokens, 0))
            if chat.prompt_logprobs is not None:
                choice.prompt_logprobs.extend(chat_proto.prompt_logprobs(got.prompt))
            choices.append(choice)
        return chat_pb2.Completion(id=request_id, object="text_completion", created=created, model=chat.model,
                                   choices=choices, usage=chat_proto.usage(got.finishes), system_fingerprint=FINGERPRINT)

    async def StreamCompletion(self, request, context):
        from gateway.servicer import FINGERPRINT, _error_chunk, new_request_id

        chat, tenant, timeout = await self._admit(request, context, chat_proto.to_completion_request)
        unary_only(chat)
        request_id, created = new_request_id("cmpl"), int(time.time())

        def chunk(**fields) -> chat_pb2.Completion:
            return chat_pb2.Completion(id=request_id, object="text_completion", created=created, model=chat.model,
                                       system_fingerprint=FINGERPRINT, **fields)

        offsets, finishes, started = [0] * chat.n, [], False
        with request_scope(request_id):
            try:
                async for i, item in self._closing.guard(run_choices(self._completions, chat, tenant, request_id,
                                                                     timeout)):
                    started = True
                    if isinstance(item, Delta):
                        choice = chat_pb2.CompletionChoice(index=i, text=item.text)
                        if item.tokens:
                            choice.logprobs.CopyFrom(chat_proto.completion_logprobs(item.tokens, offsets[i]))
                        offsets[i] += len(item.text)
                        yield chunk(choices=[choice])
                    else:
                        finishes.append(item)
                        yield chunk(choices=[chat_pb2.CompletionChoice(index=i, text="", finish_reason=item.reason)])
                if chat.include_usage:
                    yield chunk(usage=chat_proto.usage(finishes))
            except Exception as exc:
                if not started:
                    raise
                yield chunk(error=_error_chunk(exc, request_id))
