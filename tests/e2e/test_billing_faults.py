"""Billing stays exact through rejections and faults (issue 12, item 3), on the real mesh (`moemesh up`, tiny MoE):
a prompt beyond the context window is refused and billed nothing; metering SIGKILLed under in-flight streams and
restarted by `moemesh up`: the tokens each client got are billed once and no hold lingers; a dead peer is UNAVAILABLE with a
message that says what to do."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis

from moemesh.sdk import ChatClient
from moemesh.v1 import metering_pb2
from services.metering.keys import TenantKeys

from mesh_harness import RunningMesh
from metering_harness import Account, metering_stub, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STREAMS = 5


def test_prompt_beyond_the_context_window_is_refused_and_not_billed(mesh: RunningMesh) -> None:
    with Account(mesh.gateway, mesh.api_key) as me:
        before = me.usage()
        with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=60) as chat:
            with pytest.raises(grpc.RpcError) as refused:
                chat.complete("hello " * 20000, max_tokens=4)  # ~20k tokens, the window is 2048
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "context window" in refused.value.details()
            chat.complete("hi", max_tokens=2)  # a later commit: the refused one's (if any) is in by then
        after = me.wait_requests(before.requests + 1)
    assert after.prompt_tokens - before.prompt_tokens < 100  # the small chat only, not the 20k refused tokens
    assert after.price_usd - before.price_usd < 1e-3
    assert _holds(mesh.home / "redis" / "redis.sock", "default") == (0, 0)


def test_metering_killed_under_streams_bills_delivered_tokens_once(mesh: RunningMesh) -> None:
    """The mesh's own metering is SIGKILLed while five streams generate; they finish while it is down (so every
    commit fails first); then `moemesh up` restarts it and the gateway's retried (idempotent) commits land."""
    status = json.loads(mesh.status_path.read_text())
    metering = status["services"]["metering"]
    seen: dict[int, tuple[str, int]] = {}  # stream -> (request id, completion tokens the client was told)
    started = threading.Barrier(STREAMS + 1, timeout=120)
    threads = [threading.Thread(target=_stream, args=(mesh, i, started, seen)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first chunk: all five are admitted and generating
    os.kill(mesh.proc.pid, signal.SIGSTOP)  # `moemesh up` restarts metering only once every stream has ended
    try:
        os.kill(metering["pid"], signal.SIGKILL)
        for t in threads:
            t.join(120)
    finally:
        os.kill(mesh.proc.pid, signal.SIGCONT)
    assert len(seen) == STREAMS, f"streams that did not finish: {set(range(STREAMS)) - set(seen)}"
    records = _ledger(metering["address"], {request_id for request_id, _ in seen.values()})
    assert sorted(records) == sorted(seen.values())  # each stream once, with the tokens its client saw
    assert _holds(mesh.home / "redis" / "redis.sock", "default") == (0, 0)
    assert json.loads(mesh.status_path.read_text())["services"]["metering"]["restarts"] == 1


def _stream(mesh: RunningMesh, i: int, started: threading.Barrier, seen: dict) -> None:
    with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=120) as chat:
        first = True
        for chunk in chat.stream(f"Story {i}", max_tokens=16, stream_usage=True):
            if first:
                first = False
                started.wait()
            if chunk.HasField("usage"):
                seen[i] = (chunk.id, chunk.usage.completion_tokens)


def _ledger(metering_addr: str, ids: set[str]) -> list[tuple[str, int]]:
    """(request id, completion tokens) of the ledger records of `ids`, once all are in (metering restarts first),
    and 1 s later: a duplicate would show by then."""
    query = metering_pb2.GetUsageRequest(tenant="default")

    def records() -> list[tuple[str, int]]:
        try:
            return [(r.request_id, r.completion_tokens) for r in stub.ExportUsage(query, timeout=10)
                    if r.request_id in ids]
        except grpc.RpcError:  # metering not back yet
            return []

    channel, stub = metering_stub(metering_addr)
    with channel:
        wait_for(lambda: len(records()) >= len(ids), 90, f"{len(ids)} ledger records")
        time.sleep(1.0)
        return records()


def _holds(socket: Path, tenant: str) -> tuple[int, int]:
    """(reservations in flight, n$ held this month) of a tenant, read from metering's Redis itself."""
    keys = TenantKeys(tenant)
    client = redis.Redis(unix_socket_path=str(socket))
    try:
        month = time.strftime("%Y-%m", time.gmtime())
        return client.zcard(keys.inflight), int(client.hget(keys.state, f"{month}:held") or 0)
    finally:
        client.close()
