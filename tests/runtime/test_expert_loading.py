"""Shard-aware loading: an ExpertBank reads only its experts (per-expert and fused 3D layouts, lazily sliced), the
backbone reads no routed expert at all, and a fused checkpoint computes the same model."""

from __future__ import annotations

import re

import pytest
import torch

import hf_tiny
from moemesh.runtime.backbone import Backbone
from moemesh.runtime.checkpoint import Checkpoint
from moemesh.runtime.dispatch import SumDispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank, shard_experts
from moemesh.runtime.spec import load_spec

EXPERT_ID = re.compile(r"\.experts\.(\d+)\.|\.experts\.[a-z_]+(?:\.weight)?\[(\d+)\]$")


def _experts_read(bank: ExpertBank) -> set[int]:
    ids = set()
    for name in bank.read_names:
        m = EXPERT_ID.search(name)
        assert m, f"bank read a non-expert tensor {name}"
        ids.add(int(m.group(1) or m.group(2)))
    return ids


def test_shard_experts_is_a_balanced_contiguous_partition():
    shards = [shard_experts(10, 3, i) for i in range(3)]
    assert shards == [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]
    assert shard_experts(8, 1, 0) == tuple(range(8))
    with pytest.raises(ValueError, match="num_shards"):
        shard_experts(4, 5, 0)
    with pytest.raises(ValueError, match="shard index"):
        shard_experts(8, 2, 2)


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_bank_reads_only_its_experts(tiny_hf, arch, fused):
    path, _ = tiny_hf(arch, fused=fused)
    spec = load_spec(path)
    whole = ExpertBank.load(path)
    half = ExpertBank.load(path, experts=shard_experts(spec.num_experts, 2, 1), layers=[spec.moe_layers[-1]])
    assert half.experts == tuple(range(spec.num_experts // 2, spec.num_experts))
    assert half.layers == (spec.moe_layers[-1],)
    assert _experts_read(half) == set(half.experts)
    assert all(f"layers.{spec.moe_layers[-1]}." in n for n in half.read_names)
    if fused:  # lazily sliced: one [e] slice per tensor and expert, never the whole stack
        assert all(n.endswith("]") for n in half.read_names)
    assert half.weight_bytes * 2 * len(spec.moe_layers) == whole.weight_bytes
    assert half.dtype == torch.float32 and str(half.device) == "cpu"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_backbone_reads_no_routed_expert(tiny_hf, arch):
    path, _ = tiny_hf(arch)
    with Checkpoint(path) as ckpt:
        Backbone.load(ckpt, load_spec(path), "cpu", torch.float32)
        reads = list(ckpt.reads)
    assert reads and not [n for n in reads if re.search(r"\.experts\.", n)]
    assert any("shared_expert" in n for n in reads) == (arch != "mixtral")  # shared experts are backbone


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_fused_checkpoint_matches_transformers(tiny_hf, arch):
    path, ref = tiny_hf(arch, fused=True)
    assert any(n.endswith("experts.gate_up_proj") for n in Checkpoint(path).names())
    n = load_spec(path).num_experts
    banks = [ExpertBank.load(path, experts=shard_experts(n, 2, i)) for i in range(2)]
    engine = Engine.load(path, dispatch=SumDispatch(banks), kv_blocks=4)
    prompt = list(range(3, 20))
    expected = hf_tiny.reference_logits(ref, prompt)
    torch.testing.assert_close(engine.forward_logits([prompt])[0], expected, atol=1e-4, rtol=0)


def test_bank_sums_only_hosted_experts(tiny_hf):
    path, _ = tiny_hf("mixtral")
    layer = load_spec(path).moe_layers[0]
    whole, low, high = (ExpertBank.load(path, experts=e) for e in (None, (0, 1), (2, 3)))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 64, generator=g)
    ids = torch.tensor([[0, 2], [1, 3], [3, -1], [0, 1], [2, 3], [-1, -1]])
    weights = torch.rand(6, 2, generator=g)
    total = whole.forward(layer, hidden, ids, weights)
    parts = low.forward(layer, hidden, ids, weights) + high.forward(layer, hidden, ids, weights)
    torch.testing.assert_close(parts, total)
    assert torch.equal(total[5], torch.zeros(64))  # no expert selected: nothing added
    only_low = low.forward(layer, hidden, ids, weights)
    assert torch.equal(only_low[4], torch.zeros(64))  # token 4 routed to experts 2, 3 only
    with pytest.raises(KeyError, match="not hosted"):
        whole.forward(99, hidden, ids, weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_matches_per_expert_loop_on_cuda(tiny_hf):
    path, _ = tiny_hf("qwen3_moe")
    bank = ExpertBank.load(path, device="cuda", dtype=torch.bfloat16)
    assert bank._use_grouped_mm()
    weights = bank.gate_up[bank.layers[0]], bank.down[bank.layers[0]]  # [E, 2I, H], [E, H, I]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(40, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    counts = torch.tensor([5, 0, 12, 3, 0, 9, 11, 0], device="cuda")  # empty experts too
    torch.testing.assert_close(bank._grouped(*weights, x, counts).float(),
                               bank._per_expert(*weights, x, counts).float(), atol=2e-2, rtol=2e-2)
