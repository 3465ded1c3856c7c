"""The real `python -m services.metering` process with its embedded Redis: dev tenant, set-quota on a running mesh,
Prometheus metrics, and no committed record lost when metering is SIGKILLed and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from moemesh.cli.main import main as cli
from moemesh.v1 import metering_pb2 as pb
from moemesh.v1 import metering_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]


class Metering:
    """One metering process in `home`; start() waits for its ready file."""

    def __init__(self, home: Path) -> None:
        self.home, self.proc, self.info = home, None, {}

    def start(self) -> "Metering":
        ready = self.home / "ready.json"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "MOEMESH_HOME": str(self.home), "MOEMESH_READY_FILE": str(ready),
               "PYTHONPATH": str(ROOT), "MOEMESH_METERING_DEV_TENANT": "default"}
        env.pop("REDIS_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "services.metering", "--port", "0", "--metrics-port",
                                      "0", "--log-level", "WARNING"], cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.proc.poll() is None, f"metering exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "metering did not become ready in 60 s"
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        return self

    def stub(self) -> tuple[grpc.Channel, metering_pb2_grpc.MeteringStub]:
        from tests.metering_admin import AdminToken  # presents MOEMESH_ADMIN_TOKEN (tests/conftest.py)

        channel = grpc.insecure_channel(self.info["address"])
        return channel, metering_pb2_grpc.MeteringStub(grpc.intercept_channel(channel, AdminToken()))

    def redis_pid(self) -> int:
        return json.loads((self.home / "redis" / "owner.json").read_text())["server_pid"]


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def _serve(stub, key: str, n: int) -> None:
    tenant = stub.Authenticate(pb.AuthenticateRequest(api_key=key)).tenant
    for i in range(n):
        rid = f"req-{i}"
        stub.Reserve(pb.ReserveRequest(request_id=rid, tenant=tenant, model="m", prompt_tokens=5,
                                       max_completion_tokens=20))
        stub.Commit(pb.CommitRequest(request_id=rid, tenant=tenant, model="m", prompt_tokens=5,
                                     completion_tokens=7, engine_seconds=0.01, finish_reason="stop"))


def _set_quota_acts_at_once(metering: Metering, stub, capsys) -> None:
    """The CLI reaches the running mesh's Redis (same MOEMESH_HOME) and its change acts at once."""
    redis_pid = metering.redis_pid()
    assert cli(["tenants", "set-quota", "default", "--rpm", "1", "--json"]) == 0
    assert metering.redis_pid() == redis_pid and json.loads(capsys.readouterr().out)["rpm"] == 1
    with pytest.raises(grpc.RpcError) as exc:
        stub.Reserve(pb.ReserveRequest(request_id="over", tenant="default", model="m", prompt_tokens=1))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry-after-ms" in dict(exc.value.trailing_metadata())


@pytest.mark.timeout(180)
def test_metering_process_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    metering = Metering(tmp_path).start()
    try:
        key = (tmp_path / "run" / "dev_api_key").read_text().strip()
        channel, stub = metering.stub()
        _serve(stub, key, 20)
        _set_quota_acts_at_once(metering, stub, capsys)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metering.info['metrics_port']}/metrics").read().decode()
        assert 'moemesh_metering_tokens_total{kind="completion",model="m",tenant="default"} 140.0' in text
        assert 'moemesh_metering_quota_rejections_total{limit="rpm",tenant="default"} 1.0' in text
        channel.close()

        # Crash: the embedded Redis goes with metering; the restarted one has every acknowledged commit.
        redis_pid = metering.redis_pid()
        metering.proc.send_signal(signal.SIGKILL)
        metering.proc.wait(10)
        assert _wait_gone(redis_pid), "redis-server outlived SIGKILLed metering"
        metering = Metering(tmp_path).start()
        assert (tmp_path / "run" / "dev_api_key").read_text().strip() == key  # still valid: reused
        channel, stub = metering.stub()
        usage = stub.GetUsage(pb.GetUsageRequest(tenant="default"))
        assert (usage.requests, usage.completion_tokens) == (20, 140)
        channel.close()

        redis_pid = metering.redis_pid()
        metering.proc.send_signal(signal.SIGTERM)
        assert metering.proc.wait(30) == 0
        assert _wait_gone(redis_pid, 1.0), "clean shutdown left redis-server running"
    finally:
        if metering.proc and metering.proc.poll() is None:
            metering.proc.kill()
            metering.proc.wait(10)
