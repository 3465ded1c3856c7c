"""The gateway in-process with its real tokenizer service (tiny model's SmolLM2 tokenizer) over real sockets, and
the scripted batcher and metering of gateway_harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.completion import Completions
from gateway.metering_client import MeteringClient
from gateway.models import ModelCatalog
from gateway.servicer import ChatServicer
from gateway.servicer import add_to_server as add_chat
from gateway.upstream import BatcherClient, TokenizerClient
from gateway_harness import MODEL, Mesh, RecordingMetering, ScriptedBatcher, StreamOnlyTokenizer
from moemesh.serving import client_channel, serve_in_process
from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from moemesh.v1 import batcher_pb2_grpc, chat_pb2_grpc, metering_pb2_grpc
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.servicer import add_to_server as add_tokenizer


@pytest.fixture(scope="session")
def gateway_tokenizer(tiny_moe_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(tiny_moe_dir)


@pytest.fixture
async def mesh(request, tiny_moe_dir: Path, gateway_tokenizer: ChatTokenizer):
    """indirect param "stream": the tokenizer service has no Definition (the gateway's DetokenizeStream path)."""
    batcher, metering = ScriptedBatcher(), RecordingMetering()
    catalog = TokenizerCatalog({MODEL: gateway_tokenizer})
    servicer_class = StreamOnlyTokenizer if getattr(request, "param", "") == "stream" else TokenizerServicer

    def upstreams(server):
        batcher_pb2_grpc.add_BatcherServicer_to_server(batcher, server)
        metering_pb2_grpc.add_MeteringServicer_to_server(metering, server)
        return [*add_tokenizer(servicer_class(catalog), server), "moemesh.v1.Batcher", "moemesh.v1.Metering"]

    async with serve_in_process(upstreams, name="upstreams") as up:
        channels = [client_channel(up.address) for _ in range(3)]
        metering_client = MeteringClient(channels[2], cache_seconds=30)
        completions = Completions(TokenizerClient(channels[0]), BatcherClient(channels[1]), metering_client)
        servicer = ChatServicer(completions, ModelCatalog([MODEL]), metering_client, auth=True,
                                default_max_tokens=64, request_timeout=30)
        async with serve_in_process(lambda server: add_chat(servicer, server), name="gateway") as gw:
            channel = client_channel(gw.address)
            yield Mesh(chat_pb2_grpc.ChatStub(channel), batcher, metering, gateway_tokenizer)
            await channel.close()
            await completions.drain()
        for c in channels:
            await c.close()
