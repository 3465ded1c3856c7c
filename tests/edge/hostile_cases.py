"""Hostile requests for the edge, as hypothesis strategies, and the oracle that judges the answers.

A case is what a stranger may send: malformed JSON, wrong types, invalid UTF-8, empty or enormous messages, prompts
beyond the context window, huge max_tokens, NaN/negative temperature, unknown models and fields, header abuse; over
HTTP (OpenAI's JSON) and gRPC (garbage bytes, hostile values, hostile metadata). The oracle: never a 5xx (nor a gRPC
INTERNAL/UNKNOWN/UNAVAILABLE/DATA_LOSS); a case expected to be rejected gets a 4xx (INVALID_ARGUMENT & co.) whose
message names the field or the problem. Used by tests/edge/test_edge_hostile.py (a few hundred cases) and
benchmarks/hostile.py (thousands).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import strategies as st

from moemesh.v1 import chat_pb2, common_pb2

def _declared(descriptor) -> set[str]:
    """Proto and JSON names of a message's fields (the API grows: read them, do not list them)."""
    return {f.name for f in descriptor.fields} | {f.json_name for f in descriptor.fields}


DECLARED = _declared(chat_pb2.ChatCompletionRequest.DESCRIPTOR)
MESSAGE_FIELDS = _declared(common_pb2.ChatMessage.DESCRIPTOR)
STREAM_OPTION_FIELDS = _declared(chat_pb2.StreamOptions.DESCRIPTOR)
MAX_N = 8  # the gateway's default --max-n
CONTEXT_WINDOW = 2048  # the tiny test model's
SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}


@dataclass(frozen=True)
class HttpCase:
    kind: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/chat/completions"
    method: str = "POST"
    reject: bool = True  # False: any answer but a server fault is fine (the request may be valid)
    names: tuple[str, ...] = ()  # the error must mention one of these (a field, a phrase); (): a non-empty message


@dataclass(frozen=True)
class GrpcCase:
    kind: str
    request: bytes  # serialized (possibly garbage) ChatCompletionRequest
    metadata: tuple[tuple[str, str], ...]
    stream: bool = False
    reject: bool = True
    names: tuple[str, ...] = ()
    reset_ok: bool = False  # a single header field over 64 KiB, a forbidden header: HTTP/2 resets the stream
    method: str = ""  # a Chat RPC name; "": CreateChatCompletion, or StreamChatCompletion when `stream`


def base(served: str, **fields) -> dict:
    """A valid request for the served model, with `fields` replaced or added."""
    return {"model": served, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields}


def _dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                     _text)
WRONG = {  # field -> values of a kind it does not take
    "string": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                        st.lists(_scalars, max_size=3), st.dictionaries(_text, _scalars, max_size=3)),
    "number": st.one_of(st.booleans(), st.lists(_scalars, min_size=1, max_size=3),
                        st.dictionaries(_text, _scalars, max_size=3), _text.filter(lambda t: not _numeric(t))),
    "bool": st.one_of(st.integers(), _text, st.lists(st.booleans(), max_size=2), st.dictionaries(_text, _scalars)),
    "list": st.one_of(_scalars, st.dictionaries(_text, _scalars, max_size=3)),
    "object": st.one_of(_scalars, st.lists(_scalars, max_size=3)),
}
TYPED_FIELDS = {"model": "string", "user": "string", "max_tokens": "number", "temperature": "number",
                "top_p": "number", "seed": "number", "n": "number", "top_k": "number", "presence_penalty": "number",
                "stream": "bool", "logprobs": "bool", "messages": "list", "stream_options": "object"}


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip() in ("NaN", "Infinity", "-Infinity")
    return True


@st.composite
def malformed_json(draw, model: str) -> HttpCase:
    valid = _dumps(base(model))
    body = draw(st.one_of(
        st.binary(max_size=200),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),  # truncated
        st.sampled_from([b"[]", b'"x"', b"null", b"1", b"{", b"}", b"{,}", b'{"model": NaN}', b"{} {}"]),
        st.integers(65, 200).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    ))
    try:
        ok = isinstance(json.loads(body), dict)
    except ValueError:
        ok = False
    return HttpCase("malformed_json", body, reject=not ok)


@st.composite
def wrong_type(draw, model: str) -> HttpCase:
    name = draw(st.sampled_from(sorted(TYPED_FIELDS)))
    value = draw(WRONG[TYPED_FIELDS[name]])
    where = draw(st.sampled_from(["top", "message"])) if TYPED_FIELDS[name] == "string" else "top"
    request = base(model)
    if where == "message":
        name = draw(st.sampled_from(["role", "content", "name"]))
        request["messages"][0][name] = value
        name = f"messages[0].{name}"
    else:
        request[name] = value
    return HttpCase("wrong_type", _dumps(request), names=(name,))


@st.composite
def invalid_utf8(draw, model: str) -> HttpCase:
    bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80",
                                b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]))
    prefix, suffix = draw(st.binary(max_size=10)).replace(b'"', b"").replace(b"\\", b""), b"ok"
    where = draw(st.sampled_from(["content", "model", "key"]))
    request = base(model)
    body = _dumps(request)
    marker = {"content": b'"hi"', "model": _dumps(model), "key": b'"max_tokens"'}[where]
    body = body.replace(marker, b'"' + prefix + bad + suffix + b'"', 1)
    return HttpCase("invalid_utf8", body)


@st.composite
def sizes(draw, model: str) -> HttpCase:
    choice = draw(st.sampled_from(["no_messages", "empty_content", "many_messages", "huge_content", "too_big"]))
    if choice == "no_messages":
        return HttpCase("empty_messages", _dumps(base(model, messages=[])), names=("messages",))
    if choice == "empty_content":
        return HttpCase("empty_content", _dumps(base(model, messages=[{"role": "user", "content": ""}])),
                        names=("messages[0].content",))
    if choice == "many_messages":
        n = draw(st.integers(1100, 5000))
        messages = [{"role": "user", "content": "hi"}] * n
        return HttpCase("many_messages", _dumps(base(model, messages=messages)), names=("context window",))
    if choice == "huge_content":
        words = draw(st.integers(CONTEXT_WINDOW + 50, 100_000))
        content = "word " * words
        return HttpCase("beyond_context", _dumps(base(model, messages=[{"role": "user", "content": content}])),
                        names=("context window",))
    megabytes = draw(st.integers(9, 12))
    return HttpCase("too_big", _dumps(base(model, user="x" * (megabytes << 20))), names=("Too Large",))


@st.composite
def bad_numbers(draw, model: str) -> HttpCase:
    name, value = draw(st.one_of(
        st.tuples(st.sampled_from(["max_tokens", "max_completion_tokens"]),
                  st.one_of(st.integers(CONTEXT_WINDOW, 2**31 - 1), st.integers(2**31, 2**80),
                            st.integers(-2**31, 0))),
        st.tuples(st.just("temperature"), st.one_of(
            st.sampled_from(["NaN", "Infinity", "-Infinity", "nan"]), st.floats(max_value=-1e-9, allow_infinity=False),
            st.floats(min_value=2.000001, allow_infinity=False))),
        st.tuples(st.just("top_p"), st.one_of(st.just(0), st.floats(max_value=0, allow_infinity=False),
                                              st.floats(min_value=1.0001, allow_infinity=False), st.just("NaN"))),
        st.tuples(st.sampled_from(["presence_penalty", "frequency_penalty"]),
                  st.one_of(st.floats(min_value=2.0001, allow_infinity=False), st.floats(max_value=-2.0001,
                                                                                         allow_infinity=False))),
        st.tuples(st.just("n"), st.integers(MAX_N + 1, 2**32 - 1)),
        st.tuples(st.just("top_logprobs"), st.integers(21, 2**32 - 1)),
    ))
    # max_completion_tokens wins over max_tokens; the batcher, which checks the window, knows it as max_tokens.
    names = (name, "context window") if name == "max_completion_tokens" else (name,)
    return HttpCase("bad_number", _dumps(base(model, **{name: value})), names=names)


@st.composite
def unknown_model(draw, model: str) -> HttpCase:
    name = draw(_text.filter(lambda t: t not in (model, "") and not model.endswith("/" + t)))
    return HttpCase("unknown_model", _dumps(base(model, model=name)), names=("model",))


@st.composite
def unknown_field(draw, model: str) -> HttpCase:
    key = draw(st.one_of(_text.filter(lambda t: t not in DECLARED),
                         st.sampled_from(["tool_calls", "parallel_tool_calls", "store", "metadata", "modalities",
                                          "audio", "reasoning_effort", "service_tier", "Model", "MESSAGES"])))
    value = draw(_scalars)
    where = draw(st.sampled_from(["top", "message", "stream_options"]))
    request = base(model)
    if where == "top":
        key = key + "_x" if key in DECLARED else key
        request[key] = value
        path = key
    elif where == "message":
        if key in MESSAGE_FIELDS:
            key = key + "_x"
        request["messages"][0][key] = value
        path = f"messages[0].{key}"
    else:
        key = key + "_x" if key in STREAM_OPTION_FIELDS else key
        request["stream_options"] = {"include_usage": False, key: value}
        path = f"stream_options.{key}"
    return HttpCase("unknown_field", _dumps(request), names=(path,))


_header_name = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda n: not n.startswith("-") and n not in ("content-length", "transfer-encoding", "host", "connection"))
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200).map(str.strip)


@st.composite
def header_abuse(draw, model: str, api_key: str) -> HttpCase:
    body = _dumps(base(model))
    auth = {"authorization": f"Bearer {api_key}"}
    choice = draw(st.sampled_from(["no_key", "bad_key", "scheme", "huge_value", "many", "random", "content_type"]))
    if choice == "no_key":
        return HttpCase("no_key", body, {}, names=("authorization",))
    if choice == "bad_key":
        return HttpCase("bad_key", body, {"authorization": "Bearer " + draw(_header_value.filter(bool))},
                        names=("API key",))
    if choice == "scheme":
        value = draw(st.sampled_from(["Basic dXNlcjpwYXNz", "Bearer", "bearer", "Token abc", api_key]))
        return HttpCase("auth_scheme", body, {"authorization": value}, names=("authorization",))
    if choice == "huge_value":
        n = draw(st.integers(61 << 10, 200 << 10))
        return HttpCase("huge_header", body, {**auth, "x-pad": "a" * n}, names=("Too Large",))
    if choice == "many":
        n = draw(st.integers(101, 300))
        return HttpCase("many_headers", body, {**auth, **{f"x-h{i}": "v" for i in range(n)}}, names=("Too Large",))
    if choice == "content_type":
        value = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "", "application/xml",
                                      "application/json; charset=latin-1", "multipart/form-data; boundary=x"]))
        return HttpCase("content_type", body, {**auth, "content-type": value}, reject=False)
    extra = draw(st.dictionaries(_header_name, _header_value, max_size=8))
    extra.update(draw(st.fixed_dictionaries({}, optional={"grpc-timeout": st.sampled_from(["1n", "0S", "x"]),
                                                           "x-envoy-upstream-rq-timeout-ms": st.just("1"),
                                                           "te": st.just("trailers"), "x-request-id": _header_value})))
    return HttpCase("random_headers", body, {**extra, **auth}, reject=False)


@dataclass(frozen=True)
class Victim:
    """Another tenant: its name and one of its request ids (the attacker aims at them), and what the attacker must
    never see in any answer: the victim's API key and a marker only the victim wrote (prompt, feedback comment)."""

    tenant: str
    request_id: str
    api_key: str = ""
    marker: str = ""

    def secrets(self) -> tuple[bytes, ...]:
        return tuple(s.encode() for s in (self.api_key, self.marker) if s)


@st.composite
def http_cross_tenant(draw, api_key: str, victim: Victim) -> HttpCase:
    """The attacker's key on the account endpoints, aimed at the victim's request or usage."""
    auth = {"authorization": f"Bearer {api_key}"}
    if draw(st.booleans()):
        body = _dumps({"request_id": victim.request_id, "rating": draw(st.integers(1, 5)),
                       "comment": draw(st.text(max_size=50))})
        return HttpCase("cross_tenant", body, auth, path="/v1/feedback", names=("tenant", "request"))
    return HttpCase("cross_tenant", None, auth, path=f"/v1/usage?tenant={victim.tenant}", method="GET",
                    names=("tenant",))


def http_cases(model: str, api_key: str, victim: Victim | None = None) -> st.SearchStrategy[HttpCase]:
    """Every HTTP category, with the API key (the case decides whether to send it); `victim`: cross-tenant too."""
    keyed = st.one_of(malformed_json(model), wrong_type(model), invalid_utf8(model), sizes(model),
                      bad_numbers(model), unknown_model(model), unknown_field(model))
    with_key = keyed.map(lambda c: HttpCase(c.kind, c.body, {"authorization": f"Bearer {api_key}", **c.headers},
                                            c.path, c.method, c.reject, c.names))
    if victim is None:
        return st.one_of(with_key, header_abuse(model, api_key))
    return st.one_of(with_key, header_abuse(model, api_key), http_cross_tenant(api_key, victim))
