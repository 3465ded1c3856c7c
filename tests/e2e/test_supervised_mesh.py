"""Supervision on the real mesh (issue 12, acceptance): SIGKILL of the batcher during streams; the streams end with an
in-band UNAVAILABLE error and are billed for what they delivered; `moemesh up` keeps running, restarts the batcher on
its port, and a new chat succeeds within 60 s; the restart shows in up's output, the status file and Prometheus."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moemesh.sdk import ChatClient
from moemesh.sdk.client import ChatStreamError
from moemesh.v1 import metering_pb2

from mesh_harness import RunningMesh
from metering_harness import metering_stub, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STREAMS = 3


@pytest.mark.timeout(300)
def test_batcher_sigkill_during_streams_then_a_new_chat_within_60_s(mesh: RunningMesh) -> None:
    old_pid = mesh.status["services"]["batcher"]["pid"]
    outcomes: dict[int, tuple[str, int, object]] = {}  # stream -> (request id, content chunks, how it ended)
    started = threading.Barrier(STREAMS + 1, timeout=120)
    threads = [threading.Thread(target=_stream, args=(mesh, i, started, outcomes)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait()  # every stream is generating
    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(120)
    assert all(isinstance(end, ChatStreamError) and end.code == "UNAVAILABLE" and "retry" in end.message
               for _, _, end in outcomes.values()), outcomes
    _chat_within(mesh, killed, 60.0)
    assert mesh.proc.poll() is None  # up kept running

    status = json.loads(mesh.status_path.read_text())
    batcher = status["services"]["batcher"]
    assert batcher["restarts"] == 1 and batcher["pid"] != old_pid
    output = mesh.output_path.read_text()
    assert "batcher exited with code -9; restarting in" in output and "batcher SERVING again" in output
    assert _restarts_counter(status["supervisor_metrics_port"], "batcher") == 1
    _billed_as_delivered(mesh, outcomes)


def _kill_mid_streams(mesh: RunningMesh, victim: str) -> tuple[dict[int, tuple[str, int, object]], float]:
    """STREAMS chat streams started, `victim` SIGKILLed while they run; (each stream's outcome, the kill's time)."""
    outcomes: dict[int, tuple[str, int, object]] = {}
    started = threading.Barrier(STREAMS + 1, timeout=120)
    threads = [threading.Thread(target=_stream, args=(mesh, i, started, outcomes)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait()
    os.kill(json.loads(mesh.status_path.read_text())["services"][victim]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(120)
    return outcomes, killed


def test_a_dead_tokenizer_leaves_streams_in_flight_alone_and_serves_again(mesh: RunningMesh) -> None:
    """The gateway detokenizes running streams in its own process (gateway/detokenizers.py): they finish normally;
    new requests wait for the restarted tokenizer (Encode)."""
    outcomes, killed = _kill_mid_streams(mesh, "tokenizer")
    assert sorted(outcomes) == list(range(STREAMS)) and all(end is None and n > 0 for _, n, end in outcomes.values()), \
        outcomes
    _chat_within(mesh, killed, 60.0)
    assert mesh.proc.poll() is None


@pytest.mark.parametrize("victim", ["expert-1"])
def test_a_dead_peer_is_unavailable_with_advice_and_serves_again(mesh: RunningMesh, victim: str) -> None:
    """Was INTERNAL ("InvalidStateError: RPC already finished" for the tokenizer, when streams detokenized there)."""
    outcomes, killed = _kill_mid_streams(mesh, victim)
    for _, _, end in outcomes.values():
        assert isinstance(end, ChatStreamError), end  # in-band: each stream had started
        assert end.code == "UNAVAILABLE" and "retry the request" in end.message, end
    _chat_within(mesh, killed, 60.0)
    assert mesh.proc.poll() is None


def test_router_sigkill_mid_stream_recomputes_and_streams_finish(mesh: RunningMesh) -> None:
    """The router's KV cache dies with it: the batcher re-queues the running sequences and recomputes them on the
    restarted router; the clients' streams pause, then finish with every token, billed once."""
    TOKENS = 200  # long enough to be mid-stream at the kill (the tiny model's context is 256)
    results: dict[int, tuple[str, str, int]] = {}
    started = threading.Barrier(STREAMS + 1, timeout=120)

    def stream(i: int) -> None:
        request_id, finish, tokens = "", "", 0
        with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=120) as chat:
            for n, chunk in enumerate(chat.stream(f"A long story {i}", max_tokens=TOKENS, ignore_eos=True,
                                                  stream_usage=True)):
                request_id = chunk.id
                if n == 2:
                    started.wait()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.HasField("usage"):
                    tokens = chunk.usage.completion_tokens
        results[i] = (request_id, finish, tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait()
    os.kill(json.loads(mesh.status_path.read_text())["services"]["router"]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(STREAMS)) and all(r[1:] == ("length", TOKENS) for r in results.values()), \
        results
    assert "running sequences re-queued to recompute" in (mesh.home / "logs" / "batcher.log").read_text()
    channel, stub = metering_stub(mesh.status["services"]["metering"]["address"])
    with channel:
        ids = {r[0] for r in results.values()}
        query = metering_pb2.GetUsageRequest(tenant="default")
        wait_for(lambda: len([r for r in stub.ExportUsage(query, timeout=10) if r.request_id in ids]) == STREAMS,
                 30, "the recomputed streams' commits")
        billed = [r for r in stub.ExportUsage(query, timeout=10) if r.request_id in ids]
    assert sorted((r.finish_reason, r.completion_tokens) for r in billed) == [("length", TOKENS)] * STREAMS


def test_a_request_sent_while_the_tokenizer_restarts_is_retried_not_refused(mesh: RunningMesh) -> None:
    os.kill(json.loads(mesh.status_path.read_text())["services"]["tokenizer"]["pid"], signal.SIGKILL)
    with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=60) as chat:
        answer = chat.complete("Still there?", max_tokens=3)  # Encode is retried until the tokenizer is back
    assert answer.choices[0].finish_reason in ("stop", "length")


def _stream(mesh: RunningMesh, i: int, started: threading.Barrier, outcomes: dict) -> None:
    chunks, request_id, end = 0, "", None
    with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=120) as chat:
        try:
            for chunk in chat.stream(f"A long story {i}", max_tokens=1000):
                request_id = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    if chunks == 1:
                        started.wait()
        except (ChatStreamError, grpc.RpcError) as exc:
            end = exc
    outcomes[i] = (request_id, chunks, end)


def _chat_within(mesh: RunningMesh, since: float, limit_s: float) -> None:
    """A chat succeeds before `limit_s` have passed since `since` (refusals meanwhile: UNAVAILABLE only)."""
    with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=30) as chat:
        while True:
            try:
                chat.complete("Back again?", max_tokens=3)
                print(f"\nserving again {time.monotonic() - since:.1f} s after the kill")
                return
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() - since < limit_s, f"no chat within {limit_s} s: {exc.details()}"
                time.sleep(0.5)


def _restarts_counter(port: int, service: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "moemesh_up_restarts_total" and s.labels["service"] == service)


def _billed_as_delivered(mesh: RunningMesh, outcomes: dict) -> None:
    """Each cut stream is in the ledger once, finish_reason error, with at least the tokens of its content chunks
    (a chunk carries one or more tokens) and not more than were generated."""
    channel, stub = metering_stub(mesh.status["services"]["metering"]["address"])
    with channel:
        ids = {request_id: chunks for request_id, chunks, _ in outcomes.values()}
        query = metering_pb2.GetUsageRequest(tenant="default")

        def records() -> list:
            return [r for r in stub.ExportUsage(query, timeout=10) if r.request_id in ids]

        wait_for(lambda: len(records()) >= len(ids), 30, "the cut streams' commits")
        got = records()
    assert sorted(r.request_id for r in got) == sorted(ids)
    for r in got:
        assert r.finish_reason == "error" and ids[r.request_id] <= r.completion_tokens < 1000 and r.prompt_tokens > 0
