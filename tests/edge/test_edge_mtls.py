"""mTLS between mesh services (MOEMESH_MTLS=1): a service of moemesh.serving listens with its development
certificate and accepts only clients holding one of the same CA; the mesh's client channels present theirs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.certs import ensure_peer
from moemesh.serving import client_channel, serve_in_process, sync_client_channel

CHECK = health_pb2.HealthCheckRequest(service="")


@pytest.fixture
def mtls_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.setenv("MOEMESH_MTLS", "1")
    monkeypatch.setenv("MOEMESH_MTLS_NAME", "tester")
    return tmp_path


async def test_services_speak_mtls_when_asked(mtls_home) -> None:
    async with serve_in_process(lambda server: [], name="svc") as svc:
        channel = client_channel(svc.address)
        reply = await health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close()
        with sync_client_channel(svc.address) as blocking:  # called off the loop the server runs on
            sync = await asyncio.to_thread(health_pb2_grpc.HealthStub(blocking).Check, CHECK, timeout=10)
        assert sync.status == reply.status
        assert (mtls_home / "certs" / "mtls" / "svc.pem").is_file()
        assert (mtls_home / "certs" / "mtls" / "tester.pem").is_file()
        for stranger in (grpc.aio.insecure_channel(svc.address),  # plaintext
                         grpc.aio.secure_channel(svc.address, grpc.ssl_channel_credentials(  # TLS, no client cert
                             (mtls_home / "certs" / "ca.pem").read_bytes()))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(stranger).Check(CHECK, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await stranger.close()


async def test_plaintext_stays_the_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.delenv("MOEMESH_MTLS", raising=False)
    async with serve_in_process(lambda server: [], name="svc") as svc:
        async with grpc.aio.insecure_channel(svc.address) as plain:
            reply = await health_pb2_grpc.HealthStub(plain).Check(CHECK, timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert not (tmp_path / "certs" / "mtls").exists()


def test_peer_certificates_are_made_once_under_a_lock(mtls_home) -> None:
    first = ensure_peer("gateway").cert.read_bytes()
    assert ensure_peer("gateway").cert.read_bytes() == first
    assert (mtls_home / "certs" / ".lock").exists()
