"""HTTP streams through the edge (`moemesh up --edge`) that a death or a stop cuts still end as SSE should: an error
event, then `data: [DONE]` (issue 12). The stop runs last: it ends this module's mesh."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx2
import pytest

from mesh_harness import RunningMesh
from metering_harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MESH_UP_ARGS = ["--edge", "--edge-port", "0"]


def _cut_stream(mesh: RunningMesh, cut) -> list[str]:
    """The SSE data lines of a long streamed chat over HTTPS; `cut()` runs once its first content arrived."""
    status = json.loads(mesh.status_path.read_text())
    # The stream must outlast the cut, else it ends normally (a finish chunk, [DONE], no error event) and proves
    # nothing: 1,900 tokens (the tiny model's context is 2,048; ~9 s on a quiet machine, well past the 3.5 s after a
    # stop at which the gateway cuts its streams), and ignore_eos: the tiny random model, sampled, emits an EOS
    # within 1,200 tokens in about 1 of 30 streams.
    body = {"model": status["model"], "stream": True, "max_tokens": 1900, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a very long story"}]}
    data: list[str] = []
    with httpx2.Client(verify=status["ca_cert"], timeout=120) as client:
        with client.stream("POST", f"{status['edge_https']}/v1/chat/completions", json=body,
                           headers={"authorization": f"Bearer {status['api_key']}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data.append(line.removeprefix("data: "))
                    if len(data) == 3:  # role chunk, then content
                        cut()
    return data


def _assert_error_then_done(data: list[str]) -> dict:
    assert data[-1] == "[DONE]", f"no [DONE] (the stream was cut below the SSE level): {data[-2:]}"
    last = json.loads(data[-2])
    finish = [c.get("finish_reason") for c in last.get("choices", ())]
    assert "error" in last, f"ended without an error event (finish {finish}, {len(data)} chunks): {data[-3:]}"
    error = last["error"]
    assert error["code"] == "UNAVAILABLE" and "retry the request" in error["message"], error
    return error


def test_a_batcher_death_ends_the_http_stream_with_an_error_event_and_done(mesh: RunningMesh) -> None:
    batcher = json.loads(mesh.status_path.read_text())["services"]["batcher"]["pid"]
    data = _cut_stream(mesh, lambda: os.kill(batcher, signal.SIGKILL))
    _assert_error_then_done(data)


def test_a_killed_edge_comes_back_on_its_port(mesh: RunningMesh) -> None:
    """--edge-port 0 picked the port at the first start; the restart must reuse it (clients know that URL)."""
    status = json.loads(mesh.status_path.read_text())
    os.kill(status["services"]["edge"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    with httpx2.Client(verify=status["ca_cert"], timeout=5) as client:
        while True:
            try:
                assert client.get(f"{status['edge_https']}/healthz").status_code == 200
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline, "the edge did not come back on its port"
                time.sleep(0.3)
    wait_for(lambda: json.loads(mesh.status_path.read_text())["services"]["edge"]["restarts"] == 1, 10,
             "the edge's restart in the status file")


def test_a_stop_ends_the_http_stream_with_an_error_event_and_done(mesh: RunningMesh) -> None:
    _wait_serving(mesh)  # the batcher killed above is back
    stopped: list[float] = []

    def stop() -> None:
        stopped.append(time.monotonic())
        mesh.proc.send_signal(signal.SIGTERM)

    data = _cut_stream(mesh, stop)
    error = _assert_error_then_done(data)
    assert "shutting down" in error["message"]
    assert mesh.proc.wait(timeout=20) == 0 and time.monotonic() - stopped[0] < 11


def _wait_serving(mesh: RunningMesh, timeout: float = 60.0) -> None:
    status = json.loads(mesh.status_path.read_text())
    body = {"model": status["model"], "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + timeout
    with httpx2.Client(verify=status["ca_cert"], timeout=30) as client:
        while client.post(f"{status['edge_https']}/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {status['api_key']}"}).status_code != 200:
            assert time.monotonic() < deadline, "the mesh did not serve again"
            time.sleep(0.5)
