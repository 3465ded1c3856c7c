"""Hostile gRPC calls for the edge (hypothesis strategies): garbage bytes for the request message, requests with one
hostile value, and hostile metadata. Judged by hostile_run.py like the HTTP cases of hostile_cases.py."""

from __future__ import annotations

import math

from google.protobuf import struct_pb2
from hypothesis import strategies as st

from hostile_cases import CONTEXT_WINDOW, MAX_N, GrpcCase, Victim
from moemesh.v1 import chat_pb2, common_pb2

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


def valid_request(served: str, **fields) -> chat_pb2.ChatCompletionRequest:
    """A valid request for the served model, with `fields` replaced."""
    request = chat_pb2.ChatCompletionRequest(model=served, max_tokens=1,
                                             messages=[common_pb2.ChatMessage(role="user", content="hi")])
    for name, value in fields.items():
        if name == "messages":
            del request.messages[:]
            request.messages.extend(value)
        elif name == "stop":
            request.stop.extend(value)
        elif isinstance(value, struct_pb2.Value):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


@st.composite
def garbage(draw, model: str, auth) -> GrpcCase:
    data = draw(st.one_of(st.binary(min_size=1, max_size=300),
                          st.binary(max_size=40).map(lambda b: valid_request(model).SerializeToString()[:5] + b)))
    return GrpcCase("grpc_garbage", data, auth, stream=draw(st.booleans()))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def _field(draw) -> bytes:
    """One protobuf wire-format field with a hostile twist: a declared field number with the wrong wire type, a
    length beyond the buffer, a truncated varint, a group that never ends, a huge field number."""
    number = draw(st.one_of(st.integers(1, 40), st.integers(2**28, 2**29 - 1)))
    wire = draw(st.integers(0, 7))  # 6 and 7 do not exist
    tag = _varint(number << 3 | wire)
    payload = draw(st.one_of(
        st.binary(max_size=20),
        st.integers(0, 2**64 - 1).map(_varint),
        st.integers(0, 2**32).map(lambda n: _varint(n) + b"x"),  # a length that lies
        st.just(b"\xff" * 11),  # a varint longer than 10 bytes
    ))
    return tag + payload


@st.composite
def malformed_protobuf(draw, model: str, auth) -> GrpcCase:
    """Wire-format abuse on a valid prefix: wrong types, lying lengths, unterminated or deeply nested groups."""
    prefix = valid_request(model).SerializeToString()[: draw(st.integers(0, 12))]
    body = b"".join(draw(st.lists(_field(), min_size=1, max_size=8)))
    if draw(st.booleans()):
        body += _varint(99 << 3 | 3) * draw(st.integers(1, 2000))  # start-group x N: recursion depth
    return GrpcCase("grpc_malformed_protobuf", prefix + body, auth, stream=draw(st.booleans()), reject=False)


@st.composite
def cross_tenant(draw, auth, victim: Victim) -> GrpcCase:
    """The attacker's key aimed at the victim's request (feedback) or usage: PERMISSION_DENIED, nothing leaks."""
    if draw(st.booleans()):
        request = chat_pb2.SubmitFeedbackRequest(request_id=victim.request_id, rating=draw(st.integers(1, 5)),
                                                 comment=draw(_text))
        return GrpcCase("grpc_cross_tenant", request.SerializeToString(), auth, method="SubmitFeedback",
                        names=("tenant", "request"))
    request = chat_pb2.UsageQuery(tenant=victim.tenant, since_unix=draw(st.integers(0, 2**32 - 1)))
    return GrpcCase("grpc_cross_tenant", request.SerializeToString(), auth, method="GetUsage", names=("tenant",))


def _message(role: str = "user", content: str = "hi") -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content=content)


@st.composite
def bad_value(draw, model: str, auth) -> GrpcCase:
    f = st.floats
    name, value, names = draw(st.one_of(
        st.tuples(st.just("max_tokens"), st.one_of(st.integers(-2**31, 0), st.integers(CONTEXT_WINDOW, 2**31 - 1)),
                  st.just(("max_tokens",))),
        st.tuples(st.just("temperature"), st.one_of(st.just(math.nan), st.just(math.inf), f(max_value=-1e-9),
                                                    f(min_value=2.0001)), st.just(("temperature",))),
        st.tuples(st.just("top_p"), st.one_of(st.just(math.nan), f(max_value=0.0), f(min_value=1.0001)),
                  st.just(("top_p",))),
        st.tuples(st.just("frequency_penalty"), st.one_of(st.just(math.nan), f(min_value=2.0001)),
                  st.just(("frequency_penalty",))),
        st.tuples(st.just("model"), _text.filter(lambda t: t != model), st.just(("model",))),
        st.tuples(st.just("n"), st.integers(MAX_N + 1, 2**32 - 1), st.just(("n",))),
        st.tuples(st.just("top_logprobs"), st.integers(21, 2**32 - 1), st.just(("top_logprobs",))),
        st.tuples(st.just("stop"), st.lists(_text, min_size=5, max_size=20), st.just(("stop",))),
        st.tuples(st.just("stop"), st.just([""]), st.just(("stop[0]",))),
        st.tuples(st.just("messages"), st.just([]), st.just(("messages",))),
        st.tuples(st.just("messages"), _text.filter(lambda r: r not in ("user", "system", "assistant", "developer"))
                  .map(lambda r: [_message(role=r)]), st.just(("messages[0].role",))),
        st.tuples(st.just("messages"), st.integers(CONTEXT_WINDOW + 50, 60_000).map(
            lambda n: [_message(content="word " * n)]), st.just(("context window",))),
        st.tuples(st.just("messages"), st.integers(1100, 4000).map(lambda n: [_message()] * n),
                  st.just(("context window",))),
        st.tuples(st.just("tool_choice"), _text.map(lambda t: struct_pb2.Value(string_value=t)), st.just(None)),
    ))
    # names None: a field whose odd values the API may accept (tool_choice): any answer but a server fault
    return GrpcCase("grpc_bad_value", valid_request(model, **{name: value}).SerializeToString(), auth,
                    stream=draw(st.booleans()), names=names or (name,), reject=names is not None)


# HTTP/2 forbids connection-specific headers: sent as metadata, they make a malformed request (stream reset).
FORBIDDEN = ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade")
_key = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20).filter(
    lambda k: not k.startswith(("grpc-", ":")) and not k.endswith("-bin") and k not in FORBIDDEN
    and k not in ("te", "content-type", "authorization", "user-agent"))
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=100).map(str.strip)


@st.composite
def bad_metadata(draw, model: str, auth) -> GrpcCase:
    request = valid_request(model).SerializeToString()
    choice = draw(st.sampled_from(["none", "scheme", "bad_key", "extra", "binary", "forbidden", "huge"]))
    if choice == "none":
        return GrpcCase("grpc_no_key", request, (), names=("authorization",))
    if choice == "scheme":
        value = draw(st.sampled_from(["Basic abc", "Bearer", "bearer", "Token x", auth[0][1].split(" ", 1)[1]]))
        return GrpcCase("grpc_auth_scheme", request, (("authorization", value),), names=("authorization",))
    if choice == "bad_key":
        return GrpcCase("grpc_bad_key", request, (("authorization", "Bearer " + draw(_value.filter(bool))),),
                        names=("API key",))
    if choice == "extra":
        extra = tuple(draw(st.dictionaries(_key, _value, max_size=10)).items())
        return GrpcCase("grpc_extra_metadata", request, auth + extra, reject=False)
    if choice == "binary":
        value = draw(st.binary(max_size=200))
        return GrpcCase("grpc_binary_metadata", request, auth + (("x-junk-bin", value),), reject=False)
    if choice == "forbidden":
        return GrpcCase("grpc_forbidden_header", request, auth + ((draw(st.sampled_from(FORBIDDEN)), "x"),),
                        reset_ok=True)
    n = draw(st.integers(61 << 10, 200 << 10))
    if draw(st.booleans()):  # one field over 64 KiB: Envoy's HPACK decoder resets (no status possible there)
        return GrpcCase("grpc_huge_field", request, auth + (("x-pad", "a" * max(n, 65 << 10)),), reset_ok=True)
    parts = -(-n // (50 << 10))  # the same size in fields under 64 KiB: RESOURCE_EXHAUSTED naming the limit
    pad = tuple((f"x-pad-{i}", "a" * (n // parts)) for i in range(parts))
    return GrpcCase("grpc_huge_metadata", request, auth + pad, names=("metadata",))


def grpc_cases(model: str, api_key: str, victim: Victim | None = None) -> st.SearchStrategy[GrpcCase]:
    auth = (("authorization", f"Bearer {api_key}"),)
    cases = [garbage(model, auth), malformed_protobuf(model, auth), bad_value(model, auth), bad_metadata(model, auth)]
    if victim is not None:
        cases.append(cross_tenant(auth, victim))
    return st.one_of(*cases)
