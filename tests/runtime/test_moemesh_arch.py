"""MoemeshLlamaMoeForCausalLM (what `moemesh convert` writes): a Llama whose FFN neurons are split into routed
experts (+ an optional unweighted shared expert). With "unit" weighting and every expert selected it is exactly the
dense Llama, so transformers' Llama is its reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import hf_tiny
from moemesh.runtime.dispatch import SumDispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.gate import Gate
from moemesh.runtime.spec import MoeSpec, load_spec
from moemesh.runtime.types import SequenceWork

EXPERTS, SHARED = 4, 16  # llama tiny FFN: 96 neurons = 16 shared + 4 x 20


def _split_llama(model, out, top_k: int, weighting: str):
    """Write the dense tiny Llama as a MoemeshLlamaMoe checkpoint with randomly permuted neuron groups."""
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items() if ".mlp." not in k and k != "lm_head.weight"}
    inter = model.config.intermediate_size
    size = (inter - SHARED) // EXPERTS
    for i, layer in enumerate(model.model.layers):
        perm = torch.randperm(inter, generator=g)
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        parts = {"shared_expert": perm[:SHARED]}
        parts |= {f"experts.{e}": perm[SHARED + e * size:SHARED + (e + 1) * size] for e in range(EXPERTS)}
        for name, idx in parts.items():
            p = f"model.layers.{i}.mlp.{name}"
            state |= {f"{p}.gate_proj.weight": gate[idx], f"{p}.up_proj.weight": up[idx],
                      f"{p}.down_proj.weight": down[:, idx]}
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(EXPERTS, model.config.hidden_size, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    config = model.config.to_dict() | {
        "architectures": ["MoemeshLlamaMoeForCausalLM"], "model_type": "moemesh_llama_moe",
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": top_k, "moe_intermediate_size": size, "shared_expert_intermediate_size": SHARED,
        "router_weighting": weighting,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_all_experts_unit_weighting_is_the_dense_llama(tiny_hf, tmp_path):
    dense_path, ref = tiny_hf("llama")
    path = _split_llama(ref, tmp_path / "moe", top_k=EXPERTS, weighting="unit")
    spec = load_spec(path)
    assert spec.moe_layers == (0, 1) and spec.moe.scoring == "unit" and spec.tie_word_embeddings
    banks = [ExpertBank.load(path, experts=e) for e in ((0, 1), (2, 3))]
    engine = Engine.load(path, dispatch=SumDispatch(banks), kv_blocks=8)
    prompt = list(range(3, 30))
    expected = hf_tiny.reference_logits(ref, prompt)
    torch.testing.assert_close(engine.forward_logits([prompt])[0], expected, atol=1e-4, rtol=0)
    _, logits = engine.step_with_logits([SequenceWork("a", prompt[:20], 0), SequenceWork("b", prompt[:5], 0)])
    torch.testing.assert_close(logits, expected[[19, 4]], atol=1e-4, rtol=0)


def test_sparse_routing_differs_from_dense(tiny_hf, tmp_path):
    _, ref = tiny_hf("llama")
    path = _split_llama(ref, tmp_path / "moe", top_k=2, weighting="softmax")
    logits = Engine.load(path, kv_blocks=4).forward_logits([list(range(3, 20))])[0]
    assert (logits - hf_tiny.reference_logits(ref, list(range(3, 20)))).abs().max() > 1e-3


@pytest.mark.parametrize("weighting", ["unit", "softmax"])
def test_router_weighting(weighting):
    spec = MoeSpec(num_experts=4, top_k=2, intermediate_size=8, scoring=weighting,
                   norm_topk_prob=weighting == "softmax")
    weight = torch.eye(4, 6)  # logits = the first 4 features
    ids, weights = Gate(spec, weight)(torch.tensor([[3.0, 1.0, 2.0, 0.0, 9.0, 9.0]]))
    assert ids.tolist() == [[0, 2]]
    expected = [[1.0, 1.0]] if weighting == "unit" else torch.softmax(torch.tensor([[3.0, 2.0]]), -1).tolist()
    torch.testing.assert_close(weights, torch.tensor(expected))
