"""Expert shards with `--backend onnxruntime` over real gRPC: the two shards' int8 outputs sum to the float experts'
(up to int8 weight rounding), and the config refuses what the backend cannot run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moemesh.runtime.experts import ExpertBank
from moemesh.serving import client_channel, serve_in_process
from moemesh.serving.config import ConfigError
from moemesh.serving.tensors import from_proto
from moemesh.v1 import expert_pb2_grpc
from services.expert.__main__ import build_servicer
from services.expert.servicer import add_to_server
from tests.services.expert.test_expert_service import block, config_for, request


def ort_config(model_dir, index: int):
    return dataclasses.replace(config_for(model_dir, index), backend="onnxruntime")


async def test_onnxruntime_shards_sum_to_the_float_experts(tiny_moe_dir, monkeypatch):
    monkeypatch.setenv("MOEMESH_ORT_ACCURACY", "1")  # float activations: only the int8 weights differ
    spec, hidden, ids, weights = block(tiny_moe_dir)
    full = ExpertBank.load(tiny_moe_dir)
    async with serve_in_process(lambda s: add_to_server(build_servicer(ort_config(tiny_moe_dir, 0)), s),
                                name="expert-0") as a, \
            serve_in_process(lambda s: add_to_server(build_servicer(ort_config(tiny_moe_dir, 1)), s),
                             name="expert-1") as b:
        stubs = [expert_pb2_grpc.ExpertStub(client_channel(svc.address)) for svc in (a, b)]
        for layer in spec.moe_layers:
            outs = [from_proto((await s.Forward(request(layer, hidden, ids, weights))).output) for s in stubs]
            expected = full.forward(layer, hidden, ids.long(), weights)
            assert outs[0].abs().sum() > 0 and outs[1].abs().sum() > 0
            torch.testing.assert_close(outs[0] + outs[1], expected, rtol=0, atol=0.02 * expected.abs().max().item())


def test_onnxruntime_backend_needs_float32(tiny_moe_dir):
    with pytest.raises(ConfigError, match="onnxruntime needs dtype float32"):
        dataclasses.replace(ort_config(tiny_moe_dir, 0), dtype="bfloat16").validate()
