"""`moemesh up --model DIR --backend onnxruntime|packed` end to end (issue 11): the real mesh (every service a process,
gRPC over sockets) on an int4 checkpoint that `moemesh quantize` writes from the tiny MoE, one chat answered, and
both Router.Info and the gateway's ListModels (`/v1/models`) saying the checkpoint's quantization and the backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from moemesh.quant.quantizer import QuantSettings, quantize_model
from moemesh.sdk import ChatClient
from moemesh.v1 import chat_pb2, chat_pb2_grpc, router_pb2, router_pb2_grpc

sys.path.insert(0, str(Path(__file__).parents[2]))
from mesh_process import wait_status  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
QUANTIZATION = "int4 rtn group 32 (compressed-tensors)"  # group 32 divides hidden 64 and the tiny FFN (32)


@pytest.fixture(scope="module", params=["onnxruntime", "packed"])
def mesh(request, tmp_path_factory, tiny_moe_dir: Path):
    """(status.json of the running mesh, its output file, backend); stopped with SIGTERM after the module."""
    backend = request.param
    root = tmp_path_factory.mktemp(f"up_{backend}")
    qdir = root / "tiny-moe-int4"
    quantize_model(tiny_moe_dir, qdir, QuantSettings(bits=4, method="rtn", group_size=32), log=lambda _: None)
    env = {**os.environ, "MOEMESH_HOME": str(root / "home")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    output = root / "up.out"
    with output.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(qdir), "--backend",
                                 backend, "--gateway-port", "0"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield wait_status(proc, root / "home" / "run" / "status.json", output, 300), output, backend
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_quantized_mesh_chats_and_says_its_quantization_and_backend(mesh) -> None:
    status, output, backend = mesh
    with ChatClient(status["gateway"], status["api_key"], model=status["model"], timeout=120) as chat:
        answer = chat.complete("What is the capital of France?", max_tokens=4)
    assert answer.usage.completion_tokens >= 1, output.read_text()[-2000:]

    with grpc.insecure_channel(status["services"]["router"]["address"]) as channel:
        info = router_pb2_grpc.RouterStub(channel).Info(router_pb2.RouterInfoRequest(), timeout=30)
    assert (info.quantization, info.backend) == (QUANTIZATION, backend)

    with grpc.insecure_channel(status["gateway"]) as channel:
        metadata = [("authorization", f"Bearer {status['api_key']}")] if status["api_key"] else []
        models = chat_pb2_grpc.ChatStub(channel).ListModels(chat_pb2.ListModelsRequest(), metadata=metadata,
                                                            timeout=30)
    assert [(m.id, m.quantization, m.backend) for m in models.data] == [(status["model"], QUANTIZATION, backend)]
