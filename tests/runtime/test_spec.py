"""config.json parsing (hub-style legacy keys, errors that quote the bad value) and group-limited routing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moemesh.runtime.families import spec_from_config
from moemesh.runtime.gate import Gate
from moemesh.runtime.spec import ConfigError

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512}

# The shape of deepseek-ai/DeepSeek-V3's config.json (legacy rope keys, no rope_interleave), scaled down.
DEEPSEEK_V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 5, "num_attention_heads": 4, "n_routed_experts": 16,
    "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 8, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "eos_token_id": 1,
}


def test_llama_defaults_and_legacy_rope_keys():
    spec = spec_from_config(LLAMA | {"rope_theta": 5e5, "rope_scaling": None}, {"eos_token_id": [7, 9]})
    assert spec.moe is None and spec.moe_layers == () and spec.num_experts == 0
    assert (spec.attention.num_kv_heads, spec.attention.head_dim, spec.rope.theta) == (4, 8, 5e5)
    assert spec.eos_token_ids == (7, 9) and spec.max_context == 512 and not spec.tie_word_embeddings


def test_deepseek_v3_hub_config():
    spec = spec_from_config(DEEPSEEK_V3_HUB)
    moe = spec.moe
    assert spec.moe_layers == (3, 4) and moe.num_experts == 16 and moe.shared_intermediate_size == 16
    routing = (moe.scoring, moe.group_score, moe.correction_bias, moe.n_group, moe.topk_group)
    assert routing == ("sigmoid", "top2", True, 8, 4)
    assert spec.rope.interleaved and spec.rope.scaling["rope_type"] == "yarn" and spec.rope.dim == 8
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert spec.attention.mla and spec.attention.scale == pytest.approx(16**-0.5 * mscale**2)


def test_sliding_window_caps_the_context():
    assert spec_from_config(LLAMA | {"sliding_window": 128}).max_context == 128
    assert spec_from_config(LLAMA | {"sliding_window": 128, "use_sliding_window": False}).max_context == 512


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "'GPT2LMHeadModel' is not supported"),
    ({"num_attention_heads": "four"}, "num_attention_heads must be an integer >= 1, got 'four'"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type must be one of .* got 'dynamic'"),
    ({"hidden_act": "swish2"}, "hidden_act must be one of .* got 'swish2'"),
    ({"architectures": ["MoemeshLlamaMoeForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 5,
      "moe_intermediate_size": 8}, "num_experts_per_tok 5 exceeds 4 experts"),
    ({"architectures": ["MoemeshLlamaMoeForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 8, "router_weighting": "sigmoid"}, "router_weighting must be one of .* got 'sigmoid'"),
])
def test_bad_configs_name_the_value(change, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config(LLAMA | change)


def test_group_limited_routing_keeps_only_the_best_groups():
    spec = spec_from_config(DEEPSEEK_V3_HUB).moe  # 16 experts in 8 groups of 2, 4 groups eligible, top-4
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(16, 32, generator=g), torch.randn(16, generator=g) * 0.1
    hidden = torch.randn(64, 32, generator=g)
    ids, weights = Gate(spec, weight, bias)(hidden)
    assert ids.shape == (64, 4)
    assert all(len(set((row // 2).tolist())) <= 4 for row in ids)  # experts from at most topk_group groups
    ungrouped, _ = Gate(dataclasses.replace(spec, n_group=1, topk_group=1), weight, bias)(hidden)
    assert (ids.sort(-1).values != ungrouped.sort(-1).values).any(dim=-1).sum() > 0  # the limit changes choices
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5))  # normalised, then scaled
