"""moemesh.v1 Chat messages <-> the gateway's plain values (requests in, choices and deltas out)."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from gateway.chat_request import ChatRequest
from gateway.choices import ToolDelta
from gateway.completion import Finish
from gateway.events import TokenInfo
from gateway.message_shapes import Message
from gateway.models import ModelDefaults
from gateway.tool_calls import Call
from moemesh.v1 import chat_pb2, common_pb2

# Set fields moemesh refuses (legacy_*: Value placeholders of earlier versions; functions/function_call: deprecated).
UNSUPPORTED = ("legacy_tools", "legacy_response_format", "functions", "legacy_logit_bias", "function_call")


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _message(m: common_pb2.ChatMessage) -> Message:
    return Message(m.role, m.content, _opt(m, "name"), parts=tuple((p.type, p.text) for p in m.content_parts),
                   tool_calls=tuple(_dict(c) for c in m.tool_calls), tool_call_id=_opt(m, "tool_call_id"))


def _sampling_fields(req) -> dict:
    """Fields chat and completion requests share."""
    return dict(
        model=req.model, max_tokens=_opt(req, "max_tokens"), temperature=_opt(req, "temperature"),
        top_p=_opt(req, "top_p"), seed=_opt(req, "seed"), stop=tuple(req.stop),
        presence_penalty=_opt(req, "presence_penalty"), frequency_penalty=_opt(req, "frequency_penalty"),
        top_k=_opt(req, "top_k"), n=_opt(req, "n"), user=req.user, include_usage=req.stream_options.include_usage,
        ignore_eos=req.ignore_eos, logit_bias=tuple(sorted(req.logit_bias.items())),
        stop_token_ids=tuple(req.stop_token_ids), repetition_penalty=_opt(req, "repetition_penalty"),
    )


def to_chat_request(req: chat_pb2.ChatCompletionRequest) -> ChatRequest:
    return ChatRequest(
        messages=tuple(_message(m) for m in req.messages), max_completion_tokens=_opt(req, "max_completion_tokens"),
        logprobs=req.logprobs, top_logprobs=_opt(req, "top_logprobs"),
        unsupported=tuple(name for name in UNSUPPORTED if req.HasField(name)),
        tools=tuple(_dict(t) for t in req.tools),
        tool_choice=json_format.MessageToDict(req.tool_choice) if req.HasField("tool_choice") else None,
        response_format=_dict(req.response_format) if req.HasField("response_format") else None,
        cache_salt=req.cache_salt, prompt_logprobs=_opt(req, "prompt_logprobs"), **_sampling_fields(req),
    )


def to_completion_request(req: chat_pb2.CompletionRequest) -> ChatRequest:
    count = _opt(req, "logprobs")
    return ChatRequest(messages=(), prompt=req.prompt, logprobs=count is not None, top_logprobs=count,
                       echo=req.echo, prompt_logprobs=_opt(req, "prompt_logprobs"), **_sampling_fields(req))


def logprobs(tokens: tuple[TokenInfo, ...]) -> chat_pb2.ChoiceLogprobs:
    def one(t: TokenInfo) -> chat_pb2.ChoiceLogprob:
        return chat_pb2.ChoiceLogprob(token=t.text, logprob=t.logprob, bytes=list(t.bytes),
                                      top_logprobs=[one(a) for a in t.top])

    return chat_pb2.ChoiceLogprobs(content=[one(t) for t in tokens])


def usage(finishes: list[Finish]) -> chat_pb2.Usage:
    """Usage of n choices: the prompt once (as OpenAI reports it), the completion tokens of all."""
    prompt = finishes[0].prompt_tokens if finishes else 0
    completion = sum(f.completion_tokens for f in finishes)
    cached = chat_pb2.PromptTokensDetails(cached_tokens=finishes[0].cached_tokens if finishes else 0)
    return chat_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                          prompt_tokens_details=cached)


def assistant(content: str, calls: list[Call]) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role="assistant", content=content, tool_calls=[
        common_pb2.ToolCall(id=c.id, type="function", function=common_pb2.FunctionCall(name=c.name,
                                                                                        arguments=c.arguments))
        for c in calls])


def delta(content: str | None, tools: list[ToolDelta], role: str | None = None) -> chat_pb2.Delta:
    out = chat_pb2.Delta(role=role, content=content)
    for t in tools:
        fragment = out.tool_calls.add(index=t.index, id=t.id, type="function" if t.id else None)
        fragment.function.CopyFrom(chat_pb2.FunctionCallDelta(name=t.name, arguments=t.arguments))
    return out


def defaults_proto(d: ModelDefaults) -> common_pb2.SamplingDefaults:
    return common_pb2.SamplingDefaults(**{k: v for k, v in vars(d).items() if v is not None})


def completion_logprobs(tokens: tuple[TokenInfo, ...], offset: int, top: bool = True) -> chat_pb2.CompletionLogprobs:
    """OpenAI's legacy shape; with echo `tokens` starts with the prompt's (whose first has logprob None: null in
    token_logprobs and top_logprobs, 0 in numeric_token_logprobs). top: fill top_logprobs ({text: logprob})."""
    out = chat_pb2.CompletionLogprobs()
    out.token_logprobs.SetInParent()
    for t in tokens:
        out.tokens.append(t.text)
        out.numeric_token_logprobs.append(t.logprob or 0.0)
        out.token_logprobs.values.add().CopyFrom(_number_or_null(t.logprob))
        out.text_offset.append(offset)
        offset += len(t.text)
        if top:
            entry = out.top_logprobs.values.add()
            if t.logprob is None:
                entry.null_value = struct_pb2.NULL_VALUE
            else:
                entry.struct_value.update({a.text: a.logprob for a in t.top})
    return out


def _number_or_null(x: float | None) -> struct_pb2.Value:
    return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE) if x is None else struct_pb2.Value(number_value=x)


def prompt_logprobs(tokens: tuple[TokenInfo, ...]) -> list[chat_pb2.PromptLogprob]:
    """The prompt_logprobs extension's entries (typed: the first token's logprob is absent)."""
    def alt(a: TokenInfo) -> chat_pb2.ChoiceLogprob:
        return chat_pb2.ChoiceLogprob(token=a.text, logprob=a.logprob, bytes=list(a.bytes))

    return [chat_pb2.PromptLogprob(token_id=t.token_id, token=t.text, logprob=t.logprob,
                                   top_logprobs=[alt(a) for a in t.top]) for t in tokens]
