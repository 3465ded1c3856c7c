"""The gateway's peer clients against peers that are away, come back late, or stall: Encode (nothing admitted yet)
is retried until the tokenizer answers; a stalled tokenizer or metering ends in UNAVAILABLE (PeerLost), never a
hang."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gateway import metering_client, upstream
from gateway.metering_client import MeteringClient
from gateway.upstream import PeerLost, TokenizerClient
from moemesh.errors import ErrorStatus
from moemesh.serving import client_channel, serve_in_process
from moemesh.serving.config import ServiceConfig
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.servicer import add_to_server as add_tokenizer

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_encode_waits_for_a_tokenizer_that_comes_back(gateway_tokenizer):
    port = free_port()
    client = TokenizerClient(client_channel(f"127.0.0.1:{port}"))
    catalog = TokenizerCatalog({MODEL: gateway_tokenizer})
    pending = asyncio.create_task(client.encode_chat(MODEL, MESSAGES))  # the tokenizer is down (restarting)
    await asyncio.sleep(1.0)
    assert not pending.done()
    async with serve_in_process(lambda s: add_tokenizer(TokenizerServicer(catalog), s), name="tokenizer",
                                config=ServiceConfig(port=port, metrics_port=-1)):
        ids = await asyncio.wait_for(pending, 10)
    assert ids == gateway_tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)[0]


@pytest.fixture
def stalled_address():
    """A port that accepts connections and never speaks HTTP/2: what a SIGSTOPped process looks like."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_a_stalled_tokenizer_ends_in_peer_lost_not_a_hang(monkeypatch, stalled_address):
    monkeypatch.setattr(upstream, "TOKENIZER_CALL_S", 0.3)
    monkeypatch.setattr(upstream, "ENCODE_RETRY_S", 1.0)
    client = TokenizerClient(client_channel(stalled_address))
    started = time.monotonic()
    with pytest.raises(PeerLost, match="tokenizer"):
        await client.encode_chat(MODEL, MESSAGES)
    assert time.monotonic() - started < 5


async def test_a_stalled_metering_fails_closed_with_unavailable(monkeypatch, stalled_address):
    monkeypatch.setattr(metering_client, "METERING_CALL_S", 0.3)
    client = MeteringClient(client_channel(stalled_address))
    for call in (lambda: client.authenticate("key"), lambda: client.reserve("r1", "acme", "m", 5, 5)):
        started = time.monotonic()
        with pytest.raises(PeerLost, match="metering: no answer") as err:
            await call()
        assert err.value.status is ErrorStatus.UNAVAILABLE and time.monotonic() - started < 3


@pytest.mark.parametrize(("code", "details", "lost"), [
    ("UNAVAILABLE", "Socket closed", True),
    ("INTERNAL", "Received RST_STREAM with error code 2", True),
    ("INTERNAL", "Internal error from Core", True),  # a call cut while gRPC core tears the dead peer's channel down
    ("INTERNAL", "internal error: ZeroDivisionError: division by zero", False),  # the peer's own bug stays INTERNAL
    ("INVALID_ARGUMENT", "ids: out of range", False),
])
def test_a_broken_peer_call_becomes_peer_lost_and_a_peer_error_stays(code: str, details: str, lost: bool) -> None:
    import grpc

    exc = grpc.aio.AioRpcError(grpc.StatusCode[code], grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    out = upstream._lost("tokenizer", exc)
    assert isinstance(out, PeerLost) is lost and (lost or out is exc)
