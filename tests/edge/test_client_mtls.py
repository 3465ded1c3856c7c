"""The Chat API's own clients speak mTLS when the mesh does: `ChatClient`, `ChatModel`, `moemesh chat` and `moemesh
bench`'s gRPC backend, with MOEMESH_MTLS=1 (the dev certificate) or explicit --ca/--cert/--key; plaintext to an mTLS gateway fails."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh.bench.backends import GrpcBackend
from moemesh.certs import ensure_peer
from moemesh.certs.client_tls import ClientTls
from moemesh.cli.main import main as moemesh_main
from moemesh.sdk import ChatClient, ChatModel
from moemesh.serving import serve_in_process
from moemesh.v1 import chat_pb2, chat_pb2_grpc


class FakeChat(chat_pb2_grpc.ChatServicer):
    async def ListModels(self, request, context):
        return chat_pb2.ListModelsResponse(data=[{"id": "tiny"}])

    async def CreateChatCompletion(self, request, context):
        choice = chat_pb2.Choice(message={"role": "assistant", "content": "over mTLS"},
                                                finish_reason="stop")
        return chat_pb2.ChatCompletion(id="c1", model=request.model, choices=[choice])


@pytest.fixture
async def mtls_gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.setenv("MOEMESH_MTLS", "1")
    monkeypatch.setenv("MOEMESH_MTLS_NAME", "client")

    def register(server):
        chat_pb2_grpc.add_ChatServicer_to_server(FakeChat(), server)
        return ["moemesh.v1.Chat"]

    async with serve_in_process(register, name="gateway") as svc:
        yield svc.address, tmp_path


async def test_chat_client_and_bench_follow_moemesh_mtls(mtls_gateway) -> None:
    address, _ = mtls_gateway
    with ChatClient(address) as client:
        assert await asyncio.to_thread(client.models) == ["tiny"]
    model = ChatModel("tiny", endpoint=address, api_key="k")  # the SDK's host:port endpoints too
    assert (await asyncio.to_thread(model.chat, "hi")).content == "over mTLS"
    model.close()
    backend = GrpcBackend(address, None, None, 10.0, ClientTls())
    await backend._ready()
    assert backend.model == "tiny"
    await backend.close()


async def test_explicit_files_and_the_chat_cli(mtls_gateway, monkeypatch, capsys) -> None:
    address, home = mtls_gateway
    peer = ensure_peer("operator")  # a certificate of the mesh's CA, handed to a client elsewhere
    monkeypatch.delenv("MOEMESH_MTLS")
    with ChatClient(address) as plain:  # plaintext to an mTLS gateway: refused
        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(plain.models)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    files = ["--ca", str(peer.ca), "--cert", str(peer.cert), "--key", str(peer.key)]
    code = await asyncio.to_thread(moemesh_main, ["chat", "hi", "--endpoint", address, "--model", "tiny", *files])
    assert code == 0 and "over mTLS" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--cert/--key"):
        ClientTls(cert=peer.cert)
