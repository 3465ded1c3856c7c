"""moemesh.v1.Tokenizer over a real socket with the real SmolLM2 tokenizer."""

from __future__ import annotations

import grpc
import pytest

from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from moemesh.v1 import common_pb2, tokenizer_pb2

from tokenizer_harness import MODEL

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, naïve café 🙂?"}]


def _chat_input(messages, add_generation_prompt=True) -> tokenizer_pb2.ChatInput:
    return tokenizer_pb2.ChatInput(messages=[common_pb2.ChatMessage(**m) for m in messages],
                                   add_generation_prompt=add_generation_prompt)


async def test_encode_text_and_chat_match_the_library(tokenizer_stub, chat_tokenizer: ChatTokenizer) -> None:
    text = await tokenizer_stub.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, text="Hello world 123"))
    assert list(text.ids) == chat_tokenizer.encode("Hello world 123") and text.rendered == ""
    chat = await tokenizer_stub.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, chat=_chat_input(CHAT)))
    ids, rendered = chat_tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    assert (list(chat.ids), chat.rendered) == (ids, rendered)
    assert rendered.endswith("<|im_start|>assistant\n")


async def test_decode_round_trip_and_special_tokens(tokenizer_stub, chat_tokenizer: ChatTokenizer) -> None:
    ids, rendered = chat_tokenizer.encode_chat(CHAT)
    full = await tokenizer_stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, ids=ids))
    assert full.text == rendered
    plain = await tokenizer_stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, ids=ids, skip_special_tokens=True))
    assert "<|im_start|>" not in plain.text and "café 🙂" in plain.text


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (tokenizer_pb2.EncodeRequest(model="nope", text="x"), grpc.StatusCode.NOT_FOUND, "model: 'nope'"),
        (tokenizer_pb2.EncodeRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "input:"),
        (tokenizer_pb2.EncodeRequest(model=MODEL, chat=tokenizer_pb2.ChatInput()), grpc.StatusCode.INVALID_ARGUMENT,
         "chat.messages"),
    ],
)
async def test_encode_errors_name_the_field(tokenizer_stub, request_, code, fragment) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tokenizer_stub.Encode(request_)
    assert info.value.code() == code and fragment in info.value.details()


async def test_decode_rejects_ids_outside_the_vocabulary(tokenizer_stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tokenizer_stub.Decode(tokenizer_pb2.DecodeRequest(model=MODEL, ids=[1, 2, 10**6]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ids[2]: 1000000 is outside the vocabulary" in info.value.details()


async def test_detokenize_stream_never_splits_a_character(tokenizer_stub, chat_tokenizer: ChatTokenizer) -> None:
    text = "Emoji 🙂🎉 and ünïcödé, then 漢字."
    ids = chat_tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens

    async def one_id_per_message():
        yield tokenizer_pb2.DetokenizeRequest(model=MODEL, ids=ids[:1])
        for token in ids[1:]:
            yield tokenizer_pb2.DetokenizeRequest(ids=[token])

    responses = [r async for r in tokenizer_stub.DetokenizeStream(one_id_per_message())]
    assert len(responses) == len(ids)
    assert all("\ufffd" not in r.text and "".join(r.token_texts) == r.text for r in responses)
    assert [len(r.token_texts) for r in responses] == [1] * len(ids)
    assert "".join(r.text for r in responses) == text
    assert any(r.text == "" for r in responses)  # an id inside a character completed nothing yet


async def test_detokenize_stream_batches_and_flushes_a_dangling_byte(tokenizer_stub, chat_tokenizer) -> None:
    # A text whose last character spans several byte tokens (" 🙂" alone is one token in SmolLM2's vocabulary).
    ids = next(ids for ids in map(chat_tokenizer.encode, ("ok 𝄞", "ok 🦩", "ok 𓀀"))
               if chat_tokenizer.decode(ids[:-1]).endswith("\ufffd"))

    async def requests():
        yield tokenizer_pb2.DetokenizeRequest(model=MODEL, ids=ids[:-1])  # the emoji's last byte is missing

    responses = [r async for r in tokenizer_stub.DetokenizeStream(requests())]
    assert responses[0].text.rstrip() == "ok" and len(responses[0].token_texts) == len(ids) - 1
    assert responses[-1].text == chat_tokenizer.decode(ids[:-1])[len(responses[0].text):]
    assert "\ufffd" in responses[-1].text and not responses[-1].token_texts


async def test_detokenize_stream_unknown_model_is_not_found(tokenizer_stub) -> None:
    async def requests():
        yield tokenizer_pb2.DetokenizeRequest(model="nope", ids=[1])

    with pytest.raises(grpc.aio.AioRpcError) as info:
        [r async for r in tokenizer_stub.DetokenizeStream(requests())]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "model: 'nope'" in info.value.details()


async def test_info(tokenizer_stub, chat_tokenizer: ChatTokenizer) -> None:
    info = await tokenizer_stub.Info(tokenizer_pb2.TokenizerInfoRequest(model=MODEL))
    assert info.model == MODEL and info.vocab_size == chat_tokenizer.vocab_size == 49152
    assert list(info.eos_token_ids) == list(chat_tokenizer.eos_token_ids) and info.has_chat_template


async def test_pieces_give_each_token_alone_with_exact_bytes(tokenizer_stub, chat_tokenizer) -> None:
    ids = chat_tokenizer.encode("ok 𝄞")
    response = await tokenizer_stub.Pieces(tokenizer_pb2.PiecesRequest(model=MODEL, ids=ids))
    assert [p.id for p in response.pieces] == ids
    assert b"".join(p.bytes for p in response.pieces) == "ok 𝄞".encode()
    assert response.pieces[0].text == "ok"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tokenizer_stub.Pieces(tokenizer_pb2.PiecesRequest(model=MODEL, ids=[49152]))
    assert "ids[0]: 49152 is outside the vocabulary" in info.value.details()


async def test_definition_is_the_served_tokenizer(tokenizer_stub, chat_tokenizer: ChatTokenizer) -> None:
    from tokenizers import Tokenizer

    got = await tokenizer_stub.Definition(tokenizer_pb2.TokenizerDefinitionRequest(model=MODEL))
    copy = Tokenizer.from_str(got.tokenizer_json)
    ids, rendered = chat_tokenizer.encode_chat(CHAT)
    assert got.model == MODEL and copy.decode(ids, skip_special_tokens=False) == rendered
    assert copy.get_vocab_size(with_added_tokens=True) == chat_tokenizer.vocab_size
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tokenizer_stub.Definition(tokenizer_pb2.TokenizerDefinitionRequest(model="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
