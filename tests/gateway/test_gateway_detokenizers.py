"""The gateway detokenizes streams in its own process (gateway/detokenizers.py) from the tokenizer service's
Definition: per id the same text as the service's DetokenizeStream, logprob pieces the same as its Pieces; a service
without Definition keeps the stream; a failed fetch is tried again by the next request."""

from __future__ import annotations

import pytest

from gateway.detokenizers import LocalDecoders, LocalDetokenizer, from_definition
from gateway.upstream import StreamDetokenizer, TokenizerClient
from gateway_harness import StreamOnlyTokenizer
from moemesh.serving import client_channel, serve_in_process
from moemesh.v1 import tokenizer_pb2
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.servicer import add_to_server as add_tokenizer

MODEL = "tiny"
# Split characters (emoji, CJK: several byte-level tokens each), digits, newlines, a special token (skipped).
TEXT = "Hello 😀 world!\n中文 and 12345 <|im_end|> done 🦜🦜 é"


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@pytest.fixture
async def tokenizer_at(gateway_tokenizer, request):
    """(address of a tokenizer service, its stub's client channel); param "stream": a service without Definition."""
    servicer = (StreamOnlyTokenizer if getattr(request, "param", "") == "stream" else TokenizerServicer)(
        TokenizerCatalog({MODEL: gateway_tokenizer}))
    async with serve_in_process(lambda server: add_tokenizer(servicer, server), name="tokenizer") as up:
        channel = client_channel(up.address)
        yield channel
        await channel.close()


async def _texts(detok, ids: list[int], size: int) -> list[list[str]]:
    out = [await detok.feed(part) for part in chunks(ids, size)]
    await detok.finish()
    return out


@pytest.mark.parametrize("size", [1, 3])
async def test_in_process_text_is_the_services_text_id_for_id(tokenizer_at, gateway_tokenizer, size: int) -> None:
    client = TokenizerClient(tokenizer_at)
    ids = gateway_tokenizer.encode(TEXT, add_special_tokens=False)
    local = client.detokenizer(MODEL)
    got = await _texts(local, ids, size)
    stream = StreamDetokenizer(client._stub, MODEL)
    want = await _texts(stream, ids, size)
    assert local.in_process and got == want
    assert "".join(t for per in got for t in per) == gateway_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("tokenizer_at", ["stream"], indirect=True)
async def test_a_service_without_definition_keeps_the_stream(tokenizer_at, gateway_tokenizer) -> None:
    client = TokenizerClient(tokenizer_at)
    ids = gateway_tokenizer.encode(TEXT, add_special_tokens=False)
    for _ in range(2):  # asked once: the second request goes straight to the stream
        detok = client.detokenizer(MODEL)
        texts = await _texts(detok, ids, 2)
        assert not detok.in_process
        assert "".join(t for per in texts for t in per) == gateway_tokenizer.decode(ids, skip_special_tokens=True)


async def test_logprob_pieces_in_process_are_the_services(tokenizer_at, gateway_tokenizer) -> None:
    client = TokenizerClient(tokenizer_at)
    ids = sorted(set(gateway_tokenizer.encode(TEXT, add_special_tokens=False))) + [0, 1, 2]
    from_service = await client.pieces(MODEL, ids)  # before the definition is loaded: the Pieces RPC
    await client.detokenizer(MODEL).feed([ids[0]])  # loads it
    assert await client.pieces(MODEL, ids) == from_service
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await client.pieces(MODEL, [gateway_tokenizer.vocab_size])


async def test_a_failed_fetch_leaves_the_stream_and_the_next_request_tries_again(tokenizer_at) -> None:
    stub_client = TokenizerClient(tokenizer_at)
    calls = []

    async def fetch(model: str) -> str | None:
        calls.append(model)
        if len(calls) == 1:
            raise ConnectionError("tokenizer restarting")
        return await stub_client._definition(model)

    decoders = LocalDecoders(fetch)
    assert await decoders.get(MODEL) is None  # this request: the stream
    assert (await decoders.get(MODEL)).vocab_size > 0 and decoders.known(MODEL) is not None
    assert await decoders.get(MODEL) is decoders.known(MODEL) and len(calls) == 2  # loaded once


async def test_an_id_outside_the_vocabulary_is_refused_like_the_service_does(gateway_tokenizer) -> None:
    response = tokenizer_pb2.TokenizerDefinition(tokenizer_json=gateway_tokenizer.tokenizer.to_str())
    detok = LocalDetokenizer(from_definition(response.tokenizer_json))
    with pytest.raises(ValueError, match=rf"ids\[1\]: {gateway_tokenizer.vocab_size} is outside the vocabulary"):
        await detok.feed([5, gateway_tokenizer.vocab_size])
