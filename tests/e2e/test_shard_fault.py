"""An expert shard killed or stopped mid-stream on the real mesh with the torch.distributed (gloo) data plane (issue 9,
Faults): every stream in flight ends with an in-band UNAVAILABLE within 1 s of a SIGKILL or a SIGSTOP (the stall
deadline, 0.6 s, + one poll + the batcher/gateway hop; a loaded CI machine gets STOP_MARGIN_S on top), the mesh
serves again within 30 s of the shard's return (restarted by `moemesh up`, or SIGCONT) with the same router process
(the group re-forms), and the killed shard leaves no process behind. benchmarks/shard_fault.py measures the same for
every transport (quiet: SIGSTOP to the first client error ~0.7 s)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from moemesh.sdk import ChatClient
from moemesh.sdk.client import ChatStreamError
from services.router import stall_deadline

from mesh_harness import RunningMesh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MESH_UP_ARGS = ["--expert-transport", "dist"]
STREAMS = 3
# The bound is 1 s from the SIGSTOP; quiet it is met with ~0.3 s to spare (the router's default stall
# deadline + a 60 ms poll + ~50 ms to the client), but on 2 cores busy with the whole suite the hop to the client
# alone has taken 0.3-0.4 s.
STOP_MARGIN_S = 0.25
assert stall_deadline.DEFAULT_S + STOP_MARGIN_S < 1.0


def _pid(mesh: RunningMesh, service: str) -> int:
    return json.loads(mesh.status_path.read_text())["services"][service]["pid"]


def _streams_cut_by(mesh: RunningMesh, fault) -> tuple[float, dict]:
    """Starts STREAMS long streams, calls fault() once each has content, waits for them to end; (the time of the
    fault, {stream: (monotonic end, how it ended)})."""
    ends: dict[int, tuple[float, object]] = {}
    started = threading.Barrier(STREAMS + 1, timeout=120)

    def stream(i: int) -> None:
        end, chunks = None, 0
        with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=120) as chat:
            try:
                for chunk in chat.stream(f"A long story {i}", max_tokens=240, ignore_eos=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        chunks += 1
                        if chunks == 1:
                            started.wait()
            except (ChatStreamError, grpc.RpcError) as exc:
                end = exc
        ends[i] = (time.monotonic(), end)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait()
    at = fault()
    for t in threads:
        t.join(120)
    return at, ends


def _chat_within(mesh: RunningMesh, since: float, limit_s: float) -> float:
    """Seconds from `since` until a chat succeeds (refusals meanwhile: UNAVAILABLE only); fails after limit_s."""
    with ChatClient(mesh.gateway, mesh.api_key, model=mesh.status["model"], timeout=30) as chat:
        while True:
            try:
                chat.complete("Back again?", max_tokens=3)
                return time.monotonic() - since
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() - since < limit_s, f"no chat within {limit_s} s: {exc.details()}"
                time.sleep(0.25)


def _group_alive(pgid: int, exclude: set[int]) -> list[int]:
    """Live (not zombie) processes of process group pgid, except `exclude`."""
    alive = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) not in exclude and fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(entry))
    return alive


def _assert_cut_within(at: float, ends: dict, limit_s: float) -> None:
    assert sorted(ends) == list(range(STREAMS)), ends
    for end_at, end in ends.values():
        assert isinstance(end, ChatStreamError) and end.code == "UNAVAILABLE", end  # in-band: each had started
        assert end_at - at < limit_s, f"error {end_at - at:.2f} s after the fault (limit {limit_s} s)"
    print(f"\nstreams cut after {max(e[0] for e in ends.values()) - at:.2f} s")


@pytest.mark.timeout(300)
def test_sigkill_of_a_gloo_shard_mid_stream_errors_within_1_s_and_serves_again(mesh: RunningMesh) -> None:
    router, victim = _pid(mesh, "router"), _pid(mesh, "expert-0")
    pgid = os.getpgid(victim)

    def kill() -> float:
        os.kill(victim, signal.SIGKILL)
        return time.monotonic()

    killed, ends = _streams_cut_by(mesh, kill)
    _assert_cut_within(killed, ends, 1.0)
    deadline = time.monotonic() + 120
    while _pid(mesh, "expert-0") == victim:  # `moemesh up` restarts it; the status file names it once SERVING
        assert time.monotonic() < deadline, "expert-0 not restarted within 120 s"
        time.sleep(0.1)
    back = time.monotonic()
    print(f"shard back {back - killed:.1f} s after the kill, serving again {_chat_within(mesh, back, 30.0):.1f} s "
          "after that")
    assert _pid(mesh, "router") == router and mesh.proc.poll() is None  # the data plane re-formed in place
    now = {s["pid"] for s in json.loads(mesh.status_path.read_text())["services"].values()}
    assert _group_alive(pgid, now) == []


@pytest.mark.timeout(300)
def test_sigstop_of_a_gloo_shard_mid_stream_errors_within_1_s_and_serves_after_sigcont(
        mesh: RunningMesh) -> None:
    router, victim = _pid(mesh, "router"), _pid(mesh, "expert-1")

    def stop() -> float:
        os.kill(victim, signal.SIGSTOP)
        return time.monotonic()

    try:
        stopped, ends = _streams_cut_by(mesh, stop)
        _assert_cut_within(stopped, ends, 1.0 + STOP_MARGIN_S)
        time.sleep(max(0.0, stopped + 3.0 - time.monotonic()))
    finally:
        os.kill(victim, signal.SIGCONT)
    resumed = time.monotonic()
    print(f"serving again {_chat_within(mesh, resumed, 30.0):.1f} s after SIGCONT")
    assert _pid(mesh, "router") == router and _pid(mesh, "expert-1") == victim  # nothing was restarted
