"""Handler exceptions become proper gRPC statuses over a real socket; never UNKNOWN."""

from __future__ import annotations

import grpc
import pytest

from moemesh.errors import ErrorStatus
from moemesh.serving import ServiceError, client_channel, serve_in_process, status_for
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

from .echo import register_echo

EXPECTED = {
    "value": (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: -1 is negative"),
    "key": (grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
    "lookup": (grpc.StatusCode.NOT_FOUND, "no such sequence"),
    "permission": (grpc.StatusCode.PERMISSION_DENIED, "tenant 'a' may not use model 'b'"),
    "timeout": (grpc.StatusCode.DEADLINE_EXCEEDED, "queue wait exceeded 5s"),
    "domain": (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant over quota"),
    "bug": (grpc.StatusCode.INTERNAL, "internal error: RuntimeError: boom"),
    "unimplemented": (grpc.StatusCode.UNIMPLEMENTED, "external payloads"),
}


async def test_unary_exceptions_map_to_status_codes() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        ok = await stub.Decode(tokenizer_pb2.DecodeRequest(model="fine", ids=[1, 2]))
        assert ok.text == "1,2"
        for key, (code, details) in EXPECTED.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Decode(tokenizer_pb2.DecodeRequest(model=key))
            assert (info.value.code(), info.value.details()) == (code, details), key


async def test_domain_error_carries_retry_after_in_trailers() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        call = stub.Decode(tokenizer_pb2.DecodeRequest(model="domain"))
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert ("retry-after-ms", "1500") in tuple(await call.trailing_metadata())


async def test_stream_error_after_events_keeps_events_and_maps_status() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = batcher_pb2_grpc.BatcherStub(channel)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for event in stub.Generate(batcher_pb2.GenerateRequest(prompt_ids=[5, 0, 7])):
                got.append(event.token_ids[0])
        assert got == [5, 0]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt_ids" in info.value.details()


async def test_bidi_stream_bug_is_internal_not_unknown() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)

        async def requests():
            yield tokenizer_pb2.DetokenizeRequest(model="m", ids=[1])
            yield tokenizer_pb2.DetokenizeRequest(model="bug", ids=[2])

        texts = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in stub.DetokenizeStream(requests()):
                texts.append(response.text)
        assert texts == ["1"]
        assert info.value.code() == grpc.StatusCode.INTERNAL


async def test_upstream_rpc_error_keeps_its_code() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Decode(tokenizer_pb2.DecodeRequest(model="value"))
    code, details, _ = status_for(info.value)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: -1 is negative")


def test_every_domain_status_becomes_the_grpc_code_of_its_name() -> None:
    for status in ErrorStatus:
        assert status_for(ServiceError("x", status=status))[0] is grpc.StatusCode[status.name]


def test_a_status_attribute_that_is_no_domain_status_is_ignored() -> None:
    class HttpFailure(ValueError):
        status = 404  # an HTTP library's response status, not an ErrorStatus

    class Bug(Exception):
        status = "UNAVAILABLE"  # a code name string is not a domain status either

    assert status_for(HttpFailure("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT  # its builtin class decides
    assert status_for(Bug("x"))[0] == grpc.StatusCode.INTERNAL


async def test_upstream_retry_after_hint_is_passed_on() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Decode(tokenizer_pb2.DecodeRequest(model="domain"))
    code, _, trailing = status_for(info.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailing == (("retry-after-ms", "1500"),)


def test_error_code_travels_as_trailing_metadata_but_not_from_upstream() -> None:
    class PromptTooLong(ValueError):
        error_code = "context_length_exceeded"

    assert status_for(PromptTooLong("prompt_ids: too many")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids: too many", (("error-code", "context_length_exceeded"),))
    assert status_for(ValueError("x"))[2] == ()
