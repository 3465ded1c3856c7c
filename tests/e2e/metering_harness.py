"""Helpers of the mesh-level metering tests (test_metering_mesh.py): the moemesh CLI in-process against a mesh's
MOEMESH_HOME, the Chat API's account calls, Prometheus figures of a service, a PNG reader, and one more metering +
gateway pair for the crash test."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from moemesh.cli.main import main as moemesh_main
from moemesh.v1 import chat_pb2, chat_pb2_grpc, metering_pb2, metering_pb2_grpc

from mesh_harness import ROOT, RunningMesh, free_port


def cli(mesh_home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`moemesh ARGS` in this process with MOEMESH_HOME = the mesh's (as a shell next to `moemesh up` would)."""
    saved = {k: os.environ.get(k) for k in ("MOEMESH_HOME", "REDIS_URL", *(env or {}))}
    os.environ["MOEMESH_HOME"] = str(mesh_home)
    os.environ.pop("REDIS_URL", None)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = moemesh_main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code or 0, out.getvalue(), err.getvalue()


def create_tenant(mesh: RunningMesh, name: str, *flags: str) -> str:
    """`moemesh tenants create NAME FLAGS --json` against the mesh; returns the API key."""
    code, out, err = cli(mesh.home, "tenants", "create", name, *flags, "--json")
    assert code == 0, err
    created = json.loads(out)
    assert created["tenant"] == name and created["api_key"]
    return created["api_key"]


class Account:
    """The Chat API's account calls (SubmitFeedback, GetUsage) with one tenant's key."""

    def __init__(self, gateway: str, api_key: str) -> None:
        self._channel = grpc.insecure_channel(gateway)
        self._stub = chat_pb2_grpc.ChatStub(self._channel)
        self._auth = (("authorization", f"Bearer {api_key}"),)

    def __enter__(self) -> Account:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def feedback(self, request_id: str, rating: int = 0, task_completed: bool | None = None,
                 comment: str = "") -> chat_pb2.SubmitFeedbackResponse:
        request = chat_pb2.SubmitFeedbackRequest(request_id=request_id, rating=rating, comment=comment)
        if task_completed is not None:
            request.task_completed = task_completed
        return self._stub.SubmitFeedback(request, metadata=self._auth, timeout=30)

    def usage(self, tenant: str = "", since_unix: int = 0) -> metering_pb2.UsageReport:
        return self._stub.GetUsage(chat_pb2.UsageQuery(tenant=tenant, since_unix=since_unix), metadata=self._auth,
                                   timeout=30)

    def wait_requests(self, n: int, timeout: float = 30.0) -> metering_pb2.UsageReport:
        """The usage report once it counts `n` requests (commits run in the background after each answer)."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.usage()
            if report.requests >= n or time.monotonic() > deadline:
                return report
            time.sleep(0.1)


def metric_sum(metrics_port: int, sample: str) -> float:
    """Sum over labels of one Prometheus sample (e.g. 'moemesh_router_step_seconds_sum') of a service."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample)


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB PNG without filters (what services/metering/png.py writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2), "expected 8-bit RGB"
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(r[0] == 0 for r in rows), "filtered rows are not supported by this reader"
    return width, height, [r[1:] for r in rows]


@dataclass
class Process:
    """A service process started by a test; start() waits for its ready file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    ready: Path
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self, timeout: float = 90.0) -> Process:
        self.ready.unlink(missing_ok=True)
        with self.log.open("a") as log:
            self.proc = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert self.proc.poll() is None, f"{self.args} exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.args} not ready in {timeout} s"
            time.sleep(0.05)
        self.info = json.loads(self.ready.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def side_metering(home: Path, port: int) -> Process:
    """A metering process of its own (own MOEMESH_HOME and embedded Redis, dev tenant "default") on a fixed port, so
    that a restart comes back where the gateway looks for it."""
    env = {**os.environ, "MOEMESH_HOME": str(home), "MOEMESH_METERING_DEV_TENANT": "default", "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return Process(["-m", "services.metering", "--port", str(port), "--metrics-port", "-1"],
                   {**env, "MOEMESH_READY_FILE": str(home / "metering.ready.json")}, home / "metering.log",
                   home / "metering.ready.json")


def side_gateway(mesh: RunningMesh, home: Path, metering_addr: str) -> Process:
    """A second gateway on the mesh's tokenizer and batcher, metered by `metering_addr`."""
    env = {**os.environ, "MOEMESH_HOME": str(home), "OTEL_SERVICE_NAME": "gateway-side",
           "MOEMESH_MODEL": mesh.status["model"], "METERING_ADDR": metering_addr, "PYTHONPATH": str(ROOT),
           "MOEMESH_READY_FILE": str(home / "gateway.ready.json")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    for peer in ("tokenizer", "batcher"):
        env[f"{peer.upper()}_ADDR"] = mesh.status["services"][peer]["address"]
    return Process(["-m", "gateway", "--port", str(free_port()), "--metrics-port", "-1"], env, home / "gateway.log",
                   home / "gateway.ready.json")


from tests.metering_admin import AdminToken  # noqa: E402


def metering_stub(address: str) -> tuple[grpc.Channel, metering_pb2_grpc.MeteringStub]:
    """A stub that presents the admin token (MOEMESH_ADMIN_TOKEN, set for every test process: tests/conftest.py)."""
    channel = grpc.insecure_channel(address)
    return channel, metering_pb2_grpc.MeteringStub(grpc.intercept_channel(channel, AdminToken()))


class ChatLoad:
    """`clients` threads chatting in a loop through `gateway` until the block ends: `done` holds the ids of the chats
    they saw complete, `refused` the status codes of those that failed (each followed by a 0.2 s pause)."""

    def __init__(self, gateway: str, api_key: str, model: str, clients: int = 3) -> None:
        self.gateway, self.api_key, self.model = gateway, api_key, model
        self.done: list[str] = []
        self.refused: list[grpc.StatusCode] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        from moemesh.sdk import ChatClient

        with ChatClient(self.gateway, self.api_key, model=self.model, timeout=60) as chat:
            while not self._stop.is_set():
                try:
                    self.done.append(chat.complete(f"Client {i} says hi", max_tokens=4).id)
                except grpc.RpcError as exc:
                    self.refused.append(exc.code())
                    time.sleep(0.2)

    def __enter__(self) -> ChatLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def ledger_ids(metering_addr: str, tenant: str, at_least: int, timeout: float = 90.0) -> list[str]:
    """Request ids of the tenant's ledger once it holds `at_least` records (then 1 s more: nothing else arrives)."""
    channel, stub = metering_stub(metering_addr)
    with channel:
        wait_for(lambda: stub.GetUsage(metering_pb2.GetUsageRequest(tenant=tenant)).requests >= at_least, timeout,
                 f"{at_least} ledger records")
        time.sleep(1.0)
        return [r.request_id for r in stub.ExportUsage(metering_pb2.GetUsageRequest(tenant=tenant))]
