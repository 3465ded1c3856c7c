"""A tokenizer service over the tiny model's real SmolLM2 tokenizer, in the test's event loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.serving import client_channel, serve_in_process
from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from moemesh.v1 import tokenizer_pb2_grpc
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.servicer import TokenizerServicer, add_to_server

from tokenizer_harness import MODEL


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_moe_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(tiny_moe_dir)


@pytest.fixture
async def tokenizer_stub(tiny_moe_dir: Path):
    catalog = TokenizerCatalog.load([MODEL], resolve=lambda name: tiny_moe_dir)
    async with serve_in_process(lambda server: add_to_server(TokenizerServicer(catalog), server)) as svc:
        channel = client_channel(svc.address)
        yield tokenizer_pb2_grpc.TokenizerStub(channel)
        await channel.close()
