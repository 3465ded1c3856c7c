"""`python -m services.tokenizer` as its own OS process: ready file, health, reflection, a traced call, and a clean
exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        assert proc.poll() is None, f"tokenizer exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("tokenizer did not become ready")


def test_process_serves_traces_and_exits_cleanly(tmp_path: Path, tiny_moe_dir: Path) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "MOEMESH_HOME": str(tmp_path / "home"), "MOEMESH_MODEL": str(tiny_moe_dir),
           "MOEMESH_READY_FILE": str(ready)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    log = (tmp_path / "tokenizer.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "services.tokenizer", "--port", "0", "--metrics-port", "0"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        info = _wait_for(ready, proc)
        assert info["name"] == "tokenizer" and info["pid"] == proc.pid and info["metrics_port"] > 0
        with grpc.insecure_channel(info["address"]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="moemesh.v1.Tokenizer"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            ids = tokenizer_pb2_grpc.TokenizerStub(channel).Encode(
                tokenizer_pb2.EncodeRequest(model=str(tiny_moe_dir), text="hello")
            ).ids
            assert len(ids) >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    spans = [json.loads(line) for line in (tmp_path / "home" / "traces" / "tokenizer.jsonl").read_text().splitlines()]
    assert [s["name"] for s in spans] == ["/moemesh.v1.Tokenizer/Encode"]
    assert spans[0]["service"] == "tokenizer" and spans[0]["kind"] == "SERVER"
    text = (tmp_path / "tokenizer.log").read_text()
    assert "tokenizer serving moemesh.v1.Tokenizer" in text and "tokenizer stopped" in text
