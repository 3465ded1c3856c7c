"""cuda_ipc on a real GPU: expert shard processes on the router's GPU give the in-process Engine's logits (bf16),
for prefill (eager) and decode steps (CUDA graphs on both sides). Skips without CUDA, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.mesh_process import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuda_ipc shares device memory)")

CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1024, "hidden_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
          "intermediate_size": 1024, "moe_intermediate_size": 256, "num_experts": 16, "num_experts_per_tok": 4,
          "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 2048,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def _wait_ready(client, proc, log) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            client.placement()
            return
        except Exception:  # noqa: BLE001 -- not up yet
            time.sleep(0.5)
    raise AssertionError(log.read_text()[-3000:])


def _steps(engine, prompts):
    from moemesh.runtime.types import SequenceWork

    # The decode tokens are fixed, not sampled: with random weights the logits are nearly flat, so a rounding
    # difference (two shards' partial sums added in float32) can flip a greedy choice and the sequences diverge.
    results, logits = engine.step_with_logits([SequenceWork(f"s{i}", p, 0) for i, p in enumerate(prompts)])
    out, pos = [logits.float().cpu()], len(prompts[0])
    for step in range(3):  # decode: bucket 4, captured then replayed
        works = [SequenceWork(r.seq_id, [(7 * i + 13 * step + 5) % CONFIG["vocab_size"]], pos)
                 for i, r in enumerate(results)]
        results, logits = engine.step_with_logits(works)
        out.append(logits.float().cpu())
        pos += 1
    return out


@pytest.mark.parametrize("shards", [1, 2])
def test_cuda_ipc_logits_equal_in_process(tmp_path, shards):
    from moemesh.runtime.engine import Engine
    from services.router import cuda_ipc_dispatch
    from services.router.expert_client import GrpcShardClient
    from services.router.placement import Placement
    from moemesh.runtime.spec import load_spec

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    prompts = torch.randint(0, CONFIG["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0)).tolist()
    reference = _steps(Engine.load(tmp_path, load_format="dummy", device="cuda", dtype=torch.bfloat16), prompts)
    procs, clients = [], []
    try:
        for i in range(shards):
            port, log = free_port(), tmp_path / f"expert-{i}.log"
            env = {**os.environ, "MOEMESH_MODEL": str(tmp_path), "MOEMESH_EXPERT_PORT": str(port),
                   "MOEMESH_EXPERT_DEVICE": "cuda", "MOEMESH_EXPERT_DTYPE": "bfloat16",
                   "MOEMESH_EXPERT_LOAD_FORMAT": "dummy", "MOEMESH_EXPERT_NUM_SHARDS": str(shards),
                   "MOEMESH_EXPERT_SHARD_INDEX": str(i), "OTEL_SDK_DISABLED": "true"}
            procs.append(subprocess.Popen([sys.executable, "-m", "services.expert"], env=env, stdout=log.open("w"),
                                          stderr=subprocess.STDOUT))
            clients.append(GrpcShardClient(f"127.0.0.1:{port}", connect_timeout=120))
            _wait_ready(clients[-1], procs[-1], log)
        spec = load_spec(tmp_path)
        placement = Placement(tuple(c.placement() for c in clients))
        dispatch = cuda_ipc_dispatch.start(clients, placement, mode="cuda_ipc", device="cuda", spec=spec,
                                           local=[True] * shards, call_timeout=60)
        assert dispatch.transports() == ["cuda_ipc"] * shards
        engine = Engine.load(tmp_path, dispatch=dispatch, load_format="dummy", device="cuda", dtype=torch.bfloat16)
        assert engine.info.cuda_graphs.startswith("on") == dispatch.capturable, engine.info.cuda_graphs
        got = _steps(engine, prompts)
        for step, (a, b) in enumerate(zip(got, reference)):
            err = ((a - b).norm() / b.norm()).item()
            assert err < 2e-2, f"step {step}: relative logits error {err:.2e} (graphs {engine.info.cuda_graphs})"
        dispatch.close()
    finally:
        for c in clients:
            c.close()
        for p in procs:
            p.terminate()
            p.wait(10)
