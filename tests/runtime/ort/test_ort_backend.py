"""The ONNX Runtime backend against the torch engine on the same int4/int8 checkpoint (tiny transformers-written
models): logits, greedy decoding through the paged KV cache, and the expert bank's sparse and all-selected paths.

MatMulNBits runs at accuracy level 1 here (float activations) so the comparison is tight; the default level 4
(int8 activations) is covered by the perplexity figures in benchmarks/results/cpu-quant.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import hf_tiny  # noqa: E402

from moemesh.quant.quantizer import QuantSettings, quantize_model  # noqa: E402
from moemesh.runtime.engine import Engine  # noqa: E402
from moemesh.runtime.experts import ExpertBank  # noqa: E402
from moemesh.runtime.ort.experts import OrtExpertBank  # noqa: E402
from moemesh.runtime.types import SamplingParams, SequenceWork  # noqa: E402

IDS = [1, 5, 9, 33, 100, 7, 8, 200, 3]


@pytest.fixture(autouse=True)
def float_activations(monkeypatch) -> None:
    monkeypatch.setenv("MOEMESH_ORT_ACCURACY", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(arch: str, bits: int):
        if (arch, bits) not in cache:
            root = tmp_path_factory.mktemp(f"ort_{arch}{bits}")
            src = hf_tiny.save(hf_tiny.build_model(arch), root / "float")
            quantize_model(src, root / "q", QuantSettings(bits=bits, method="rtn", group_size=16), log=lambda _: None)
            cache[(arch, bits)] = root / "q"
        return cache[(arch, bits)]
    return get


def greedy(engine: Engine, steps: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    out = engine.step([SequenceWork("s", IDS, 0, params)])
    tokens = [out[0].token_id]
    for i in range(steps):
        tokens.append(engine.step([SequenceWork("s", [tokens[-1]], len(IDS) + i, params)])[0].token_id)
    return tokens


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("llama", 8), ("mixtral", 4)])
def test_ort_logits_and_greedy_tokens_match_torch(checkpoint, arch: str, bits: int) -> None:
    qdir = checkpoint(arch, bits)
    ref = Engine.load(qdir, kv_blocks=8)
    ort = Engine.load(qdir, kv_blocks=8, backend="onnxruntime")
    a, b = ref.forward_logits([IDS])[0], ort.forward_logits([IDS])[0]
    assert torch.allclose(a, b, atol=1e-2 * a.abs().max()), (a - b).abs().max()  # the ORT LM head is int8
    assert greedy(ort, 8) == greedy(ref, 8)


def test_expert_bank_all_selected_path_matches_torch(checkpoint) -> None:
    qdir = checkpoint("mixtral", 4)
    ref, ort = ExpertBank.load(qdir), OrtExpertBank.load(qdir)
    assert set(ort.bank) == set(ort.layers)  # uniform groups: the side-by-side graph exists for every layer
    hidden = torch.randn(5, ref.spec.hidden_size)
    ids = torch.arange(ref.spec.num_experts).repeat(5, 1)  # [T, E]: every token picks every expert
    weights = torch.rand(5, ref.spec.num_experts)
    for layer in ort.layers:
        a, b = ref.forward(layer, hidden, ids, weights), ort.forward(layer, hidden, ids, weights)
        assert torch.allclose(a, b, atol=1e-3 * a.abs().max())


def test_shard_hosts_a_subset(checkpoint) -> None:
    qdir = checkpoint("mixtral", 4)
    ref, ort = ExpertBank.load(qdir, experts=[1, 2]), OrtExpertBank.load(qdir, experts=[1, 2])
    hidden, ids = torch.randn(6, ref.spec.hidden_size), torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [2, -1], [0, 3]])
    weights = torch.rand(6, 2)
    a, b = ref.forward(0, hidden, ids, weights), ort.forward(0, hidden, ids, weights)
    assert torch.allclose(a, b, atol=1e-3 * a.abs().max()) and b[3].abs().max() == 0 and b[5].abs().max() == 0


def test_backend_refuses_other_dtypes_and_torch_quantization(checkpoint) -> None:
    with pytest.raises(ValueError, match="float32"):
        Engine.load(checkpoint("llama", 4), backend="onnxruntime", dtype="bfloat16")
    with pytest.raises(ValueError, match="quantization 'int8'"):
        Engine.load(checkpoint("llama", 4), backend="onnxruntime", quantization="int8")


def test_concatenated_experts_keep_fractional_zero_points() -> None:
    from moemesh.quant.grid import grid
    from moemesh.quant.packing import rtn
    from moemesh.runtime.ort.experts import cat_cols, cat_rows

    torch.manual_seed(0)
    parts = []
    for _ in range(3):  # Q4_1-like: w = d*q + m per group of 32
        d, m = torch.rand(8, 2, 1) * 0.05 + 0.01, -torch.rand(8, 2, 1) * 0.3
        w = (d * torch.randint(0, 16, (8, 2, 32)) + m).view(8, 64)
        parts.append((w, grid(w, 4, 32, rtn(w, 4, 32))))
    for cat, dim in ((cat_rows, 0), (cat_cols, 1)):
        joined = cat([q for _, q in parts])
        assert torch.allclose(joined.dequantize(), torch.cat([w for w, _ in parts], dim), atol=1e-5)
